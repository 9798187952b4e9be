"""What avel does with bad input: every case of tests/test_hostile_cli.py, measured, as a markdown table.

Each case runs ``python -m avel ...`` in a fresh process on a small crafted file (hostile
checkpoints, broken checkpoint folders, broken data folders, command-line misuse); the table gives
its exit code, the first 90 characters of what the user reads (the ``error:`` line, or the first
problem of ``avel data check``), wall and CPU seconds and the child's peak resident memory
(``ru_maxrss`` from ``wait4``). The last column says whether the case ended as the issue asks (one line naming the
file, non-zero exit, < 10 s of CPU, < 1 GB, nothing written or changed), as the test checks it.

    python benchmarks/bad_input.py            # one case at a time (the timings of the table)
    python benchmarks/bad_input.py --jobs 2   # faster, noisier seconds
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from conftest import shared_root  # noqa: E402
from test_hostile_cli import CASES, Context, problems, run_cases  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=1, help="cases run at the same time (default 1)")
    ap.add_argument("-k", dest="select", help="only the cases whose id contains this")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    cases = [c for c in CASES if not args.select or args.select in c.id]
    with tempfile.TemporaryDirectory(prefix="avel-bad-input-") as tmp:
        root = Path(tmp)
        results = run_cases(cases, Context(root / "ctx", shared_root() / "fixtures"), root / "cases", jobs=args.jobs)
        rows, failed = [], 0
        for case in cases:
            setup, outcome = results[case.id]
            if setup.skip:
                rows.append(f"| {case.klass} | `{case.id}` | skipped: {setup.skip} | | | | | |")
                continue
            bad = problems(setup, outcome)
            failed += bool(bad)
            message = outcome.message
            message = message.split(": error: ", 1)[-1] if ": error: " in message else message
            for folder in (root / "cases" / case.id, root / "ctx", root):   # the file, not where it was made
                message = message.replace(str(folder), "…")
            message = message[:90].replace("|", "\\|")
            rows.append(f"| {case.klass} | `{case.id}` | {outcome.rc} | {message} | {outcome.seconds:.1f} | {outcome.cpu_seconds:.1f} | "
                        f"{outcome.peak_mb:.0f} | {'yes' if not bad else 'NO: ' + '; '.join(bad)[:120]} |")
    print(f"avel bad-input table: {len(cases)} cases, python {platform.python_version()}, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, --jobs {args.jobs}; paths shown as …\n")
    print("| input class | case | exit | message (first 90 characters) | wall s | CPU s | peak MB | as the issue asks |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\nreproduce: python benchmarks/bad_input.py --jobs {args.jobs}   (the test: "
          "pytest tests/test_hostile_cli.py)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

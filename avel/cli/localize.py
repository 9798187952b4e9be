"""``avel localize``: per-second events in your own videos, one result file per video plus a summary.

Exit code 0 when every video was localized, 1 when some failed (each named with its reason on stderr
and in the summary; the others are done), 2 when nothing could run (checkpoint, backbones).
"""
from __future__ import annotations

import csv
import io
import json
import logging
import sys
from pathlib import Path

from ..features.decode import VideoDecodeError
from ..inference import Localization, LocalizeError, Localizer
from ..io import atomic_write
from ..viz.attention import middle_frames
from ..viz.report import ReportEntry, write_report
from .args import Groups

log = logging.getLogger("avel")


def add(sub, g: Groups) -> None:
    p = sub.add_parser("localize", parents=[g.common, g.checkpoint, g.weights],
                       help="per-second events in your own videos")
    p.add_argument("videos", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=Path("avel-localize"))
    p.add_argument("--format", choices=["json", "csv"], default="json")
    p.add_argument("--report", action="store_true", help="also write a self-contained HTML report")
    p.set_defaults(func=run)


def run(args) -> int:
    loc = Localizer.from_checkpoint(args.checkpoint, device=args.device, audio_weights=args.audio_weights,
                                    visual_weights=args.visual_weights)
    loc.backbones()                      # a missing weights file stops here, before any video
    out: Path = args.out
    used: set[str] = set()
    summary, results = [], []
    for video in args.videos:
        stem = unique_stem(video, used)
        try:
            result = loc.localize(video)
        except (LocalizeError, OSError, ValueError) as e:
            print(f"avel localize: error: {e}", file=sys.stderr)
            summary.append({"video": str(video), "status": "failed", "error": str(e), "files": []})
            continue
        files = write_result(result, out, stem, args.format)
        results.append(result)
        summary.append({"video": str(video), "status": "ok", "error": None, "seconds": result.seconds,
                        "spans": [s.to_dict() for s in result.spans], "files": [str(f) for f in files],
                        "flags": result.flags})
        spans = ", ".join(f"{s.label} {s.start}-{s.end} s ({s.score:.2f})" for s in result.spans) or "no event"
        print(f"{video}: {result.seconds} s: {spans}")
    write_summary(out, args.format, args.checkpoint, summary)
    if args.report and results:
        path = write_report(out / "report.html", [ReportEntry(r, frames=_frames(r)) for r in results],
                            facts=loc.facts(), failures=[s for s in summary if s["status"] == "failed"])
        print(f"report: {path}")
    failed = sum(s["status"] == "failed" for s in summary)
    print(f"{len(summary) - failed} of {len(summary)} videos localized; results in {out}")
    return 1 if failed else 0


def _frames(result: Localization):
    """The middle frame of each second, for the report's attention tiles (None: a report without them)."""
    if result.attention is None:
        return None
    try:
        return middle_frames(result.video, result.seconds)
    except (VideoDecodeError, OSError, ValueError) as e:
        log.warning("%s: no frames for the report (%s)", result.video, e)
        return None


def unique_stem(path: Path, used: set[str]) -> str:
    stem = path.stem or "video"
    name, k = stem, 2
    while name in used:
        name, k = f"{stem}-{k}", k + 1
    used.add(name)
    return name


def write_result(result: Localization, out: Path, stem: str, fmt: str) -> list[Path]:
    if fmt == "json":
        path = out / f"{stem}.json"
        atomic_write(path, json.dumps(result.to_dict(), indent=1))
        return [path]
    a, b = out / f"{stem}.csv", out / f"{stem}_spans.csv"
    atomic_write(a, result.segments_csv())
    atomic_write(b, result.spans_csv())
    return [a, b]


def write_summary(out: Path, fmt: str, checkpoint: Path, summary: list[dict]) -> Path:
    if fmt == "json":
        path = out / "summary.json"
        atomic_write(path, json.dumps({"checkpoint": str(checkpoint), "videos": summary}, indent=1))
        return path
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["video", "status", "seconds", "spans", "error"])
    for s in summary:
        spans = ";".join(f"{d['label']}:{d['start']}-{d['end']}" for d in s.get("spans", []))
        w.writerow([s["video"], s["status"], s.get("seconds", ""), spans, s["error"] or ""])
    path = out / "summary.csv"
    atomic_write(path, buf.getvalue())
    return path

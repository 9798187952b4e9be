#!/usr/bin/env bash
# GPU figures, on a machine with a CUDA device (skips cleanly without one):
#   1. training-step throughput of every supervised model, float32 and bf16 autocast
#      (benchmarks/train_step.py --device cuda --amp);
#   2. a 300-epoch A+V-att run of the original recipe on synthetic AVE-size data (4,143 videos,
#      7x7x512 visual, packed float16 layout), bounded to 8 minutes, with its epoch and
#      validation times.
#
#   bash benchmarks/gpu.sh                 # everything
#   GPU_EPOCHS=50 bash benchmarks/gpu.sh   # a shorter run
#   GPU_SKIP_STEP=1 bash benchmarks/gpu.sh # only the 300-epoch run
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
EPOCHS=${GPU_EPOCHS:-300}
LIMIT=${GPU_LIMIT_S:-480}
WORK=${GPU_WORKDIR:-/tmp/avel-gpu}

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu.sh: torch.cuda.is_available() is false: no GPU here, nothing to measure (skipped)"
    exit 0
fi
"$PY" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'# {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}')"

if [ -z "${GPU_SKIP_STEP:-}" ]; then
    echo "## 1. training step (B=64): float32 and bf16 autocast"
    "$PY" benchmarks/train_step.py --device cuda --amp --rounds 5 --min-round-s 0.3 || echo "gpu.sh: train_step failed ($?)"
fi

echo "## 2. A+V-att, original recipe, ${EPOCHS} epochs on synthetic AVE-size data (limit ${LIMIT}s)"
t0=$(date +%s)
"$PY" benchmarks/end_to_end.py --prepare --packed-only --workdir "$WORK" > /dev/null || { echo "gpu.sh: data preparation failed"; exit 1; }
echo "# data written in $(( $(date +%s) - t0 ))s: $WORK/ave (packed float16)"
rm -rf "$WORK/run"
t0=$(date +%s)
timeout "$LIMIT" "$PY" -m avel train --data-root "$WORK/ave" --layout packed --model av_att --device cuda \
    --epochs "$EPOCHS" --out "$WORK/run" --no-progress
status=$?
wall=$(( $(date +%s) - t0 ))
[ "$status" -eq 124 ] && echo "gpu.sh: stopped at the ${LIMIT}s limit"
[ "$status" -ne 0 ] && [ "$status" -ne 124 ] && echo "gpu.sh: training failed ($status)"
"$PY" - "$WORK/run/metrics.jsonl" "$wall" "$EPOCHS" <<'EOF'
import json, statistics, sys
path, wall, wanted = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
try:
    recs = [json.loads(line) for line in open(path)]
except OSError:
    sys.exit(f"no metrics at {path}")
train = [r["train_seconds"] for r in recs]
val = [r["val_seconds"] for r in recs if "val_seconds" in r]
best = max((r["val"]["accuracy"] for r in recs if "val" in r), default=float("nan"))
print(f"| epochs done | whole run (s) | median epoch (s) | median validation (s) | best val accuracy (random data) |")
print(f"|---|---|---|---|---|")
print(f"| {len(recs)}/{wanted} | {wall} | {statistics.median(train):.2f} | "
      f"{statistics.median(val) if val else float('nan'):.2f} | {best:.3f} |")
print(f"300-epoch estimate from the median epoch and validation: "
      f"{300 * statistics.median(train) + 60 * (statistics.median(val) if val else 0):.0f} s")
EOF

#!/usr/bin/env bash
# Set up avel in ./.venv on a fresh machine. With --test, also the test tools: pytest, hypothesis and
# ruff (the test extra of pyproject.toml), and (as root,
# through apt) Debian's chromium for the report's browser test and sound-theme-freedesktop for a
# recorded real-world sound. Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# torch first and pinned: on these machines 2.13.0 is a CPU build on local disk (a plain `torch`
# could pull a multi-GB CUDA build). Elsewhere pip fetches the matching wheel.
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
if [ "${1:-}" = "--test" ]; then
  python -m pip install -q -e ".[test]"
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    need=""
    [ -x /usr/bin/chromium ] || need="$need chromium"
    [ -d /usr/share/sounds/freedesktop ] || need="$need sound-theme-freedesktop"
    if [ -n "$need" ]; then
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need >/dev/null) \
        || echo "setup: could not install$need (the tests that need them will skip)" >&2
    fi
  fi
else
  python -m pip install -q -e .
fi
echo "avel is set up in .venv ($(python -c 'import avel; print(avel.__version__)'))"

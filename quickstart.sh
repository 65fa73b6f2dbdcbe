#!/usr/bin/env bash
# Set up .venv (once) and run the demo or the test suite.
#   ./quickstart.sh demo   synthetic data -> scaling grid on 2 processes -> eval -> power-law fit
#   ./quickstart.sh test   the whole test suite (what CI runs)
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}

setup() {
  local stamp=.venv/.clipscale-installed
  if [[ ! -f $stamp || pyproject.toml -nt $stamp ]]; then
    echo "[quickstart] installing into .venv (torch, open_clip, webdataset, ...)" >&2
    "$PYTHON" -m venv .venv
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e '.[test]'
    # CLIP_benchmark's metric code for the agreement test; its declared dependencies (transformers,
    # pycocoevalcap) are for captioning metrics the test does not use
    .venv/bin/python -m pip install --quiet --no-deps clip-benchmark==1.6.2
    touch "$stamp"
  fi
}

case "${1:-}" in
  demo) setup; shift; exec .venv/bin/clipscale demo "$@" ;;
  test) setup; shift; exec .venv/bin/python -m pytest -q -ra --durations=15 "$@" ;;
  *) echo "usage: $0 demo|test [args...]" >&2; exit 2 ;;
esac

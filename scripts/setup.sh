#!/usr/bin/env bash
# Sets up ./.venv on a fresh machine: torch 2.13.0 (the CPU build) first, then the project.
#   bash scripts/setup.sh          # runtime only (the demo)
#   bash scripts/setup.sh --dev    # plus test extras and the external tools the tests drive
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

dev=0
[ "${1:-}" = "--dev" ] && dev=1

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
pip_quiet() {
  # pip's "Location ... is ignored" notes about local mirrors are noise; real errors still show.
  .venv/bin/pip install --disable-pip-version-check -q "$@" 2> >(grep -v "is ignored: it is neither" >&2)
}
# torch first and pinned: a bare "torch" requirement would pull a multi-GB CUDA build.
.venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null \
  || pip_quiet torch==2.13.0
if [ "$dev" = 1 ]; then
  pip_quiet -e '.[dev]'
  bash scripts/install-tools.sh
else
  pip_quiet -e .
fi

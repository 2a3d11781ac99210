#!/usr/bin/env bash
# Sets up ./.venv on a fresh machine: torch 2.13.0 first, then the project.
#   bash scripts/setup.sh          # runtime only (the demo)
#   bash scripts/setup.sh --dev    # plus test extras and the external tools the tests drive
# torch 2.13.0 comes from pip's configured index. PyPI's Linux wheel of it is the CUDA build
# (~0.5 GB plus NVIDIA libraries); for the CPU build point TORCH_INDEX_URL at PyTorch's CPU index:
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/setup.sh
# Safe to run again, offline too once set up: a .venv without pip (an interrupted creation) is
# rebuilt, torch is installed only when missing, the project only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."

dev=0
[ "${1:-}" = "--dev" ] && dev=1

PY=${PYTHON:-python3}
if ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
  "$PY" -m venv --clear .venv
fi
pip_quiet() {
  # pip's "Location ... is ignored" notes about local mirrors are noise; real errors still show.
  .venv/bin/python -m pip install --disable-pip-version-check -q "$@" \
    2> >(grep -v "is ignored: it is neither" >&2)
}
# torch first and pinned, so that the project's own "torch" requirement is already met.
if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" \
    2>/dev/null; then
  pip_quiet torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi
# The project (editable), again only when pyproject.toml changed or a --dev set-up is wanted
# over a runtime one: the stamp holds pyproject.toml's hash and the level installed. The import
# check runs isolated (-I): from here, a plain import would find the source folder itself.
stamp=.venv/.orthoshard-installed
read -r have_hash have_dev 2>/dev/null < "$stamp" || { have_hash=""; have_dev=0; }
want_hash=$(.venv/bin/python -c "import hashlib; print(hashlib.sha256(open('pyproject.toml', 'rb').read()).hexdigest())")
if [ "$have_hash" != "$want_hash" ] || [ "$have_dev" -lt "$dev" ] \
    || [ ! -x .venv/bin/orthoshard ] \
    || ! .venv/bin/python -I -c "import orthoshard" 2>/dev/null; then
  if [ "$dev" = 1 ]; then
    pip_quiet -e '.[dev]'
  else
    pip_quiet -e .
  fi
  level=$dev
  [ "$have_hash" = "$want_hash" ] && [ "$have_dev" -gt "$dev" ] && level=$have_dev
  echo "$want_hash $level" > "$stamp"
fi
if [ "$dev" = 1 ]; then
  bash scripts/install-tools.sh
fi

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
case "${1:-}" in
  "") ;;
  --dev) dev=1 ;;
  *) echo "setup: unknown option ${1}; use --dev (test extras and tools) or nothing" >&2
     exit 2 ;;
esac

# Python 3.11 or later (pyproject.toml): $PYTHON if set, else python3.11 if there is one, else
# python3. A .venv of an older Python (made with another default python3) is rebuilt: pip's
# resolver would only say that torch's dependencies conflict, on every run.
PY=${PYTHON:-$(command -v python3.11 || echo python3)}
new_enough='import sys; sys.exit(sys.version_info < (3, 11))'
if ! "$PY" -c "$new_enough" 2>/dev/null; then
  found=missing
  command -v "$PY" >/dev/null 2>&1 && found=$("$PY" --version 2>&1 || true)
  echo "setup: needs Python 3.11 or later; $PY is ${found:-missing}." \
    "Install python3.11, or point PYTHON at one: PYTHON=/path/to/python3.11 bash $0" >&2
  exit 1
fi
if ! .venv/bin/python -m pip --version >/dev/null 2>&1 \
    || ! .venv/bin/python -c "$new_enough" 2>/dev/null; then
  echo "setup: creating .venv with $("$PY" --version 2>&1)"
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
  echo "setup: installing torch 2.13.0 (a large download the first time)"
  pip_quiet torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi
# The project (editable), again only when pyproject.toml or the pins changed or a --dev set-up
# is wanted over a runtime one: the stamp holds their hash and the level installed. The service's
# packages are held to the sidecar image's pins (deploy/sidecar-requirements.txt, as pip
# constraints), so the tests run on what the image ships. The import check runs isolated (-I):
# from here, a plain import would find the source folder itself.
pins=deploy/sidecar-requirements.txt
stamp=.venv/.orthoshard-installed
read -r have_hash have_dev 2>/dev/null < "$stamp" || { have_hash=""; have_dev=0; }
want_hash=$(.venv/bin/python -c "import hashlib; print(hashlib.sha256(open('pyproject.toml', 'rb').read() + open('$pins', 'rb').read()).hexdigest())")
if [ "$have_hash" != "$want_hash" ] || [ "$have_dev" -lt "$dev" ] \
    || [ ! -x .venv/bin/orthoshard ] \
    || ! .venv/bin/python -I -c "import orthoshard" 2>/dev/null; then
  echo "setup: installing orthoshard$([ "$dev" = 1 ] && echo " with its test extras")"
  if [ "$dev" = 1 ]; then
    pip_quiet -e '.[dev]' -c "$pins"
  else
    pip_quiet -e . -c "$pins"
  fi
  level=$dev
  [ "$have_hash" = "$want_hash" ] && [ "$have_dev" -gt "$dev" ] && level=$have_dev
  echo "$want_hash $level" > "$stamp"
fi
if [ "$dev" = 1 ]; then
  bash scripts/install-tools.sh
fi

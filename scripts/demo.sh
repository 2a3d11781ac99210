#!/usr/bin/env bash
# Sets up .venv, then runs the local demo. Extra args go to `orthoshard demo`; relative paths in
# them (--out, --checkpoint-dir) are relative to where this is run from.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bash "$root/scripts/setup.sh"
exec "$root/.venv/bin/orthoshard" demo "$@"

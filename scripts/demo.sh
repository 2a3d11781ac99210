#!/usr/bin/env bash
# Sets up .venv, then runs the local demo. Extra args go to `orthoshard demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/orthoshard demo "$@"

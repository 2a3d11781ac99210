#!/usr/bin/env bash
# Sets up .venv with the test tools, then runs the whole test suite. Extra args go to pytest,
# which runs from the repository root: paths in them are relative to it (tests/test_soap.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
# Two workers (pytest-xdist) fill each other's waits; `-n 0` after this runs in one process.
exec .venv/bin/python -m pytest -n 2 --dist worksteal "$@"

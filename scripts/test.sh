#!/usr/bin/env bash
# Installs everything and runs the whole test suite: lint, unit tests of the pure parts and
# lab tests that build real multi-node labs and send real packets.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=30 "$@"

#!/usr/bin/env bash
# Installs everything and runs the whole test suite: lint, unit tests of the pure parts and
# lab tests that build real multi-node labs and send real packets.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
.venv/bin/ruff check .
# two workers: the tests one after another on the first, and beside them on the second the
# few marked `alongside` (they mostly wait: tests/lab/conftest.py)
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=30 -n 2 --dist loadgroup "$@"

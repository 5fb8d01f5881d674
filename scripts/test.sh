#!/usr/bin/env bash
# Installs everything and runs the whole test suite: lint, unit tests of the pure parts and
# lab tests that build real multi-node labs and send real packets.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
.venv/bin/ruff check .
# the tests one after another, and beside them, in a second pytest, the few marked
# `alongside` (they mostly wait: the northbound down for a minute); its output follows
side_log=$(mktemp)
trap 'rm -f "$side_log"' EXIT
.venv/bin/python -m pytest -q -p no:cacheprovider -m alongside "$@" >"$side_log" 2>&1 &
side=$!
rc=0
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=30 -m "not alongside" "$@" || rc=$?
side_rc=0
wait "$side" || side_rc=$?
echo "--- the tests run alongside (pytest -m alongside):"
cat "$side_log"
[[ $side_rc -eq 5 ]] && side_rc=0   # none of them among those asked for
[[ $rc -ne 0 ]] && exit "$rc"
exit "$side_rc"

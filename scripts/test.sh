#!/usr/bin/env bash
# The project's test command (README): installs what is missing, builds, runs
# every test, then the chaos smoke subset. Works from a fresh clone; CI runs
# exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup.sh

echo "test: building (debug, with tests)"
# Progress lines ("[12/80] Compiling ...") are hidden; errors and the status are not.
swift build --build-tests 2>&1 | { grep -v '^\[' || true; }
build_status=${PIPESTATUS[0]}
if [[ $build_status -ne 0 ]]; then
    echo "test: build failed (exit $build_status)" >&2
    exit "$build_status"
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT
echo "test: running swift test"
set +e
swift test --skip-build 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e

# One plain closing line, whatever runner printed what.
passed=$(grep '^✔ Test .* passed' "$log" | grep -vc '^✔ Test run with' || true)
failed=$(grep '^✘ Test .* failed' "$log" | grep -vc '^✘ Test run with' || true)
echo "tests: ${passed} passed, ${failed} failed"

# The chaos smoke subset against real jobs, with the debug binaries just built.
echo "test: chaos smoke (chaos/run --smoke)"
set +e
FT_BIN="$(swift build --show-bin-path)" ./chaos/run --smoke --steps 200
chaos_status=$?
set -e
echo "chaos smoke: $([[ $chaos_status -eq 0 ]] && echo passed || echo "FAILED (exit $chaos_status)")"
if [[ $status -ne 0 ]]; then exit "$status"; fi
exit "$chaos_status"

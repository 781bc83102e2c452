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
# ExportTests writes a persisted step and the tensors it holds here, for
# python/tests/test_export.py (ftctl export, loaded with the real safetensors).
export FT_EXPORT_FIXTURE_DIR="$PWD/.build/export-fixture"
set +e
swift test --skip-build 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e

# One plain closing line, whatever runner printed what.
passed=$(grep '^✔ Test .* passed' "$log" | grep -vc '^✔ Test run with' || true)
failed=$(grep '^✘ Test .* failed' "$log" | grep -vc '^✘ Test run with' || true)
echo "tests: ${passed} passed, ${failed} failed"

# Real Slurm (a cluster of the tests' own: munge, slurmctld, a slurmd per network-namespace
# host), in a stage of its own: its jobs hold the machine for about two minutes, which the
# time limits of the process tests queued behind them would otherwise pay for.
echo "test: Slurm (FT_SLURM_TESTS=1 swift test --filter SlurmTests)"
if [[ $(id -u) -eq 0 ]]; then
    set +e
    FT_SLURM_TESTS=1 swift test --skip-build --filter SlurmTests 2>&1 | tee "$log"
    slurm_status=${PIPESTATUS[0]}
    set -e
    # As root the real-Slurm suite must run: skipped (Slurm not installed, say), it is a failure.
    if [[ $slurm_status -eq 0 ]] && grep -q '^➜ Suite "Slurm (real' "$log"; then
        echo "Slurm tests: the real-Slurm suite was skipped (its reason is above)"
        slurm_status=1
    fi
else
    echo "Slurm tests: SKIPPED (a Slurm cluster on namespace hosts needs root; uid $(id -u)) - not counted as a pass"
    slurm_status=0
fi

# The fuzz smoke: every libFuzzer target over FTCore for 12 s (about a minute
# in all); a crash fails the test command (fuzz/run keeps the input).
echo "test: fuzz smoke (fuzz/run --seconds 12)"
set +e
./fuzz/run --seconds 12
fuzz_status=$?
set -e
echo "fuzz smoke: $([[ $fuzz_status -eq 0 ]] && echo passed || echo "FAILED (exit $fuzz_status)")"

# The Python package against the debug binaries just built (a real ft-smp per test).
echo "test: running pytest (python/tests)"
set +e
FT_BIN="$(swift build --show-bin-path)" FT_WORKER_LIB="$(swift build --show-bin-path)/libFTWorkerC.so" \
    "${PYTHON:-python3}" -m pytest -q python/tests
py_status=$?
set -e
echo "pytest: $([[ $py_status -eq 0 ]] && echo passed || echo "FAILED (exit $py_status)")"

# The chaos smoke subset against real jobs, with the debug binaries just built;
# then the PyTorch example losing a node (4 nodes x 1 worker, RS(3+1)), checked
# against its uninterrupted run.
echo "test: chaos smoke (chaos/run --smoke)"
set +e
FT_BIN="$(swift build --show-bin-path)" ./chaos/run --smoke --steps 200
chaos_status=$?
echo "test: chaos on network-namespace hosts (chaos/run --hosts netns: a node killed, the network scenarios)"
if [[ $(id -u) -eq 0 ]]; then
    FT_BIN="$(swift build --show-bin-path)" ./chaos/run --hosts netns --steps 200 --scenario kill-node --scenario partition-node \
        --scenario partition-coordinator --scenario slow-link --scenario flapping-link
    netns_status=$?
else
    echo "chaos on netns hosts: SKIPPED (network namespaces need root; uid $(id -u)) - not counted as a pass"
    netns_status=0
fi
echo "test: the PyTorch example loses a node (chaos/run --worker torch --scenario kill-node)"
FT_BIN="$(swift build --show-bin-path)" ./chaos/run --worker torch --scenario kill-node --steps 120
torch_status=$?
set -e
echo "Slurm tests: $([[ $slurm_status -eq 0 ]] && echo passed || echo "FAILED (exit $slurm_status)")"
echo "chaos smoke: $([[ $chaos_status -eq 0 ]] && echo passed || echo "FAILED (exit $chaos_status)")"
echo "chaos on netns hosts: $([[ $netns_status -eq 0 ]] && echo passed || echo "FAILED (exit $netns_status)")"
echo "torch kill-node: $([[ $torch_status -eq 0 ]] && echo passed || echo "FAILED (exit $torch_status)")"
for s in $status $slurm_status $fuzz_status $py_status $chaos_status $netns_status $torch_status; do
    if [[ $s -ne 0 ]]; then exit "$s"; fi
done

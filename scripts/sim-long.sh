#!/usr/bin/env bash
# The seeded simulations' long run (the test command runs 500 seeds of each):
# N seeds of one plane's simulation from a release build of the tests (about
# ten times a debug build's speed), in chunks, JOBS processes side by side.
# A chunk stops at its first failing seed, which it prints with a one-line
# replay command; a chunk over --chunk-timeout is reported (a seed that never
# ends is a bug too); either makes the script exit 1. Summary lines go to
# stdout, each chunk's log to OUT.
#
#   scripts/sim-long.sh --plane data --seeds 100000 --first 501 --jobs 2
#
# Options (defaults): --plane data|control (data), --seeds N (100000),
# --first S (501: the test command runs 1-500), --chunk N (2500 seeds per
# process), --jobs J (2), --chunk-timeout SECONDS (1800), --out DIR
# (/tmp/ft-sim-long).
set -euo pipefail
cd "$(dirname "$0")/.."

plane=data seeds=100000 first=501 chunk=2500 jobs=2 timeout_s=1800 out=/tmp/ft-sim-long
while [[ $# -gt 0 ]]; do
    case $1 in
        --plane) plane=$2; shift 2 ;;
        --seeds) seeds=$2; shift 2 ;;
        --first) first=$2; shift 2 ;;
        --chunk) chunk=$2; shift 2 ;;
        --jobs) jobs=$2; shift 2 ;;
        --chunk-timeout) timeout_s=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        -h|--help) sed -n '2,/^set -e/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "sim-long: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
for v in seeds first chunk jobs timeout_s; do
    name=$v; [[ $v == timeout_s ]] && name=chunk-timeout
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || { echo "sim-long: --$name takes a positive integer, not '${!v}'" >&2; exit 2; }
done
case $plane in
    data) filter=ECSimulationTests/manySeeds ;;
    control) filter=ControlSimulationTests/manySeeds ;;
    *) echo "sim-long: --plane is data or control, not '$plane'" >&2; exit 2 ;;
esac

echo "sim-long: building the tests in release (-enable-testing, .build-simrel)"
swift build -c release --build-tests -Xswiftc -enable-testing --build-path .build-simrel 2>&1 | { grep -v '^\[' || true; }
bin=.build-simrel/release/ftPackageTests.xctest
mkdir -p "$out"
export bin filter out timeout_s
started=$(date +%s)
seq "$first" "$chunk" $((first + seeds - 1)) | xargs -P "$jobs" -I{} bash -c '
    s={}; n=$(( '"$first"' + '"$seeds"' - s )); (( n > '"$chunk"' )) && n='"$chunk"'
    t0=$(date +%s)
    FT_SIM_FIRST_SEED=$s FT_SIM_SEEDS=$n timeout "$timeout_s" "$bin" --testing-library swift-testing --filter "$filter" > "$out/$s.log" 2>&1
    rc=$?
    summary=$(grep -o "[a-z-]*-plane simulation: .*" "$out/$s.log" | head -1 | cut -c1-160)
    if [[ $rc -eq 0 ]]; then
        echo "seeds $s-$((s + n - 1)): passed in $(( $(date +%s) - t0 )) s; $summary"
        exit 0
    elif [[ $rc -eq 124 ]]; then
        echo "seeds $s-$((s + n - 1)): TIMED OUT after $timeout_s s (log $out/$s.log)"
    else
        seed=$(grep -o "seed [0-9]* (replay[^)]*)[^;]*" "$out/$s.log" | head -1)
        echo "seeds $s-$((s + n - 1)): FAILED (exit $rc): ${seed:-no failing seed named, see the log} (log $out/$s.log)"
    fi
    exit 1
' || failed=1
echo "sim-long: $seeds seeds from $first ($plane plane) in $(( $(date +%s) - started )) s; logs in $out"
if [[ -n ${failed:-} ]]; then
    echo "sim-long: some chunks failed or timed out (above)" >&2
    exit 1
fi

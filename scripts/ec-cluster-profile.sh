#!/bin/bash
# Where the time of `ft-bench ec-cluster --hosts netns` goes: a system-wide
# perf profile (cpu-clock at 499 Hz, CLOCK_REALTIME timestamps) of the job,
# cut into the windows its SMP logs give (each round from the first node's
# "staged" to the last node's "committed"; the rebuild of n1), and summed by
# process role and by what the CPU ran, in CPU milliseconds (2 cores: a
# window of t seconds has 2t CPU-seconds, idle included); and the bytes the
# hosts' links carried in each window (every veth on the bridges, sampled
# every 0.2 s), against the payload one round or rebuild has to move.
#   scripts/ec-cluster-profile.sh [MIB] [OUTDIR]   (root, perf, a release build)
set -euo pipefail
MIB=${1:-256}
OUT=${2:-/tmp/ec-cluster-profile}
REPO=$(cd "$(dirname "$0")/.." && pwd)
HZ=499
mkdir -p "$OUT"
FT_KEEP_BENCH_DIRS=1 "$REPO/.build/release/ft-bench" ec-cluster --hosts netns --codes 3+1 --sizes-mib "$MIB" --json \
    > "$OUT/bench.json" 2> "$OUT/progress.log" &
BENCH=$!
JOB=/tmp/ft-bench-ec-$BENCH-31-$MIB
# Bytes each of the job's hosts sent (its link's rx on the bridge side) and
# received, every 0.2 s, for the links the job's netns record names; builtins only.
(
    while kill -0 $BENCH 2>/dev/null; do
        t=$EPOCHREALTIME
        if [ -s "$JOB/netns" ]; then
            while read -r kind name; do
                [ "$kind" = link ] && [ -e "/sys/class/net/$name" ] || continue
                read -r rx < "/sys/class/net/$name/statistics/rx_bytes" 2>/dev/null || continue
                read -r tx < "/sys/class/net/$name/statistics/tx_bytes" 2>/dev/null || continue
                echo "$t $name $rx $tx"
            done < "$JOB/netns"
        fi
        sleep 0.2
    done
) > "$OUT/links.txt" &
SAMPLER=$!
until grep -q ": the job" "$OUT/progress.log" || ! kill -0 $BENCH 2>/dev/null; do sleep 0.2; done
perf record -k CLOCK_REALTIME -a -F $HZ -o "$OUT/perf.data" 2> "$OUT/perf-record.log" &
PERF=$!
until grep -q "raw TCP between namespaces" "$OUT/progress.log" || ! kill -0 $BENCH 2>/dev/null; do sleep 0.2; done
kill -INT $PERF
wait $PERF || true
wait $BENCH
wait $SAMPLER || true
perf script -i "$OUT/perf.data" -F comm,pid,time,ip,sym,dso 2>/dev/null > "$OUT/samples.txt"
python3 - "$JOB" "$OUT/samples.txt" $HZ "$OUT/links.txt" "$OUT/bench.json" $MIB <<'PY'
import collections, datetime, json, re, sys
job, samples, hz, links, bench, mib = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6]
figures = json.load(open(bench))["figures"]
payload = {"round": figures[f"round_mb_rs3_1_{mib}mib"] / 1e3, "rebuild": figures[f"rebuild_mb_rs3_1_{mib}mib"] / 1e3}
counters = collections.defaultdict(list)  # link -> [(time, rx, tx)]
for line in open(links):
    p = line.split()
    if len(p) == 4: counters[p[1]].append((float(p[0]), int(p[2]), int(p[3])))
def sent(lo, hi):
    # Bytes the hosts sent between the last sample at or before lo and the first at or after hi.
    total = 0
    for series in counters.values():
        before = [s for s in series if s[0] <= lo]
        after = [s for s in series if s[0] >= hi]
        if before and after: total += after[0][1] - before[-1][1]
    return total / 1e9
def epoch(ts):
    return datetime.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=datetime.timezone.utc).timestamp()
roles = {}
for line in open(f"{job}/job.pids"):
    role, pid = line.split()
    roles[pid] = "coordinator" if role == "coordinator" else "launcher" if role == "launcher" else "smp"
for line in open(f"{job}/pids/history"):
    _, role, pid = line.split()
    roles[pid] = "smp" if role == "smp" else "worker"
rounds, rebuild = {}, None
for n in range(4):
    for line in open(f"{job}/smp-n{n}.log"):
        ts = line.split(" ", 1)[0]
        m = re.search(r"staged_to_committed_ms=([\d.]+) .*round (\d+) committed", line)
        if m:
            end, r = epoch(ts), int(m.group(2))
            lo, hi = rounds.get(r, (end, end))
            rounds[r] = (min(lo, end - float(m.group(1)) / 1000), max(hi, end))
        m = re.search(r" ms=(\d+) .*rebuilt node", line)
        if m:
            rebuild = (epoch(ts) - int(m.group(1)) / 1000, epoch(ts))
windows = [(f"round {r}", w) for r, w in sorted(rounds.items()) if r <= 3] + [("rebuild of n1", rebuild)]
def what(dso, sym):
    if "libsodium" in dso: return "CURVE crypto (libsodium)"
    if "kernel" in dso:
        if "clear_page" in sym: return "kernel: zeroing pages on first touch"
        if re.search(r"copy_(to|from)_iter|copy_user|rep_movs", sym): return "kernel: copies to/from socket buffers"
        if "halt" in sym or "idle" in sym: return "idle"
        return "kernel: TCP/IP, scheduling, other"
    if "libzmq" in dso: return "libzmq"
    if "libisal" in dso: return "ISA-L CRC32C" if "crc32" in sym else "ISA-L fold/decode"
    if "libc" in dso:
        if "memmove" in sym or "memcpy" in sym: return "libc memcpy"
        if "memset" in sym: return "libc memset"
        return "libc other (malloc, ...)"
    return "Swift and other user code"
pattern = re.compile(r"^\s*(.+?)\s+(\d+)\s+(\d+\.\d+):\s+\S+\s+(.*)\s+\((.*)\)\s*$")
parsed = []
for line in open(samples):
    m = pattern.match(line)
    if m: parsed.append((float(m.group(3)), m.group(1), m.group(2), m.group(4), m.group(5)))
for name, (lo, hi) in windows:
    by = collections.Counter()
    for t, comm, pid, sym, dso in parsed:
        if not lo <= t <= hi: continue
        w = what(dso, sym)
        if w == "idle" or comm == "swapper": who = "idle"
        elif pid in roles:
            who = roles[pid]
            if who == "smp": who = "smp: ZMQ I/O thread" if comm.startswith("ZMQbg") else "smp: main and other threads"
        else: who = "not this job (other processes)"
        by[(who, "-" if who == "idle" else w)] += 1
    total = sum(by.values())
    print(f"== {name}: {hi - lo:.3f} s window, {2 * (hi - lo) * 1000:.0f} CPU-ms on 2 cores, {total} samples = {total * 1000 / hz:.0f} CPU-ms")
    kind = "rebuild" if name.startswith("rebuild") else "round"
    print(f"  links: the hosts sent {sent(lo, hi):.2f} GB in the window; a {kind}'s payload is {payload[kind]:.2f} GB")
    for (who, w), c in by.most_common():
        if c * 1000 / hz >= 5: print(f"  {c * 1000 / hz:8.0f} ms  {100 * c / total:5.1f}%  {who:32s} {w}")
    print()
PY

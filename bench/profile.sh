#!/usr/bin/env bash
# Where the hot path's CPU goes: fencegate pinned alone on one core (one data-plane thread) in
# front of nginx `return 200`, under wrk -t1 -c64 on the other core, as bench/run.sh's pinned setup.
#
#   bench/profile.sh [BINARY|nginx] [put|get] [SECONDS]
#
# `nginx` profiles the baseline instead: nginx proxy_pass with one worker, in the same place.
# Prints system calls and CPU time per request (perf stat), then the top symbols of a perf
# profile (self time) and the share of each object, and leaves perf.data in the scratch directory
# it names. With BENCH_WAKEUPS=1 it also counts, system-wide and per CPU, the wake-ups, context
# switches and wake-up IPIs per request: on a VM an IPI that wakes an idle CPU costs the sender
# microseconds, and how often the load generator's CPU goes idle follows the proxy's own speed.
# BENCH_LOAD_CPUS=0,1 BENCH_PROXY_CPUS=0,1 BENCH_PROXY_WORKERS=2 profiles bench/run.sh's shared
# setup instead (fencegate only: nginx's workers are separate processes).
# BINARY defaults
# to a build with frame pointers and line tables in /tmp/fp-target, made if missing:
#   CARGO_TARGET_DIR=/tmp/fp-target RUSTFLAGS="-C force-frame-pointers=yes" \
#     CARGO_PROFILE_RELEASE_DEBUG=line-tables-only cargo build --release
# Needs perf (`apt-get install linux-perf`), wrk, nginx, taskset, curl and python3.
set -euo pipefail
cd "$(dirname "$0")/.."
BINARY=${1:-/tmp/fp-target/release/fencegate}
METHOD=${2:-put}
SECONDS_=${3:-8}
LOAD_CPUS=${BENCH_LOAD_CPUS:-0}
PROXY_CPUS=${BENCH_PROXY_CPUS:-1}
PROXY_WORKERS=${BENCH_PROXY_WORKERS:-1}
UPSTREAM_PORT=18291
FENCEGATE_PORT=18293
ADMIN_PORT=18294
if [ "$BINARY" != nginx ] && [ ! -x "$BINARY" ]; then
    CARGO_TARGET_DIR=/tmp/fp-target RUSTFLAGS="-C force-frame-pointers=yes" \
        CARGO_PROFILE_RELEASE_DEBUG=line-tables-only cargo build --release
fi
for tool in perf wrk nginx taskset curl python3; do
    command -v "$tool" >/dev/null || { echo "bench/profile.sh: $tool is missing" >&2; exit 2; }
done
WORK=$(mktemp -d /tmp/fencegate-profile.XXXXXX)
KEEP_WORK=1
# shellcheck source=bench/lib.sh
. bench/lib.sh
trap cleanup EXIT

start_nginx upstream bench/nginx/upstream.conf "$UPSTREAM_PORT" "$LOAD_CPUS"
if [ "$BINARY" = nginx ]; then
    start_nginx proxy bench/nginx/proxy.conf "$FENCEGATE_PORT" "$PROXY_CPUS"
    # The one worker process does all the work.
    FENCEGATE_PID=$(pgrep -f "nginx: worker process" -P "$(cat "$WORK/proxy.pid")")
else
    start_fencegate_binary "$BINARY" "$WORK/fg.db" hot-only
fi
URL="http://127.0.0.1:$FENCEGATE_PORT/r/hot"
curl -fsS -o /dev/null -X PUT -H 'Fencing-Token: 1' "$URL"
script=bench/wrk/$METHOD.lua
load() { taskset -c "$LOAD_CPUS" wrk -t1 -c64 -d"$1s" --timeout 5s -s "$script" "$URL" | sed -n 's/^WRK_JSON //p'; }
load 2 >/dev/null

requests_of() { python3 -c 'import json,sys; print(json.load(sys.stdin)["requests"])'; }
echo "--- perf stat, $METHOD, ${SECONDS_}s"
perf stat -x, -e raw_syscalls:sys_enter,task-clock -p "$FENCEGATE_PID" \
    -o "$WORK/stat.csv" -- sleep "$SECONDS_" &
stat_pid=$!
requests=$(load "$SECONDS_" | requests_of)
wait "$stat_pid"
python3 - "$WORK/stat.csv" "$requests" <<'PY'
import sys
requests = int(sys.argv[2])
values = {}
for line in open(sys.argv[1]):
    fields = line.strip().split(",")
    if len(fields) > 2 and fields[0] and fields[0][0].isdigit():
        values[fields[2]] = float(fields[0])
print(f"requests {requests}")
syscalls = values.get("raw_syscalls:sys_enter", 0)
print(f"syscalls per request {syscalls / requests:.2f}")
if "task-clock" in values:  # milliseconds
    print(f"CPU per request {values['task-clock'] * 1000 / requests:.2f} us")
PY
if [ "${BENCH_WAKEUPS:-0}" = 1 ]; then
    echo "--- wake-ups per request, system-wide, $METHOD, ${SECONDS_}s"
    perf stat -a -A -x, -o "$WORK/wakeups.csv" \
        -e sched:sched_wakeup,context-switches,irq_vectors:call_function_single_entry,irq_vectors:reschedule_entry \
        -- sleep "$SECONDS_" &
    stat_pid=$!
    requests=$(load "$SECONDS_" | requests_of)
    wait "$stat_pid"
    python3 - "$WORK/wakeups.csv" "$requests" <<'PY'
import sys
requests = int(sys.argv[2])
print(f"requests {requests}")
for line in open(sys.argv[1]):
    fields = line.strip().split(",")
    if len(fields) > 3 and fields[0].startswith("CPU") and fields[1][:1].isdigit():
        cpu, count, event = fields[0], float(fields[1]), fields[3]
        print(f"{cpu} {event.split(':')[-1]:28} {count / requests:.4f} per request")
PY
fi
echo "--- perf record, $METHOD, ${SECONDS_}s"
perf record -F 2999 -g --call-graph fp -o "$WORK/perf.data" -p "$FENCEGATE_PID" -- sleep "$SECONDS_" 2>/dev/null &
record_pid=$!
load "$SECONDS_" >/dev/null
wait "$record_pid"
perf report -i "$WORK/perf.data" --no-children --sort symbol --percent-limit 0.7 --stdio 2>/dev/null |
    grep -E '^ +[0-9]' | head -45 | cut -c1-120
echo "--- by object (kernel, the proxy, libc, vdso)"
perf report -i "$WORK/perf.data" --no-children --sort dso --stdio 2>/dev/null | grep -E '^ +[0-9]' | head -6
echo "perf.data: $WORK/perf.data"

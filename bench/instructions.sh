#!/usr/bin/env bash
# User-space instructions per request on the hot path, counted by callgrind: a figure that does
# not move with the machine's noise, for a change too small for bench/compare.sh to see (that
# one's rounds vary by 2%).
#
#   bench/instructions.sh [BINARY|nginx] [TOP]
#
# Runs BINARY (default target/release/fencegate) under valgrind's callgrind, one data-plane
# thread, in front of nginx `return 200`; warms it up, zeroes the counters, sends fenced PUTs
# with the current token (wrk -t1 -c8 for BENCH_DURATION seconds, default 3, the same requests
# as bench/run.sh's), then dumps the counters and prints the instructions per request of the
# whole process and the TOP (default 30) functions by their own instructions. `nginx` counts
# nginx proxy_pass instead (one worker, no master process), in front of the same upstream.
#
# Only user space is counted: system calls, the kernel's TCP work and waiting are not, so this
# is the part of bench/profile.sh's CPU time that fencegate's own code decides. Needs valgrind
# (`apt-get install valgrind`), wrk, nginx, curl and python3. BENCH_CALLGRIND_OUT=FILE keeps the
# callgrind dump, for `callgrind_annotate --inclusive=yes FILE`.
set -euo pipefail
cd "$(dirname "$0")/.."
BINARY=${1:-target/release/fencegate}
TOP=${2:-30}
DURATION=${BENCH_DURATION:-3}
UPSTREAM_PORT=18491
PROXY_PORT=18493
ADMIN_PORT=18494
PROXY_WORKERS=1
for tool in valgrind callgrind_control wrk nginx curl python3; do
    command -v "$tool" >/dev/null || { echo "bench/instructions.sh: $tool is missing" >&2; exit 2; }
done
[ "$BINARY" = nginx ] || [ -x "$BINARY" ] || { echo "bench/instructions.sh: no $BINARY (cargo build --release)" >&2; exit 2; }
WORK=$(mktemp -d /tmp/fencegate-instructions.XXXXXX)
# shellcheck source=bench/lib.sh
. bench/lib.sh
trap cleanup EXIT

start_nginx upstream bench/nginx/upstream.conf "$UPSTREAM_PORT" "0-$(($(nproc) - 1))"
CALLGRIND=(valgrind --tool=callgrind --dump-instr=no "--callgrind-out-file=$WORK/callgrind.out")
if [ "$BINARY" = nginx ]; then
    mkdir -p "$WORK/proxy-body" "$WORK/proxy-temp"
    render bench/nginx/proxy.conf "$WORK/proxy.conf" "$PROXY_PORT"
    # One process that does the work, as fencegate's one thread.
    sed -i 's/^daemon off;/daemon off;\nmaster_process off;/' "$WORK/proxy.conf"
    "${CALLGRIND[@]}" nginx -c "$WORK/proxy.conf" -e "$WORK/proxy-error.log" 2>"$WORK/valgrind.log" &
else
    cat >"$WORK/fencegate.toml" <<EOF
listen = "127.0.0.1:$PROXY_PORT"
admin_listen = "127.0.0.1:$ADMIN_PORT"
database = "$WORK/fg.db"
worker_threads = 1

[[routes]]
path = "/r/{id}"
upstream = "http://127.0.0.1:$UPSTREAM_PORT"
resource = "r:{id}"
EOF
    "${CALLGRIND[@]}" "$BINARY" serve --config "$WORK/fencegate.toml" 2>"$WORK/valgrind.log" &
fi
PID=$!
PIDS+=("$PID")
URL="http://127.0.0.1:$PROXY_PORT/r/hot"
# Valgrind takes seconds to start.
for _ in $(seq 1 300); do
    curl -fsS -o /dev/null -X PUT -H 'Fencing-Token: 1' "$URL" 2>/dev/null && break
    sleep 0.1
done
load() { wrk -t1 -c8 -d"$1s" --timeout 10s -s bench/wrk/put.lua "$URL" | sed -n 's/^WRK_JSON //p'; }
load 1 >/dev/null
callgrind_control --zero "$PID" >/dev/null 2>&1
requests=$(load "$DURATION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["requests"])')
callgrind_control --dump "$PID" >/dev/null 2>&1
# The dump is written as callgrind.out.1 by the process itself.
for _ in $(seq 1 100); do [ -s "$WORK/callgrind.out.1" ] && break; sleep 0.1; done
[ -z "${BENCH_CALLGRIND_OUT:-}" ] || cp "$WORK/callgrind.out.1" "$BENCH_CALLGRIND_OUT"

python3 - "$WORK/callgrind.out.1" "$requests" "$TOP" <<'PY'
import collections, re, sys
path, requests, top = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
names, own = {}, collections.Counter()
function, after_call = None, False
def name_of(field):
    match = re.match(r"\((\d+)\)(?: (.*))?", field)
    if not match:
        return field
    if match.group(2):
        names[match.group(1)] = match.group(2)
    return names.get(match.group(1), field)
for line in open(path):
    if line.startswith("fn="):
        function = name_of(line[3:].strip())
    elif line.startswith("cfn="):
        name_of(line[4:].strip())
    elif line.startswith("calls="):
        after_call = True  # the next cost line is the callee's, not this function's own
    elif line[:1].isdigit() or line[:1] in "+-*":
        fields = line.split()
        if len(fields) >= 2:
            if not after_call:
                own[function] += int(fields[1])
            after_call = False
total = sum(own.values())
print(f"requests {requests}")
print(f"instructions per request {total / requests:.0f}")
print(f"--- top {top} functions, own instructions per request")
for function, count in own.most_common(top):
    print(f"{count / requests:8.0f} {count / total:6.1%}  {function[:110]}")
PY

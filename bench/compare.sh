#!/usr/bin/env bash
# Compares two fencegate builds on the hot path, for a change that must not slow it down:
#
#   bench/compare.sh BEFORE_BINARY AFTER_BINARY [ROUNDS]
#
# For example, the commit before a change against the working tree:
#
#   git worktree add /tmp/before HEAD~1 && (cd /tmp/before && cargo build --release)
#   cargo build --release
#   bench/compare.sh /tmp/before/target/release/fencegate target/release/fencegate 5
#
# Each round measures, one after the other on the same pinned cores, fenced PUTs with the current
# token (wrk -t1 -c64, BENCH_DURATION seconds, default 5) through nginx proxy_pass, the BEFORE build
# and the AFTER build, all in front of the same nginx `return 200`; the order of the two builds
# alternates between rounds. It prints each round's req/s and ratios to nginx, then the medians.
# Needs wrk, nginx, taskset and python3, like bench/run.sh (same pinning: BENCH_LOAD_CPUS,
# BENCH_PROXY_CPUS).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { sed -n '2,17p' "$0" >&2; exit 2; }
BEFORE=$(realpath "$1")
AFTER=$(realpath "$2")
ROUNDS=${3:-5}
DURATION=${BENCH_DURATION:-5}
LOAD_CPUS=${BENCH_LOAD_CPUS:-0}
PROXY_CPUS=${BENCH_PROXY_CPUS:-1}
[ "$(nproc)" -ge 2 ] || PROXY_CPUS=${BENCH_PROXY_CPUS:-0}
PROXY_WORKERS=$(taskset -c "$PROXY_CPUS" nproc)
UPSTREAM_PORT=18191
NGINX_PORT=18192
FENCEGATE_PORT=18193
ADMIN_PORT=18194

for tool in wrk nginx taskset python3 curl; do
    command -v "$tool" >/dev/null || { echo "bench/compare.sh: $tool is missing" >&2; exit 2; }
done

WORK=$(mktemp -d /tmp/fencegate-compare.XXXXXX)
# shellcheck source=bench/lib.sh
. bench/lib.sh
trap cleanup EXIT

# Prints the req/s of fenced PUTs through the fencegate at BINARY.
measure_fencegate() { # binary
    rm -f "$WORK"/fg.db*
    start_fencegate_binary "$1" "$WORK/fg.db" hot-only
    local pid=$FENCEGATE_PID
    curl -fsS -o /dev/null -X PUT -H 'Fencing-Token: 1' "http://127.0.0.1:$FENCEGATE_PORT/r/hot"
    measure "http://127.0.0.1:$FENCEGATE_PORT/r/hot"
    kill -TERM "$pid"
    wait "$pid" || true
}

measure() { # url
    taskset -c "$LOAD_CPUS" wrk -t1 -c64 -d2s --timeout 5s -s bench/wrk/put.lua "$1" >/dev/null
    taskset -c "$LOAD_CPUS" wrk -t1 -c64 -d"${DURATION}s" --timeout 5s -s bench/wrk/put.lua "$1" |
        sed -n 's/^WRK_JSON //p' |
        python3 -c 'import json,sys; s=json.load(sys.stdin); print(round(s["requests"] / (s["duration_us"] / 1e6)))'
}

start_nginx upstream bench/nginx/upstream.conf "$UPSTREAM_PORT" "$LOAD_CPUS"
start_nginx proxy bench/nginx/proxy.conf "$NGINX_PORT" "$PROXY_CPUS"

results=()
for round in $(seq 1 "$ROUNDS"); do
    nginx_rate=$(measure "http://127.0.0.1:$NGINX_PORT/r/hot")
    if [ $((round % 2)) -eq 1 ]; then
        before_rate=$(measure_fencegate "$BEFORE")
        after_rate=$(measure_fencegate "$AFTER")
    else
        after_rate=$(measure_fencegate "$AFTER")
        before_rate=$(measure_fencegate "$BEFORE")
    fi
    echo "round $round: nginx $nginx_rate req/s, before $before_rate, after $after_rate"
    results+=("$nginx_rate $before_rate $after_rate")
done

printf '%s\n' "${results[@]}" | python3 -c '
import statistics, sys
rows = [list(map(float, line.split())) for line in sys.stdin if line.strip()]
median = lambda xs: statistics.median(xs)
print(f"median of {len(rows)} rounds:")
print(f"  before / nginx  {median([b / n for n, b, a in rows]):.3f}")
print(f"  after  / nginx  {median([a / n for n, b, a in rows]):.3f}")
print(f"  after  / before {median([a / b for n, b, a in rows]):.3f}")
'

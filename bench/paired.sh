#!/usr/bin/env bash
# fencegate against nginx proxy_pass at the same moment, on the same cores: a ratio that a noisy
# machine does not move.
#
#   bench/paired.sh [BINARY] [ROUNDS]
#
# bench/compare.sh measures the proxies one after the other, so a virtual machine whose speed
# drifts between rounds (steal time, a neighbour's load) moves its ratios by tens of percent.
# Here both proxies run pinned to the same core (two with BENCH_SETUP=shared), each saturated by
# its own wrk -t1 -c64 (fenced PUTs with the current token, as bench/run.sh's), both at once: the
# scheduler shares the cores between them, and whatever slows the machine slows both. Each round prints both rates and each
# proxy's CPU time per request (user + system, from /proc, over the same seconds); the medians of
# fencegate / nginx end the run. With the core shared evenly the rate ratio is the inverse of the
# CPU ratio. Latency is not measured here: two proxies sharing a core delay each other, so a p99
# taken at the same moment says more about the scheduler than about either (bench/run.sh
# measures it in turn).
#
# BINARY defaults to target/release/fencegate; ROUNDS to 5; BENCH_DURATION (seconds per round)
# to 5. BENCH_REQUESTS=get measures unfenced GETs instead (bench/wrk/get.lua).
# BENCH_SETUP=shared asks bench/run.sh's shared setup the same way: two workers for each proxy,
# and both proxies, both load generators and the upstream on CPUs 0,1. BENCH_PAIRED_JSON=FILE
# also writes the medians there (bench/run.sh reads them). Needs wrk, nginx, taskset, curl and
# python3.
set -euo pipefail
cd "$(dirname "$0")/.."
BINARY=$(realpath "${1:-target/release/fencegate}")
ROUNDS=${2:-5}
DURATION=${BENCH_DURATION:-5}
REQUESTS=${BENCH_REQUESTS:-put}
LOAD_CPUS=${BENCH_LOAD_CPUS:-0}
PROXY_CPUS=${BENCH_PROXY_CPUS:-1}
[ "$(nproc)" -ge 2 ] || PROXY_CPUS=${BENCH_PROXY_CPUS:-0}
PROXY_WORKERS=1
SETUP=${BENCH_SETUP:-pinned}
case $SETUP in
    pinned) ;;
    shared)
        [ "$(nproc)" -ge 2 ] || { echo "bench/paired.sh: the shared setup needs two cores" >&2; exit 2; }
        LOAD_CPUS=0,1 PROXY_CPUS=0,1 PROXY_WORKERS=2
        ;;
    *) echo "bench/paired.sh: BENCH_SETUP is pinned or shared" >&2; exit 2 ;;
esac
UPSTREAM_PORT=18291
NGINX_PORT=18292
FENCEGATE_PORT=18293
ADMIN_PORT=18294

for tool in wrk nginx taskset python3 curl; do
    command -v "$tool" >/dev/null || { echo "bench/paired.sh: $tool is missing" >&2; exit 2; }
done
[ -x "$BINARY" ] || { echo "bench/paired.sh: no $BINARY (cargo build --release)" >&2; exit 2; }

WORK=$(mktemp -d /tmp/fencegate-paired.XXXXXX)
# shellcheck source=bench/lib.sh
. bench/lib.sh
trap cleanup EXIT

start_nginx upstream bench/nginx/upstream.conf "$UPSTREAM_PORT" "$LOAD_CPUS"
start_nginx proxy bench/nginx/proxy.conf "$NGINX_PORT" "$PROXY_CPUS"
NGINX_PID=${PIDS[-1]}
start_fencegate_binary "$BINARY" "$WORK/fg.db" hot-only
curl -fsS -o /dev/null -X PUT -H 'Fencing-Token: 1' "http://127.0.0.1:$FENCEGATE_PORT/r/hot"

load() { # port seconds output
    taskset -c "$LOAD_CPUS" wrk -t1 -c64 -d"$2s" --timeout 5s -s "bench/wrk/$REQUESTS.lua" \
        "http://127.0.0.1:$1/r/hot" | sed -n 's/^WRK_JSON //p' >"$3"
}

both() { # seconds: both loads at once
    load "$NGINX_PORT" "$1" "$WORK/nginx.json" &
    local nginx_load=$!
    load "$FENCEGATE_PORT" "$1" "$WORK/fencegate.json" &
    wait "$nginx_load" $!
}

both 2 # warm-up
for round in $(seq 1 "$ROUNDS"); do
    nginx_before=$(cpu_seconds "$NGINX_PID")
    fencegate_before=$(cpu_seconds "$FENCEGATE_PID")
    both "$DURATION"
    nginx_after=$(cpu_seconds "$NGINX_PID")
    fencegate_after=$(cpu_seconds "$FENCEGATE_PID")
    python3 - "$WORK" "$round" "$nginx_before" "$nginx_after" "$fencegate_before" \
        "$fencegate_after" <<'EOF' | tee -a "$WORK/rounds"
import json, sys
work, round_ = sys.argv[1], sys.argv[2]
nb, na, fb, fa = map(float, sys.argv[3:7])
def load(name):
    s = json.load(open(f"{work}/{name}.json"))
    return s["requests"], s["requests"] / (s["duration_us"] / 1e6)
n_requests, n_rate = load("nginx")
f_requests, f_rate = load("fencegate")
n_cpu = (na - nb) / n_requests * 1e6
f_cpu = (fa - fb) / f_requests * 1e6
print(f"round {round_}: nginx {n_rate:.0f} req/s {n_cpu:.2f} us/req, "
      f"fencegate {f_rate:.0f} req/s {f_cpu:.2f} us/req, "
      f"rate ratio {f_rate / n_rate:.3f}, cpu ratio {f_cpu / n_cpu:.3f}")
EOF
done
python3 - "$WORK/rounds" "$SETUP" "$REQUESTS" "${BENCH_PAIRED_JSON:-}" <<'EOF'
import json, re, statistics, sys
rounds, setup, requests, out = sys.argv[1:]
rows = [line for line in open(rounds) if line.startswith("round")]
def median(pattern):
    return statistics.median(float(re.search(pattern, row).group(1)) for row in rows)
summary = {
    "setup": setup,
    "requests": requests,
    "rounds": len(rows),
    "throughput_vs_nginx": median(r"rate ratio ([\d.]+)"),
    "cpu_per_request_vs_nginx": median(r"cpu ratio ([\d.]+)"),
    "nginx_per_s": median(r"nginx ([\d.]+) req/s"),
    "fencegate_per_s": median(r"fencegate ([\d.]+) req/s"),
    "nginx_cpu_us": median(r"nginx [\d.]+ req/s ([\d.]+) us/req"),
    "fencegate_cpu_us": median(r"fencegate [\d.]+ req/s ([\d.]+) us/req"),
}
print(f"median of {len(rows)} rounds, fencegate / nginx, at the same moment on the same cores ({setup}):")
print(f"  throughput        {summary['throughput_vs_nginx']:.3f}")
print(f"  CPU per request   {summary['cpu_per_request_vs_nginx']:.3f}")
if out:
    with open(out, "w") as f:
        json.dump(summary, f)
EOF

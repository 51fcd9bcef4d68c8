#!/usr/bin/env bash
# TLS on the data plane (issue 18), in one run on this machine, on a release build, each figure a
# ratio to nginx doing the same in the same round:
#
#   1. HTTPS -> HTTP: fenced PUTs with the current token over keep-alive HTTPS connections, the
#      proxy speaking plain HTTP to the upstream (nginx `return 200`): req/s at saturation (wrk),
#      CPU time per request, and p99 at 50% of saturation (oha, latency-corrected);
#   2. HTTPS -> HTTPS: the same, with the upstream serving HTTPS too (nginx `listen ssl`), the proxy
#      verifying it and keeping its connections alive (nginx: proxy_ssl_verify, keepalive 256);
#   3. handshakes per second: every request on a new connection (`Connection: close`), so each
#      is a full TLS handshake (ECDSA P-256, TLS 1.3, no resumption on either side).
#
# Both proxies use the same certificate and key, made here with openssl, and run pinned alone on
# BENCH_PROXY_CPUS (default core 1) with one worker (thread or process) per core there; wrk, oha and
# the upstreams share BENCH_LOAD_CPUS (default core 0). Rounds alternate which proxy goes first and
# the report gives medians.
#
# Knobs: BENCH_DURATION (seconds per measurement, default 5), BENCH_ROUNDS (default 3),
# BENCH_CONNECTIONS (default 64), BENCH_OUT (default bench/results).
# Needs wrk, oha, nginx (with ssl: Debian's has it), openssl, taskset, curl and python3.
# Writes bench/results/tls.json and bench/results/tls.md.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${BENCH_DURATION:-5}
ROUNDS=${BENCH_ROUNDS:-3}
CONNECTIONS=${BENCH_CONNECTIONS:-64}
OUT=${BENCH_OUT:-bench/results}
LOAD_CPUS=${BENCH_LOAD_CPUS:-0}
PROXY_CPUS=${BENCH_PROXY_CPUS:-1}
[ "$(nproc)" -ge 2 ] || PROXY_CPUS=${BENCH_PROXY_CPUS:-0}
PROXY_WORKERS=$(taskset -c "$PROXY_CPUS" nproc)
UPSTREAM_PORT=18281
UPSTREAM_TLS_PORT=18282
NGINX_PORT=18283
FENCEGATE_PORT=18284
ADMIN_PORT=18285

for tool in wrk oha nginx openssl taskset curl python3; do
    command -v "$tool" >/dev/null || {
        echo "bench/tls.sh: $tool is missing (see the comment at the top of this script)" >&2
        exit 2
    }
done

cargo build --release --locked --quiet --bin fencegate
BIN=$PWD/target/release/fencegate
WORK=$(mktemp -d /tmp/fencegate-tls-bench.XXXXXX)
RAW=$WORK/raw.jsonl
: >"$RAW"
# shellcheck source=bench/lib.sh
. bench/lib.sh
trap cleanup EXIT
log() { printf '%s %s\n' "$(date +%T)" "$*" >&2; }

# ---------------------------------------------------------------------------------------------
# Certificates: a CA, and one server certificate for 127.0.0.1 and localhost that both proxies
# and the TLS upstream present.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=bench-ca \
    -keyout "$WORK/ca.key" -out "$WORK/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=localhost \
    -keyout "$WORK/server.key" -out "$WORK/server.csr" 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' >"$WORK/san.ext"
openssl x509 -req -in "$WORK/server.csr" -CA "$WORK/ca.pem" -CAkey "$WORK/ca.key" -CAcreateserial \
    -days 2 -extfile "$WORK/san.ext" -out "$WORK/server.crt" 2>/dev/null

# The upstreams: `return 200`, plain and over TLS, on the load cores.
cat >"$WORK/upstream.conf" <<EOF
worker_processes 1;
daemon off;
pid $WORK/upstream.pid;
error_log $WORK/upstream-error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $WORK/upstream-body;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    server {
        listen 127.0.0.1:$UPSTREAM_PORT reuseport backlog=4096;
        listen 127.0.0.1:$UPSTREAM_TLS_PORT ssl reuseport backlog=4096;
        ssl_certificate $WORK/server.crt;
        ssl_certificate_key $WORK/server.key;
        location / { return 200 "ok\n"; }
    }
}
EOF
# nginx as the TLS-terminating proxy: /r/ to the plain upstream, /s/ to the TLS one, verified.
cat >"$WORK/proxy.conf" <<EOF
worker_processes $PROXY_WORKERS;
daemon off;
pid $WORK/proxy.pid;
error_log $WORK/proxy-error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $WORK/proxy-body;
    proxy_temp_path $WORK/proxy-temp;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    upstream storage { server 127.0.0.1:$UPSTREAM_PORT; keepalive 256; keepalive_requests 10000000; }
    upstream storage_tls { server 127.0.0.1:$UPSTREAM_TLS_PORT; keepalive 256; keepalive_requests 10000000; }
    server {
        listen 127.0.0.1:$NGINX_PORT ssl reuseport backlog=4096;
        ssl_certificate $WORK/server.crt;
        ssl_certificate_key $WORK/server.key;
        ssl_session_tickets off;
        ssl_session_cache off;
        location /r/ {
            proxy_pass http://storage;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
        location /s/ {
            proxy_pass https://storage_tls;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate $WORK/ca.pem;
            proxy_ssl_name localhost;
            proxy_ssl_server_name on;
            proxy_ssl_session_reuse on;
        }
    }
}
EOF
write_tls_config "$WORK/fencegate.toml" "$WORK/fencegate.db"
cat >>"$WORK/fencegate.toml" <<EOF

[[routes]]
path = "/s/{id}"
upstream = "https://localhost:$UPSTREAM_TLS_PORT"
upstream_ca = "$WORK/ca.pem"
resource = "s:{id}"
EOF
mkdir -p "$WORK/upstream-body" "$WORK/proxy-body" "$WORK/proxy-temp"
taskset -c "$LOAD_CPUS" nginx -c "$WORK/upstream.conf" -e "$WORK/upstream-error.log" >/dev/null 2>&1 &
PIDS+=($!)
wait_for_port "$UPSTREAM_PORT"
taskset -c "$PROXY_CPUS" nginx -c "$WORK/proxy.conf" -e "$WORK/proxy-error.log" >/dev/null 2>&1 &
PIDS+=($!)
NGINX_PID=$!
wait_for_port "$NGINX_PORT"
taskset -c "$PROXY_CPUS" "$BIN" serve --config "$WORK/fencegate.toml" 2>>"$WORK/fencegate.log" &
FENCEGATE_PID=$!
PIDS+=("$FENCEGATE_PID")
wait_for_port "$FENCEGATE_PORT"
declare -A PORT=([nginx]=$NGINX_PORT [fencegate]=$FENCEGATE_PORT)
declare -A CPU_PID=([nginx]=$NGINX_PID [fencegate]=$FENCEGATE_PID)
for path in r s; do
    curl -fsS --cacert "$WORK/ca.pem" -o /dev/null -X PUT -H 'Fencing-Token: 1' \
        "https://localhost:$FENCEGATE_PORT/$path/hot"
    curl -fsS --cacert "$WORK/ca.pem" -o /dev/null -X PUT -H 'Fencing-Token: 1' \
        "https://localhost:$NGINX_PORT/$path/hot"
done

# wrk's scripts: a fenced PUT with the current token, and the same on a new connection each time.
cat >"$WORK/put.lua" <<'EOF'
wrk.method = "PUT"
wrk.headers["Fencing-Token"] = "1"
done = dofile("bench/wrk/report.lua")
EOF
cat >"$WORK/handshake.lua" <<'EOF'
wrk.method = "PUT"
wrk.headers["Fencing-Token"] = "1"
wrk.headers["Connection"] = "close"
done = dofile("bench/wrk/report.lua")
EOF



run_wrk() { # script url seconds
    taskset -c "$LOAD_CPUS" wrk -t1 -c"$CONNECTIONS" -d"$3s" --timeout 5s -s "$1" "$2" |
        sed -n 's/^WRK_JSON //p'
}

measure() { # round scenario target script path
    local url="https://127.0.0.1:${PORT[$3]}/$5/hot"
    run_wrk "$4" "$url" 2 >/dev/null # warm-up
    log "round $1: $2 via $3"
    local before after saturation rate
    before=$(cpu_seconds "${CPU_PID[$3]}")
    saturation=$(run_wrk "$4" "$url" "$DURATION")
    after=$(cpu_seconds "${CPU_PID[$3]}")
    record round="$1" scenario="$2" target="$3" tool=wrk \
        cpu_seconds="$(python3 -c "print($after - $before)")" -- "$saturation"
    [ "$2" = handshakes ] && return 0
    rate=$(python3 -c 'import json,sys; s=json.loads(sys.argv[1]); print(max(1, int(s["requests"] / (s["duration_us"] / 1e6) / 2)))' "$saturation")
    record round="$1" scenario="$2" target="$3" tool=oha rate="$rate" -- "$(
        taskset -c "$LOAD_CPUS" oha --no-tui --output-format json --insecure -z "${DURATION}s" \
            -c "$CONNECTIONS" -q "$rate" --latency-correction -m PUT -H "Fencing-Token: 1" "$url"
    )"
}

log "release build ready; load on CPU $LOAD_CPUS, proxies on CPU $PROXY_CPUS ($PROXY_WORKERS worker(s) each)"
for round in $(seq 1 "$ROUNDS"); do
    order=(nginx fencegate)
    [ $((round % 2)) -eq 0 ] && order=(fencegate nginx)
    for target in "${order[@]}"; do
        measure "$round" https_to_http "$target" "$WORK/put.lua" r
        measure "$round" https_to_https "$target" "$WORK/put.lua" s
        measure "$round" handshakes "$target" "$WORK/handshake.lua" r
    done
done

mkdir -p "$OUT"
python3 - "$RAW" "$OUT" "$ROUNDS" "$DURATION" "$CONNECTIONS" <<'EOF'
import json, statistics, sys
raw, out, rounds, duration, connections = sys.argv[1:]
rows = [json.loads(line) for line in open(raw)]
def rate(r):
    return r["requests"] / (r["duration_us"] / 1e6)
def pick(scenario, target, tool):
    return [r for r in rows if r["scenario"] == scenario and r["target"] == target and r["tool"] == tool]
def p99_ms(r):
    return r["latencyPercentiles"]["p99"] * 1000
summary = {}
lines = [
    "# TLS on the data plane against nginx (bench/tls.sh)",
    "",
    f"{rounds} rounds of {duration} s, wrk -t1 -c{connections}, medians; proxies pinned alone on one core.",
    "",
    "| measurement | nginx | fencegate | fencegate / nginx |",
    "|---|---:|---:|---:|",
]
for scenario, label in [("https_to_http", "HTTPS -> HTTP, fenced PUT"),
                        ("https_to_https", "HTTPS -> HTTPS, fenced PUT"),
                        ("handshakes", "handshakes (a new connection per PUT)")]:
    entry = {}
    for target in ["nginx", "fencegate"]:
        runs = pick(scenario, target, "wrk")
        entry[target] = {
            "req_per_s": statistics.median(rate(r) for r in runs),
            "cpu_us_per_request": statistics.median(
                float(r["cpu_seconds"]) / r["requests"] * 1e6 for r in runs),
        }
        latency = pick(scenario, target, "oha")
        if latency:
            entry[target]["p99_ms_at_half_load"] = statistics.median(p99_ms(r) for r in latency)
    per_round = [rate(f) / rate(n) for n, f in zip(pick(scenario, "nginx", "wrk"), pick(scenario, "fencegate", "wrk"))]
    entry["ratio_median"] = statistics.median(per_round)
    entry["ratio_per_round"] = per_round
    summary[scenario] = entry
    n, f = entry["nginx"], entry["fencegate"]
    unit = "handshakes/s" if scenario == "handshakes" else "req/s"
    lines.append(f"| {label}: {unit} | {n['req_per_s']:,.0f} | {f['req_per_s']:,.0f} | {entry['ratio_median']:.2f} |")
    lines.append(f"| {label}: CPU µs per request | {n['cpu_us_per_request']:.1f} | {f['cpu_us_per_request']:.1f} | {f['cpu_us_per_request'] / n['cpu_us_per_request']:.2f} |")
    if "p99_ms_at_half_load" in n:
        lines.append(f"| {label}: p99 at 50% load, ms | {n['p99_ms_at_half_load']:.2f} | {f['p99_ms_at_half_load']:.2f} | {f['p99_ms_at_half_load'] / n['p99_ms_at_half_load']:.2f} |")
json.dump(summary, open(f"{out}/tls.json", "w"), indent=2)
open(f"{out}/tls.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF

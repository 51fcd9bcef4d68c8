#!/usr/bin/env bash
# The performance benchmark of issue 5, in one run on this machine, on a release build:
#
#   1. throughput, latency and CPU time per request of fenced PUTs (current token: the hot path)
#      and plain GETs, against the upstream directly, nginx proxy_pass, fencegate, and the bare
#      hyper proxy of examples/hyper_floor.rs (hyper's server and pooled client with nothing else),
#      all in front of the same nginx `return 200`; wrk finds saturation, oha measures latency
#      (latency-corrected) with every proxy at the same rate, 50% of the saturation of the slower
#      of nginx and fencegate; CPU time is the process's own (/proc, user + system) over the wrk
#      run, divided by its requests. Twice: with the proxy pinned alone on one core, and in the
#      outside check's setup, two threads for each proxy and everything sharing two cores. Then
#      the throughput and CPU ratios again, both proxies at the same moment (bench/paired.sh), in
#      both setups: on a virtual machine whose speed drifts, the ratios taken in turn move by
#      ±0.1 between runs, these by a few hundredths;
#   2. durable epoch advances per second;
#   3. audited rejections per second (a zombie storm);
#   4. RSS once 1,000,000 distinct resources have been seen;
#   5. start-up time with those 1,000,000 resources in the database;
#   6. the storage profiles (etcd-v3, couchdb, s3): a single-key write through each against the same
#      call through a path route, and a 100-key bulk write (etcd txn, _bulk_docs, DeleteObjects);
#   7. TLS: bench/tls.sh (HTTPS -> HTTP, HTTPS -> HTTPS and handshakes per second against nginx),
#      unless BENCH_TLS=0; it also needs openssl.
#
# Writes bench/results/run.json and bench/results/run.md (and tls.json, tls.md). Needs wrk, oha, nginx, taskset, curl and
# python3 (`apt-get install wrk nginx-light curl util-linux`, `cargo install oha --locked`).
#
# Pinning: on a machine with two or more cores, the proxy under test (nginx proxy_pass or
# fencegate) runs alone on BENCH_PROXY_CPUS (default: core 1); the load generator and the upstream
# share BENCH_LOAD_CPUS (default: core 0). nginx gets one worker per proxy core and fencegate one
# worker thread per proxy core, so both proxies have the same CPU and the same parallelism.
#
# The shared setup needs two cores; on one it is skipped.
#
# Usage: bench/run.sh [BINARY]. BINARY is the fencegate under test, by default the release build
# (made first); bench/pgo.sh's target/pgo/fencegate is the fastest. The report names it.
#
# Knobs (environment): BENCH_DURATION (seconds per measurement, default 10), BENCH_LATENCY_ROUNDS
# (oha runs per target, default 3), BENCH_PAIRED_ROUNDS and BENCH_PAIRED_DURATION (bench/paired.sh's
# rounds, default 5 of 5 s), BENCH_CONNECTIONS (default 64), BENCH_FILL_RESOURCES (default
# 1000000), BENCH_OUT (default bench/results).
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${BENCH_DURATION:-10}
export BENCH_LATENCY_ROUNDS=${BENCH_LATENCY_ROUNDS:-3} # report.py reads it too
LATENCY_ROUNDS=$BENCH_LATENCY_ROUNDS
PAIRED_ROUNDS=${BENCH_PAIRED_ROUNDS:-5}
CONNECTIONS=${BENCH_CONNECTIONS:-64}
FILL=${BENCH_FILL_RESOURCES:-1000000}
OUT=${BENCH_OUT:-bench/results}
if [ "$(nproc)" -ge 2 ]; then
    LOAD_CPUS=${BENCH_LOAD_CPUS:-0}
    PROXY_CPUS=${BENCH_PROXY_CPUS:-1}
else
    LOAD_CPUS=${BENCH_LOAD_CPUS:-0}
    PROXY_CPUS=${BENCH_PROXY_CPUS:-0}
fi
PROXY_WORKERS=$(taskset -c "$PROXY_CPUS" nproc)
UPSTREAM_PORT=18181
NGINX_PORT=18182
FENCEGATE_PORT=18183
ADMIN_PORT=18184
FLOOR_PORT=18185

for tool in wrk oha nginx taskset curl python3; do
    command -v "$tool" >/dev/null || {
        echo "bench/run.sh: $tool is missing (see the comment at the top of this script)" >&2
        exit 2
    }
done

cargo build --release --locked --quiet --bin fencegate --example hyper_floor
BIN=$(realpath "${1:-target/release/fencegate}")
[ -x "$BIN" ] || { echo "bench/run.sh: no $BIN" >&2; exit 2; }
export BENCH_BUILD=${1:+the binary \`$1\`}
FLOOR=$PWD/target/release/examples/hyper_floor
WORK=$(mktemp -d /tmp/fencegate-bench.XXXXXX)
RAW=$WORK/raw.jsonl
: >"$RAW"
# shellcheck source=bench/lib.sh
. bench/lib.sh
trap cleanup EXIT

log() { printf '%s %s\n' "$(date +%T)" "$*" >&2; }


start_fencegate() { # database
    start_fencegate_binary "$BIN" "$1"
}

stop_fencegate() {
    kill -TERM "$FENCEGATE_PID"
    wait "$FENCEGATE_PID" || true
}

metric() { # name: a counter or gauge from fencegate's /metrics, summed over its labels
    curl -fsS "http://127.0.0.1:$ADMIN_PORT/metrics" |
        awk -v name="$1" '$1 == name || index($1, name "{") == 1 { sum += $2 } END { print sum + 0 }'
}

# wrk at saturation: prints its WRK_JSON object.
run_wrk() { # script url [seconds]
    taskset -c "$LOAD_CPUS" wrk -t1 -c"$CONNECTIONS" -d"${3:-$DURATION}s" --timeout 5s -s "$1" "$2" |
        sed -n 's/^WRK_JSON //p'
}

# oha at a fixed rate, with latency correction: prints its JSON summary.
run_oha() { # method url rate
    local extra=()
    if [ "$1" = PUT ]; then extra=(-H "Fencing-Token: 1"); fi
    taskset -c "$LOAD_CPUS" oha --no-tui --output-format json -z "${DURATION}s" -c "$CONNECTIONS" \
        -q "$3" --latency-correction -m "$1" "${extra[@]}" "$2"
}

# ---------------------------------------------------------------------------------------------
log "release build ready; load on CPU $LOAD_CPUS, proxies on CPU $PROXY_CPUS ($PROXY_WORKERS worker(s) each)"
start_nginx upstream bench/nginx/upstream.conf "$UPSTREAM_PORT" "$LOAD_CPUS"
UPSTREAM_PID=${PIDS[-1]}
start_nginx proxy bench/nginx/proxy.conf "$NGINX_PORT" "$PROXY_CPUS"
NGINX_PID=${PIDS[-1]}
start_fencegate "$WORK/hot.db"
taskset -c "$PROXY_CPUS" "$FLOOR" "127.0.0.1:$FLOOR_PORT" "127.0.0.1:$UPSTREAM_PORT" "$PROXY_WORKERS" &
PIDS+=($!)
FLOOR_PID=$!
wait_for_port "$FLOOR_PORT"

declare -A URL=(
    [direct]="http://127.0.0.1:$UPSTREAM_PORT/r/hot"
    [nginx]="http://127.0.0.1:$NGINX_PORT/r/hot"
    [hyper]="http://127.0.0.1:$FLOOR_PORT/r/hot"
    [fencegate]="http://127.0.0.1:$FENCEGATE_PORT/r/hot"
)
# The hot resource's first token, so every measured PUT carries the current token.
curl -fsS -o /dev/null -X PUT -H 'Fencing-Token: 1' "${URL[fencegate]}"


# Throughput (with CPU time per request) and latency of each target: `measure PREFIX TARGET...`,
# with URL and CPU_PID (the process whose CPU time a target costs) filled in. Latency is taken
# LATENCY_ROUNDS times, the targets in turn within each round, and reported as medians: on a
# virtual machine one p99 at half load moves by several times between runs. The upstream alone is
# sent half its own saturation; every proxy the same rate (below).
measure() {
    local prefix=$1
    shift
    local -A half
    for method in PUT GET; do
        script=bench/wrk/${method,,}.lua
        for target in "$@"; do
            run_wrk "$script" "${URL[$target]}" 3 >/dev/null # warm-up: connections, pools, caches
            log "wrk $method $target ${prefix%_}"
            cpu_before=$(cpu_seconds "${CPU_PID[$target]}")
            saturation=$(run_wrk "$script" "${URL[$target]}")
            cpu_after=$(cpu_seconds "${CPU_PID[$target]}")
            record scenario="${prefix}throughput" method="$method" target="$target" tool=wrk \
                cpu_seconds="$(python3 -c "print($cpu_after - $cpu_before)")" -- "$saturation"
            half[$target]=$(python3 -c 'import json,sys; s=json.loads(sys.argv[1]); print(max(1, int(s["requests"] / (s["duration_us"] / 1e6) / 2)))' "$saturation")
        done
        # Every proxy at the same rate, half the slower of nginx's and fencegate's saturation (the
        # bare hyper proxy is only a reference, and gets that rate too), so that their p99s
        # answer one question: how long a request waits at this load. (Half of each one's own
        # saturation sent the faster proxy more requests, and on a machine whose speed drifts a
        # rate found in a fast moment could be most of its capacity in a slow one.)
        local proxies_rate=
        for target in "$@"; do
            case $target in nginx | fencegate) ;; *) continue ;; esac
            if [ -z "$proxies_rate" ] || [ "${half[$target]}" -lt "$proxies_rate" ]; then
                proxies_rate=${half[$target]}
            fi
        done
        for round in $(seq 1 "$LATENCY_ROUNDS"); do
            for target in "$@"; do
                local rate=$proxies_rate
                [ "$target" = direct ] && rate=${half[direct]}
                log "oha $method $target at $rate req/s ${prefix%_} (round $round)"
                record scenario="${prefix}latency" method="$method" target="$target" tool=oha \
                    rate="$rate" round="$round" -- "$(run_oha "$method" "${URL[$target]}" "$rate")"
            done
        done
    done
}

declare -A CPU_PID=([direct]=$UPSTREAM_PID [nginx]=$NGINX_PID [hyper]=$FLOOR_PID [fencegate]=$FENCEGATE_PID)
measure "" direct nginx hyper fencegate

# The outside check's setup: two threads for each proxy (two nginx workers, worker_threads = 2)
# and everything (wrk, oha, the upstream, the proxy) sharing both cores, nothing pinned apart.
repin_upstream() { # cpus
    for pid in "$UPSTREAM_PID" $(cat "/proc/$UPSTREAM_PID/task/$UPSTREAM_PID/children"); do
        taskset -a -p -c "$1" "$pid" >/dev/null
    done
}
if [ "$(nproc)" -ge 2 ]; then
    SHARED_CPUS=0,1
    repin_upstream "$SHARED_CPUS"
    pinned=("$WORK" "$PROXY_CPUS" "$PROXY_WORKERS" "$FENCEGATE_PORT" "$ADMIN_PORT" "$FENCEGATE_PID" "$LOAD_CPUS")
    WORK=$WORK/shared PROXY_CPUS=$SHARED_CPUS PROXY_WORKERS=2 FENCEGATE_PORT=18186 ADMIN_PORT=18187
    mkdir -p "$WORK"
    start_nginx proxy bench/nginx/proxy.conf 18188 "$SHARED_CPUS"
    CPU_PID[nginx]=${PIDS[-1]}
    start_fencegate_binary "$BIN" "$WORK/shared.db" hot-only
    CPU_PID[fencegate]=$FENCEGATE_PID
    URL[nginx]="http://127.0.0.1:18188/r/hot"
    URL[fencegate]="http://127.0.0.1:18186/r/hot"
    curl -fsS -o /dev/null -X PUT -H 'Fencing-Token: 1' "${URL[fencegate]}"
    LOAD_CPUS=$SHARED_CPUS
    measure shared_ direct nginx fencegate
    kill -TERM "${CPU_PID[fencegate]}" "${CPU_PID[nginx]}"
    WORK=${pinned[0]} PROXY_CPUS=${pinned[1]} PROXY_WORKERS=${pinned[2]} FENCEGATE_PORT=${pinned[3]}
    ADMIN_PORT=${pinned[4]} FENCEGATE_PID=${pinned[5]} LOAD_CPUS=${pinned[6]}
    repin_upstream "$LOAD_CPUS"
fi

# The same ratios at the same moment (bench/paired.sh: nginx and fencegate on the same cores, each
# saturated by its own wrk, both at once), which a machine whose speed drifts between the rounds
# above does not move: the throughput targets are judged on these.
for setup in pinned shared; do
    [ "$setup" = pinned ] || [ "$(nproc)" -ge 2 ] || continue
    for requests in put get; do
        log "paired $setup $requests"
        BENCH_SETUP=$setup BENCH_REQUESTS=$requests BENCH_DURATION=${BENCH_PAIRED_DURATION:-5} \
            BENCH_PAIRED_JSON=$WORK/paired.json bench/paired.sh "$BIN" "$PAIRED_ROUNDS" >&2
        record scenario=paired -- "$(cat "$WORK/paired.json")"
    done
done

# Storage profiles: one etcd put through the etcd-v3 profile (the body read, its key decoded) against
# the same call through a plain path route, and a 100-key transaction (100 gates per request).
for target in plain_put etcd_put etcd_txn100 couch_plain_put couch_put couch_bulk100 \
    s3_plain_put s3_put s3_delete100; do
    script=bench/wrk/$target.lua
    run_wrk "$script" "http://127.0.0.1:$FENCEGATE_PORT/" 3 >/dev/null
    log "wrk profile $target"
    record scenario=profile target="$target" -- "$(run_wrk "$script" "http://127.0.0.1:$FENCEGATE_PORT/")"
done

# Durable epoch advances: every request is a new token for its resource.
log "epoch advances"
before=$(metric fencegate_epoch_advances_total)
advances=$(run_wrk bench/wrk/advance.lua "http://127.0.0.1:$FENCEGATE_PORT/")
after=$(metric fencegate_epoch_advances_total)
record scenario=advances counted_advances=$((after - before)) -- "$advances"

# Audited rejections: raise the zombie resources first, then storm them with token 1.
log "zombie storm"
for i in $(seq 0 99); do
    curl -fsS -o /dev/null -X PUT -H 'Fencing-Token: 1000' "http://127.0.0.1:$FENCEGATE_PORT/r/zombie$i"
done
before=$(metric fencegate_requests_rejected_total)
rejections=$(run_wrk bench/wrk/zombie.lua "http://127.0.0.1:$FENCEGATE_PORT/")
after=$(metric fencegate_requests_rejected_total)
stop_fencegate
audited=$(python3 -c 'import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute("select count(*) from rejections").fetchone()[0])' "$WORK/hot.db")
record scenario=rejections counted_rejections=$((after - before)) audit_rows="$audited" -- "$rejections"

# RSS with FILL distinct resources, on a fresh database and process.
log "filling $FILL distinct resources"
rm -f "$WORK"/fill.db*
start_fencegate "$WORK/fill.db"
idle_rss=$(awk '/^VmRSS/ { print $2 }' "/proc/$FENCEGATE_PID/status")
BENCH_FILL_RESOURCES=$FILL taskset -c "$LOAD_CPUS" wrk -t1 -c"$CONNECTIONS" -d600s --timeout 5s \
    -s bench/wrk/fill.lua "http://127.0.0.1:$FENCEGATE_PORT/" >"$WORK/fill.out" &
filler=$!
started=$(date +%s.%N)
while [ "$(metric fencegate_resources_resident)" -lt "$FILL" ]; do
    if ! kill -0 "$filler" 2>/dev/null; then
        echo "bench/run.sh: the fill ended before $FILL resources were resident" >&2
        exit 1
    fi
    sleep 0.5
done
filled=$(date +%s.%N)
kill -INT "$filler"
wait "$filler" || true
sleep 1
read -r rss hwm < <(awk '/^VmRSS/ { r = $2 } /^VmHWM/ { h = $2 } END { print r, h }' "/proc/$FENCEGATE_PID/status")
resident=$(metric fencegate_resources_resident)
record scenario=memory resources="$resident" idle_rss_kib="$idle_rss" rss_kib="$rss" hwm_kib="$hwm" \
    fill_seconds="$(python3 -c "print(round($filled - $started, 1))")" -- '{}'
stop_fencegate

# Start-up with the filled database: from exec to /readyz answering 200, five times.
log "start-up with $(python3 -c 'import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute("select count(*) from resources").fetchone()[0])' "$WORK/fill.db") resources stored"
startup=$(python3 - "$BIN" "$WORK/fencegate.toml" "$ADMIN_PORT" "$FENCEGATE_PORT" "$PROXY_CPUS" <<'EOF'
import json, os, signal, subprocess, sys, time, urllib.request
binary, config, admin, data, cpus = sys.argv[1:]
def get(url, **kw):
    try:
        return urllib.request.urlopen(urllib.request.Request(url, **kw), timeout=5).status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None
ready, first = [], []
rows = 0
for _ in range(5):
    start = time.perf_counter()
    proc = subprocess.Popen(["taskset", "-c", cpus, binary, "serve", "--config", config],
                            stderr=subprocess.DEVNULL)
    while get(f"http://127.0.0.1:{admin}/readyz") != 200:
        if proc.poll() is not None:
            sys.exit("fencegate exited during start-up")
        time.sleep(0.002)
    ready.append(time.perf_counter() - start)
    # The first fenced request for a stored resource: a zombie, refused by the stored highest.
    status = get(f"http://127.0.0.1:{data}/r/fill7", method="PUT", headers={"Fencing-Token": "0"})
    first.append(time.perf_counter() - start)
    assert status == 409, status
    proc.send_signal(signal.SIGTERM)
    proc.wait()
print(json.dumps({"ready_s": sorted(ready), "first_409_s": sorted(first)}))
EOF
)
record scenario=startup -- "$startup"

mkdir -p "$OUT"
python3 bench/report.py "$RAW" "$OUT" "$PROXY_CPUS" "$LOAD_CPUS" "$PROXY_WORKERS" "$CONNECTIONS" "$DURATION"
log "wrote $OUT/run.json and $OUT/run.md"

# 7. TLS on the data plane (HTTPS -> HTTP, HTTPS -> HTTPS, handshakes per second) against nginx
#    doing the same: bench/tls.sh, on its own ports, into $OUT/tls.md. BENCH_TLS=0 skips it.
if [ "${BENCH_TLS:-1}" != 0 ]; then
    BENCH_OUT=$OUT bench/tls.sh
    log "wrote $OUT/tls.json and $OUT/tls.md"
fi

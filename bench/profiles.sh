#!/usr/bin/env bash
# The storage profiles' cost, alone (the same rows as section 6 of bench/run.sh, in a minute):
# for each profile, a single-key write through it against the same call through a plain path route,
# as a ratio in one run, and a 100-key bulk write (etcd txn, CouchDB _bulk_docs, S3 DeleteObjects).
# fencegate runs alone on one core, wrk and the upstream (nginx `return 200`) on the other.
#
#   bench/profiles.sh [ROUNDS]     # default 3 rounds; medians are printed
#
# Needs wrk, nginx, taskset, python3. Knobs: BENCH_DURATION (seconds per measurement, default 5),
# BENCH_CONNECTIONS (default 64).
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${1:-3}
DURATION=${BENCH_DURATION:-5}
CONNECTIONS=${BENCH_CONNECTIONS:-64}
LOAD_CPUS=${BENCH_LOAD_CPUS:-0}
PROXY_CPUS=${BENCH_PROXY_CPUS:-$([ "$(nproc)" -ge 2 ] && echo 1 || echo 0)}
PROXY_WORKERS=$(taskset -c "$PROXY_CPUS" nproc)
UPSTREAM_PORT=18181
FENCEGATE_PORT=18183
ADMIN_PORT=18184

cargo build --release --locked --quiet --bin fencegate
WORK=$(mktemp -d /tmp/fencegate-profiles.XXXXXX)
# shellcheck source=bench/lib.sh
. bench/lib.sh
trap cleanup EXIT

start_nginx upstream bench/nginx/upstream.conf "$UPSTREAM_PORT" "$LOAD_CPUS"
start_fencegate_binary "$PWD/target/release/fencegate" "$WORK/profiles.db"

targets=(plain_put etcd_put etcd_txn100 couch_plain_put couch_put couch_bulk100 s3_plain_put s3_put s3_delete100)
for round in $(seq 1 "$ROUNDS"); do
    for target in "${targets[@]}"; do
        script=bench/wrk/$target.lua
        [ "$round" -gt 1 ] || taskset -c "$LOAD_CPUS" wrk -t1 -c"$CONNECTIONS" -d2s -s "$script" \
            "http://127.0.0.1:$FENCEGATE_PORT/" >/dev/null
        taskset -c "$LOAD_CPUS" wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" --timeout 5s -s "$script" \
            "http://127.0.0.1:$FENCEGATE_PORT/" | sed -n "s/^WRK_JSON /$target /p" >>"$WORK/raw"
    done
done

python3 - "$WORK/raw" <<'PY'
import json, statistics, sys
rates = {}
for line in open(sys.argv[1]):
    target, data = line.split(" ", 1)
    row = json.loads(data)
    if row["non_2xx"] or row["timeouts"]:
        sys.exit(f"{target}: {row['non_2xx']} non-2xx answers, {row['timeouts']} timeouts")
    rates.setdefault(target, []).append(row["requests"] / (row["duration_us"] / 1e6))
m = {t: statistics.median(r) for t, r in rates.items()}
print(f"median of {len(rates['plain_put'])} rounds, requests/s (all answered 2xx)")
for name, single, plain, bulk, unit in [
    ("etcd-v3", "etcd_put", "plain_put", "etcd_txn100", "keys"),
    ("couchdb", "couch_put", "couch_plain_put", "couch_bulk100", "documents"),
    ("s3", "s3_put", "s3_plain_put", "s3_delete100", "keys"),
]:
    print(f"{name:8} single write {m[single]:9,.0f}/s = {m[single] / m[plain]:.2f} x path route "
          f"({m[plain]:,.0f}/s); 100-key bulk {m[bulk]:7,.0f}/s ({m[bulk] * 100:,.0f} {unit} fenced/s)")
PY

#!/usr/bin/env bash
# Cluster mode's costs, in one run on this machine, on a release build (issue 17):
#
#   1. same-token PUTs through the owner (a one-replica cluster, which owns every shard) against
#      single-node fencegate (SQLite), both pinned on BENCH_PROXY_CPUS, in alternating rounds;
#   2. the same PUTs sent to a replica that does not own the resource (one peer hop to the owner):
#      req/s as a ratio to (1), and CPU time per request of both replicas together;
#   3. durable epoch advances per second against PostgreSQL (group commit, fsync on);
#   4. unavailability after kill -9 of a replica: from the kill until a resource of one of its
#      shards is served again by the survivor, against lease_ttl + in_doubt_grace.
#
# Needs PostgreSQL (`apt-get install postgresql`; as root it runs as the `postgres` user), wrk,
# nginx, taskset, curl and python3. Writes bench/results/cluster.md. Knobs: BENCH_DURATION (seconds
# per measurement, default 10), BENCH_ROUNDS (rounds of steps 1 and 2, default 3), BENCH_CONNECTIONS
# (default 64), BENCH_OUT (default bench/results),
# BENCH_REPLICA_CPU (each replica's CPU cap in step 5, default 0.2).
#
#   5. scaling: 1 vs 3 replicas, each capped to BENCH_REPLICA_CPU of a core (cgroup CPU quota, so
#      that this 2-core machine can show what more replicas add), with same-token PUTs sent to each
#      resource's owner and sent to a replica at random (two in three then take a peer hop).
#      Needs root and a cgroup `cpu` controller (v1 or v2); skipped, and said so, without them.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${BENCH_DURATION:-10}
ROUNDS=${BENCH_ROUNDS:-3}
CONNECTIONS=${BENCH_CONNECTIONS:-64}
OUT=${BENCH_OUT:-bench/results}
LOAD_CPUS=${BENCH_LOAD_CPUS:-0}
PROXY_CPUS=${BENCH_PROXY_CPUS:-1}
[ "$(nproc)" -ge 2 ] || PROXY_CPUS=${BENCH_PROXY_CPUS:-0}
PROXY_WORKERS=1
UPSTREAM_PORT=18381
FENCEGATE_PORT=18383
ADMIN_PORT=18384
PG_PORT=18385
LEASE_TTL_MS=3000
GRACE_MS=1000

for tool in wrk nginx taskset curl python3; do
    command -v "$tool" >/dev/null || { echo "bench/cluster.sh: $tool is missing" >&2; exit 2; }
done
PG_BIN=${FENCEGATE_PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)}
[ -x "$PG_BIN/postgres" ] || { echo "bench/cluster.sh: PostgreSQL is missing (apt-get install postgresql)" >&2; exit 2; }

cargo build --release --locked --quiet --bin fencegate
BIN=$PWD/target/release/fencegate
WORK=$(mktemp -d /tmp/fencegate-cluster-bench.XXXXXX)
# shellcheck source=bench/lib.sh
. bench/lib.sh
trap cleanup EXIT
log() { printf '%s %s\n' "$(date +%T)" "$*" >&2; }

# initdb and postgres refuse to run as root: as root they run as the postgres user (setpriv execs,
# so the pid kept is the server's own).
AS_PG=()
if [ "$(id -u)" -eq 0 ]; then
    AS_PG=(setpriv --reuid=postgres --regid=postgres --init-groups --)
    chown postgres:postgres "$WORK"
fi
"${AS_PG[@]}" "$PG_BIN/initdb" --auth=trust --username=fencegate -D "$WORK/pg" >/dev/null
# fsync and synchronous_commit on (the defaults): advances are measured as durable as they are run.
taskset -c "$LOAD_CPUS" "${AS_PG[@]}" "$PG_BIN/postgres" -D "$WORK/pg" -p "$PG_PORT" \
    -c listen_addresses=127.0.0.1 -c unix_socket_directories="$WORK" 2>"$WORK/pg.log" &
PIDS+=($!)
wait_for_port "$PG_PORT"
sleep 1
PG_URL="postgres://fencegate@127.0.0.1:$PG_PORT/postgres"

start_nginx upstream bench/nginx/upstream.conf "$UPSTREAM_PORT" "$LOAD_CPUS"

run_wrk() { # script url
    taskset -c "$LOAD_CPUS" wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" --timeout 5s -s "$1" "$2" |
        sed -n 's/^WRK_JSON //p'
}
metric() { # admin_port name
    curl -fsS "http://127.0.0.1:$1/metrics" |
        awk -v name="$2" '$1 == name || index($1, name "{") == 1 { sum += $2 } END { print sum + 0 }'
}

REPLICA_PIDS=()
start_replica() { # name data_port admin_port peer_port cpus [cgroup.procs of a cgroup to run in]
    cat >"$WORK/$1.toml" <<EOF
listen = "127.0.0.1:$2"
admin_listen = "127.0.0.1:$3"
database = "$PG_URL"
worker_threads = 1
in_doubt_grace = "${GRACE_MS}ms"

[cluster]
replica = "$1"
peer_listen = "127.0.0.1:$4"
lease_ttl = "${LEASE_TTL_MS}ms"

[[routes]]
path = "/r/{id}"
upstream = "http://127.0.0.1:$UPSTREAM_PORT"
resource = "r:{id}"
EOF
    # In a cgroup: the shell enters it, then execs, so that every thread of the replica is in it.
    local enter=()
    [ -z "${6:-}" ] || enter=(sh -c 'echo $$ >"$0" && exec "$@"' "$6")
    taskset -c "$5" "${enter[@]}" "$BIN" serve --config "$WORK/$1.toml" 2>>"$WORK/$1.log" &
    REPLICA_PIDS+=($!)
    PIDS+=($!)
    wait_for_port "$2"
}
owned_by() { # admin_port replicas replica: once `replicas` live replicas own every shard, a resource id of `replica`
    python3 bench/shard_owners.py "$1" "$2" --find "$3"
}
put_script() { # id: a wrk script of same-token PUTs to /r/<id>
    sed "s|/r/hot|/r/$1|" bench/wrk/put.lua >"$WORK/put-$1.lua"
    echo "$WORK/put-$1.lua"
}

# 1 and 2. Same-token PUTs through a single node (SQLite) and through the owner of a one-replica
# cluster (PostgreSQL; it owns every shard: the same hot path plus cluster mode's bookkeeping), in
# alternating rounds, both running throughout so that each round measures them side by side.
start_fencegate_binary "$BIN" "$WORK/single.db" hot-only
curl -fsS -o /dev/null -X PUT -H 'Fencing-Token: 1' "http://127.0.0.1:$FENCEGATE_PORT/r/hot"
start_replica fg-a 18391 18392 18393 "$PROXY_CPUS"
A_PID=${REPLICA_PIDS[0]}
OWN_A=$(owned_by 18392 1 fg-a)
curl -fsS -o /dev/null -X PUT -H 'Fencing-Token: 1' "http://127.0.0.1:18391/r/$OWN_A"
for round in $(seq 1 "$ROUNDS"); do
    log "round $round of $ROUNDS: same-token PUTs, single node (SQLite), then the cluster's owner"
    run_wrk bench/wrk/put.lua "http://127.0.0.1:$FENCEGATE_PORT/r/hot" >"$WORK/single-$round.json"
    run_wrk "$(put_script "$OWN_A")" "http://127.0.0.1:18391/r/$OWN_A" >"$WORK/owner-$round.json"
done
kill -TERM "$FENCEGATE_PID"; wait "$FENCEGATE_PID" || true

log "durable advances against PostgreSQL"
before=$(metric 18392 fencegate_epoch_advances_total)
run_wrk bench/wrk/advance.lua "http://127.0.0.1:18391/" >"$WORK/advances.json"
after=$(metric 18392 fencegate_epoch_advances_total)
ADVANCES=$((after - before))

# 3. A second replica: requests for its shards sent to the first go one peer hop.
log "two replicas: same-token PUTs through a non-owner (one peer hop)"
start_replica fg-b 18394 18395 18396 "$PROXY_CPUS"
B_PID=${REPLICA_PIDS[1]}
OWN_B=$(owned_by 18392 2 fg-b)
curl -fsS -o /dev/null -X PUT -H 'Fencing-Token: 1' "http://127.0.0.1:18391/r/$OWN_B"
HOP_CPU_BEFORE=$(cpu_seconds "$A_PID" "$B_PID")
run_wrk "$(put_script "$OWN_B")" "http://127.0.0.1:18391/r/$OWN_B" >"$WORK/hop.json"
HOP_CPU_AFTER=$(cpu_seconds "$A_PID" "$B_PID")
cpu_owner_before=$(cpu_seconds "$B_PID")
run_wrk "$(put_script "$OWN_B")" "http://127.0.0.1:18394/r/$OWN_B" >"$WORK/direct.json"
cpu_owner_after=$(cpu_seconds "$B_PID")

# 4. kill -9 of the owner: how long until its resource is served again.
log "kill -9 of a replica: time until its shards serve again"
kill -KILL "$B_PID"
UNAVAILABLE_MS=$(python3 - "$OWN_B" <<'EOF'
import sys, time, urllib.request
start = time.monotonic()
while True:
    request = urllib.request.Request(f"http://127.0.0.1:18391/r/{sys.argv[1]}", method="PUT",
                                     headers={"Fencing-Token": "2"}, data=b"x")
    try:
        if urllib.request.urlopen(request, timeout=10).status == 200:
            break
    except Exception:
        pass
    time.sleep(0.01)
print(round((time.monotonic() - start) * 1000))
EOF
)

# 5. Scaling over replicas, each capped to a fraction of a core.
kill -TERM "$A_PID" 2>/dev/null; wait "$A_PID" 2>/dev/null || true
SCALING=none
CGROUPS=()
CGROUP_PROCS=
cpu_cgroup() { # name fraction: sets CGROUP_PROCS to a new capped cgroup's procs file, or to nothing
    # A 10 ms period: a capped replica waits at most that long for its next share of the core.
    local dir period=10000 quota
    quota=$(python3 -c "print(int($2 * $period))")
    CGROUP_PROCS=
    if [ -w /sys/fs/cgroup/cpu/cgroup.procs ] && [ -e /sys/fs/cgroup/cpu/cpu.cfs_quota_us ]; then
        dir=/sys/fs/cgroup/cpu/fencegate-bench-$1
        mkdir -p "$dir" && echo "$period" >"$dir/cpu.cfs_period_us" &&
            echo "$quota" >"$dir/cpu.cfs_quota_us" || return 0
    elif grep -qw cpu /sys/fs/cgroup/cgroup.controllers 2>/dev/null; then
        echo +cpu >/sys/fs/cgroup/cgroup.subtree_control 2>/dev/null || true
        dir=/sys/fs/cgroup/fencegate-bench-$1
        mkdir -p "$dir" && echo "$quota $period" >"$dir/cpu.max" || return 0
    else
        return 0
    fi
    CGROUPS+=("$dir")
    CGROUP_PROCS=$dir/cgroup.procs
}
remove_cgroups() {
    for dir in "${CGROUPS[@]}"; do rmdir "$dir" 2>/dev/null || true; done
}
capped_replica() { # name data_port admin_port peer_port
    cpu_cgroup "$1" "$REPLICA_CPU"
    start_replica "$@" "$PROXY_CPUS" "$CGROUP_PROCS"
}
load_three() { # label url1 ids1 url2 ids2 url3 ids3: three wrk, -c CONNECTIONS/3 each, at once
    local label=$1 i=0 loads=()
    shift
    while [ $# -gt 0 ]; do
        BENCH_IDS=$2 taskset -c "$LOAD_CPUS" wrk -t1 -c$((CONNECTIONS / 3)) -d"${DURATION}s" \
            --timeout 5s -s bench/wrk/put_ids.lua "$1" | sed -n 's/^WRK_JSON //p' >"$WORK/$label-$i.json" &
        loads+=($!)
        i=$((i + 1))
        shift 2
    done
    wait "${loads[@]}"
}
owners_of() { # admin_port replicas ids...: "owner id" per id, once `replicas` live replicas own every shard
    python3 bench/shard_owners.py "$@"
}
[ "$(id -u)" -ne 0 ] || cpu_cgroup probe 0.5
if [ -n "$CGROUP_PROCS" ]; then
    REPLICA_CPU=${BENCH_REPLICA_CPU:-0.2}
    IDS=$(seq -s, -f 's%g' 0 149)
    log "scaling: one replica capped to $REPLICA_CPU of a core"
    REPLICA_PIDS=()
    capped_replica fg-s1 18401 18402 18403
    owners_of 18402 1 s0 >/dev/null
    for id in ${IDS//,/ }; do
        curl -fsS -o /dev/null -X PUT -H 'Fencing-Token: 1' "http://127.0.0.1:18401/r/$id"
    done
    cpu_before=$(cpu_seconds "${REPLICA_PIDS[@]}")
    load_three scale-one http://127.0.0.1:18401/ "$IDS" http://127.0.0.1:18401/ "$IDS" http://127.0.0.1:18401/ "$IDS"
    cpu_after=$(cpu_seconds "${REPLICA_PIDS[@]}")
    echo "$cpu_before $cpu_after" >"$WORK/scale-one.cpu"
    log "scaling: three replicas capped to $REPLICA_CPU of a core each"
    capped_replica fg-s2 18411 18412 18413
    capped_replica fg-s3 18421 18422 18423
    owners_of 18402 3 ${IDS//,/ } >"$WORK/owners.txt"
    own() { awk -v r="$1" '$1 == r { print $2 }' "$WORK/owners.txt" | paste -sd,; }
    cpu_before=$(cpu_seconds "${REPLICA_PIDS[@]}")
    load_three scale-owner http://127.0.0.1:18401/ "$(own fg-s1)" http://127.0.0.1:18411/ "$(own fg-s2)" \
        http://127.0.0.1:18421/ "$(own fg-s3)"
    cpu_after=$(cpu_seconds "${REPLICA_PIDS[@]}")
    echo "$cpu_before $cpu_after" >"$WORK/scale-owner.cpu"
    cpu_before=$(cpu_seconds "${REPLICA_PIDS[@]}")
    load_three scale-random http://127.0.0.1:18401/ "$IDS" http://127.0.0.1:18411/ "$IDS" http://127.0.0.1:18421/ "$IDS"
    cpu_after=$(cpu_seconds "${REPLICA_PIDS[@]}")
    echo "$cpu_before $cpu_after" >"$WORK/scale-random.cpu"
    SCALING=$REPLICA_CPU
fi
for pid in "${REPLICA_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
wait "${REPLICA_PIDS[@]}" 2>/dev/null || true
remove_cgroups

python3 - "$WORK" "$OUT" "$ADVANCES" "$HOP_CPU_BEFORE" "$HOP_CPU_AFTER" "$cpu_owner_before" "$cpu_owner_after" "$UNAVAILABLE_MS" "$LEASE_TTL_MS" "$GRACE_MS" "$SCALING" <<'EOF'
import json, os, statistics, subprocess, sys, time
work, out = sys.argv[1], sys.argv[2]
advances, cb, ca, ob, oa, unavailable, ttl, grace, scaling = sys.argv[3:12]
def load(name):
    return json.load(open(os.path.join(work, name + ".json")))
def seconds(run):
    return run["duration_us"] / 1e6
def rate(run):
    # Only answered 2xx requests count: a benchmark of errors measures nothing.
    return (run["requests"] - run["non_2xx"]) / seconds(run)
hop, direct, adv = (load(n) for n in ["hop", "direct", "advances"])
rounds = sorted(int(f[len("single-"):-len(".json")]) for f in os.listdir(work) if f.startswith("single-"))
singles = [rate(load(f"single-{r}")) for r in rounds]
owners = [rate(load(f"owner-{r}")) for r in rounds]
ratios = [o / s for s, o in zip(singles, owners)]
hop_cpu_us = (float(ca) - float(cb)) / hop["requests"] * 1e6
direct_cpu_us = (float(oa) - float(ob)) / direct["requests"] * 1e6
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
lines = [
    "# fencegate cluster benchmark",
    "",
    f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, `{os.uname().nodename}`, {os.cpu_count()} cores, commit `{commit}`; reproduce with `bench/cluster.sh` (release build).",
    "Each fencegate pinned alone on the proxy core with one data-plane thread; wrk (-t1 -c64), the nginx `return 200` upstream and PostgreSQL 15 (fsync on) on the other.",
    "",
    "| measurement | figure |",
    "|---|---:|",
    f"| same-token PUT, single node (SQLite), median of {len(rounds)} rounds | {statistics.median(singles):,.0f} req/s |",
    f"| same-token PUT through the owner (cluster of one, PostgreSQL), median of {len(rounds)} rounds | {statistics.median(owners):,.0f} req/s, {statistics.median(ratios):.2f} x single node (rounds: {', '.join(f'{r:.2f}' for r in ratios)}) |",
    f"| same-token PUT through a non-owner (one peer hop) | {rate(hop):,.0f} req/s, {rate(hop)/rate(direct):.2f} x the same PUTs sent to the owner in this setup ({rate(direct):,.0f} req/s) |",
    f"| CPU per request, non-owner + owner together, one hop | {hop_cpu_us:.1f} us (owner alone, sent directly: {direct_cpu_us:.1f} us; the hop costs {hop_cpu_us - direct_cpu_us:.1f} us) |",
    f"| durable epoch advances against PostgreSQL (group commit) | {int(advances)/seconds(adv):,.0f}/s (p99 {adv.get('p99_us', 0):,} us) |",
    f"| unavailability after kill -9 of a replica | {int(unavailable):,} ms until its resource was served again (lease_ttl {int(ttl):,} ms + in_doubt_grace {int(grace):,} ms = {int(ttl) + int(grace):,} ms) |",
]
if scaling == "none":
    lines.append("| scaling over replicas capped by cgroup | not measured: needs root and a cgroup `cpu` controller |")
else:
    def combined(label):
        runs = [load(f"{label}-{i}") for i in range(3)]
        ok = sum(r["requests"] - r["non_2xx"] for r in runs)
        rate = sum((r["requests"] - r["non_2xx"]) / seconds(r) for r in runs)
        before, after = map(float, open(os.path.join(work, label + ".cpu")).read().split())
        return rate, (after - before) / max(ok, 1) * 1e6
    one, owner3, random3 = (combined(f"scale-{label}") for label in ["one", "owner", "random"])
    lines += [
        f"| 1 replica capped to {scaling} of a core, same-token PUTs over 150 resources | {one[0]:,.0f} req/s, {one[1]:.1f} us CPU per request |",
        f"| 3 replicas capped to {scaling} each, every request sent to its owner | {owner3[0]:,.0f} req/s, {owner3[0]/one[0]:.2f} x one replica, {owner3[1]:.1f} us CPU per request |",
        f"| 3 replicas capped to {scaling} each, requests sent to a replica at random | {random3[0]:,.0f} req/s, {random3[0]/one[0]:.2f} x one replica, {random3[1]:.1f} us CPU per request (2 in 3 take a hop) |",
    ]
os.makedirs(out, exist_ok=True)
open(os.path.join(out, "cluster.md"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF

# Shared by bench/run.sh, bench/compare.sh and bench/tls.sh: waiting for a port, starting nginx from a template in
# bench/nginx/, and starting fencegate in front of the upstream. The caller sets WORK (a scratch
# directory), PIDS (an array the caller's cleanup stops), UPSTREAM_PORT, FENCEGATE_PORT, ADMIN_PORT,
# PROXY_CPUS and PROXY_WORKERS, then `trap cleanup EXIT`.

PIDS=()
cleanup() {
    # TERM, not KILL: an nginx master killed outright leaves its workers running.
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    # KEEP_WORK keeps the scratch directory (bench/profile.sh leaves its perf.data there).
    [ -n "${KEEP_WORK:-}" ] || rm -rf "$WORK"
}

wait_for_port() {
    for _ in $(seq 1 500); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.01
    done
    echo "$(basename "$0"): nothing listens on port $1" >&2
    exit 1
}

render() { # template output port: fills in the @NAME@ placeholders
    sed -e "s|@DIR@|$WORK|g" -e "s|@PORT@|$3|g" -e "s|@UPSTREAM_PORT@|$UPSTREAM_PORT|g" \
        -e "s|@WORKERS@|$PROXY_WORKERS|g" "$1" >"$2"
}

start_nginx() { # name template port cpus
    mkdir -p "$WORK/$1-body" "$WORK/proxy-temp"
    render "$2" "$WORK/$1.conf" "$3"
    taskset -c "$4" nginx -c "$WORK/$1.conf" -e "$WORK/$1-error.log" >/dev/null 2>&1 &
    PIDS+=($!)
    wait_for_port "$3"
}

FENCEGATE_PID=
# Routes: /r/{id} -> r:{id} (what the hot path is measured on, first so that it matches first),
# etcd's gateway, a CouchDB database and an S3 bucket through their profiles, and the same calls
# through a plain catch-all route (/plain/...) for each profile's cost against a path route in one
# run.
start_fencegate_binary() { # binary database [hot-only]
    cat >"$WORK/fencegate.toml" <<EOF
listen = "127.0.0.1:$FENCEGATE_PORT"
admin_listen = "127.0.0.1:$ADMIN_PORT"
database = "$2"
worker_threads = $PROXY_WORKERS

[[routes]]
path = "/r/{id}"
upstream = "http://127.0.0.1:$UPSTREAM_PORT"
resource = "r:{id}"
EOF
    # The hot route alone lets compare.sh run builds older than the storage profiles.
    [ "${3:-}" = hot-only ] || cat >>"$WORK/fencegate.toml" <<EOF

[[routes]]
path = "/v3/{*rest}"
upstream = "http://127.0.0.1:$UPSTREAM_PORT"
profile = "etcd-v3"
resource = "etcd:{key}"
[[routes.keys]]
prefix = "/wallets/"
resource = "wallet:{segment}"

[[routes]]
path = "/bank/{*rest}"
upstream = "http://127.0.0.1:$UPSTREAM_PORT"
profile = "couchdb"
resource = "couch:{db}/{doc}"
[[routes.keys]]
prefix = "wallet:"
resource = "wallet:{segment}"

[[routes]]
path = "/bucket/{*rest}"
upstream = "http://127.0.0.1:$UPSTREAM_PORT"
profile = "s3"
resource = "s3:{bucket}/{key}"
[[routes.keys]]
prefix = "wallets/"
resource = "s3wallet:{segment}"

[[routes]]
path = "/plain/{*rest}"
upstream = "http://127.0.0.1:$UPSTREAM_PORT"
resource = "plain"
EOF
    taskset -c "$PROXY_CPUS" "$1" serve --config "$WORK/fencegate.toml" 2>>"$WORK/fencegate.log" &
    FENCEGATE_PID=$!
    PIDS+=("$FENCEGATE_PID")
    wait_for_port "$FENCEGATE_PORT"
}

# A config for fencegate serving HTTPS with $WORK/server.crt and server.key, and the hot route
# /r/{id} to the plain upstream: bench/tls.sh's (which appends its routes) and bench/pgo.sh's.
write_tls_config() { # file database
    cat >"$1" <<EOF
listen = "127.0.0.1:$FENCEGATE_PORT"
admin_listen = "127.0.0.1:$ADMIN_PORT"
database = "$2"
worker_threads = $PROXY_WORKERS

[tls]
cert = "$WORK/server.crt"
key = "$WORK/server.key"

[[routes]]
path = "/r/{id}"
upstream = "http://127.0.0.1:$UPSTREAM_PORT"
resource = "r:{id}"
EOF
}

# Appends one result line: `record KEY=VALUE... -- JSON` merges the pairs into the JSON object.
record() { # appends to $RAW
    python3 - "$RAW" "$@" <<'EOF'
import json, sys
raw, args = sys.argv[1], sys.argv[2:]
split = args.index("--")
entry = dict(pair.split("=", 1) for pair in args[:split])
entry.update(json.loads(args[split + 1]))
with open(raw, "a") as f:
    f.write(json.dumps(entry) + "\n")
EOF
}

# CPU seconds (user + system) used so far by the processes and their children (nginx's workers).
cpu_seconds() { # pid...
    python3 - "$@" <<'EOF'
import os, sys
pids = set(sys.argv[1:])
for pid in list(pids):
    try:
        pids |= set(open(f"/proc/{pid}/task/{pid}/children").read().split())
    except OSError:
        pass
total = 0
for pid in pids:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    total += int(fields[11]) + int(fields[12])
print(total / os.sysconf("SC_CLK_TCK"))
EOF
}

#!/usr/bin/env bash
# Streams a large audit log with `fencegate audit` while `fencegate serve` answers a zombie on the
# same database, and reports the command's wall time and peak memory, and the server's rejection
# latency before and during the stream (the ratio is the figure to watch).
#
# Usage: bench/audit_stream.sh [ROWS]   (default 10000000; needs python3 and GNU time)
# Output: bench/results/audit_stream.md
set -euo pipefail
cd "$(dirname "$0")/.."
rows="${1:-10000000}"
work="$(mktemp -d)"
trap 'kill "${server:-}" 2>/dev/null || true; rm -rf "$work"' EXIT

cargo build --release --quiet
bin=target/release/fencegate
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

data=$(port); admin=$(port)
# Retention would otherwise start pruning the log down to its default 1,000,000 rows.
cat > "$work/fg.toml" <<TOML
audit_max_rows = 1000000000
[[routes]]
path = "/{*rest}"
upstream = "http://127.0.0.1:1"
resource = "default"
TOML
start_server() {
  "$bin" serve --config "$work/fg.toml" --listen "127.0.0.1:$data" \
    --admin-listen "127.0.0.1:$admin" --db "$work/fg.db" 2>"$work/serve.log" &
  server=$!
  until curl -sf "http://127.0.0.1:$admin/healthz" >/dev/null; do sleep 0.1; done
}

# Migrate an empty database, then fill its audit log directly (far faster than through HTTP).
start_server; kill "$server"; wait "$server" || true
echo "filling $rows audit rows..."
sqlite3 "$work/fg.db" <<SQL
PRAGMA journal_mode=WAL;
INSERT INTO resources VALUES ('default', 5, '2026-11-23T00:00:00.000Z');
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < $rows)
INSERT INTO rejections (at, resource, reason, token, highest, method, path, client, request_id)
SELECT strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), 'default', 'stale', 4, 5, 'PUT',
       '/wallets/' || (i % 1000), '127.0.0.1:40000', 'req-' || i FROM n;
SQL
start_server

# Sequential stale PUTs; prints p50 and p99 in microseconds over `count` requests.
zombie() {
  python3 - "$data" "$1" <<'PY'
import http.client, sys, time
conn = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]))
lat = []
for _ in range(int(sys.argv[2])):
    t = time.perf_counter()
    conn.request("PUT", "/wallets/1", body=b"x", headers={"Fencing-Token": "4"})
    r = conn.getresponse(); r.read()
    assert r.status == 409, r.status
    lat.append((time.perf_counter() - t) * 1e6)
lat.sort()
print(f"{lat[len(lat)//2]:.0f} {lat[int(len(lat)*0.99)]:.0f}")
PY
}
read -r idle_p50 idle_p99 < <(zombie 2000)
/usr/bin/time -f "%e %M" -o "$work/time" "$bin" audit --db "$work/fg.db" --format csv >/dev/null &
audit=$!
read -r busy_p50 busy_p99 < <(zombie 10000)  # about as long as the stream itself
wait "$audit"
read -r seconds peak_kib < "$work/time"

mkdir -p bench/results
cat > bench/results/audit_stream.md <<MD
# fencegate audit over a large log ($(date -u +%Y-%m-%d), $(nproc) cores)

Re-run: \`bench/audit_stream.sh $rows\`

| figure | value |
|---|---|
| rows streamed (CSV to /dev/null) | $rows |
| wall time | ${seconds} s |
| peak RSS of \`fencegate audit\` | $((peak_kib / 1024)) MiB |
| server: audited 409, p50 / p99 before the stream | ${idle_p50} / ${idle_p99} µs |
| server: audited 409, p50 / p99 during the stream | ${busy_p50} / ${busy_p99} µs |
| ratio during / before, p50 and p99 | $(python3 -c "print(f'{$busy_p50/$idle_p50:.2f} / {$busy_p99/$idle_p99:.2f}')") |

The zombie is a sequential Python client (its own overhead is most of each figure) sending one
stale PUT at a time; every 409 is committed to the audit log (one fsync) before it is answered.
MD
cat bench/results/audit_stream.md

#!/usr/bin/env bash
# A profile-guided build of fencegate: the release build, laid out and inlined by what the proxy
# did under load, for the fastest binary of this source.
#
#   bench/pgo.sh            # writes target/pgo/fencegate
#
# Three steps, with rustc's own PGO flags (no tool to install but rustup's llvm-tools):
#   1. build fencegate instrumented (-Cprofile-generate), in target/pgo-generate;
#   2. train it: in front of nginx `return 200`, a few seconds of each kind of request the data
#      plane serves, from bench/wrk/ (fenced PUTs with the current token, plain GETs, zombie
#      rejections that are audited, durable token advances, each storage profile's single and
#      bulk writes), then the same PUTs over HTTPS: kept alive, on a new connection each (TLS
#      handshakes), and over HTTP/2 (curl). A path left untrained is taken for cold and optimised
#      for size; of the common ones only an HTTP/2 upstream still is;
#   3. merge the counts (llvm-profdata) and build again with them (-Cprofile-use), in
#      target/pgo-use; the binary is copied to target/pgo/fencegate.
#
# The source and the release profile (fat LTO, one codegen unit) are the same as
# `cargo build --release`; only code layout, inlining and branch order change. README's
# Performance section gives what it is worth (bench/instructions.sh, bench/paired.sh). Takes two
# release builds (about 12 minutes on 2 cores). Needs wrk, nginx, openssl, curl and rustup (it adds
# the llvm-tools component if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
UPSTREAM_PORT=18591
FENCEGATE_PORT=18593
ADMIN_PORT=18594
PROXY_CPUS=0-$(($(nproc) - 1))
PROXY_WORKERS=$(nproc)
TRAIN_SECONDS=${BENCH_PGO_SECONDS:-2}
for tool in wrk nginx openssl curl rustup; do
    command -v "$tool" >/dev/null || { echo "bench/pgo.sh: $tool is missing" >&2; exit 2; }
done
sysroot=$(rustc --print sysroot)
profdata=$(find "$sysroot/lib/rustlib" -name llvm-profdata -type f 2>/dev/null | head -1)
if [ -z "$profdata" ]; then
    rustup component add llvm-tools
    profdata=$(find "$sysroot/lib/rustlib" -name llvm-profdata -type f | head -1)
fi
WORK=$(mktemp -d /tmp/fencegate-pgo.XXXXXX)
# shellcheck source=bench/lib.sh
. bench/lib.sh
trap cleanup EXIT
log() { printf '%s %s\n' "$(date +%T)" "$*" >&2; }

log "1/3 instrumented build (target/pgo-generate)"
# A fixed path, so that a second run reuses this build; the server's own profiles go elsewhere
# (LLVM_PROFILE_FILE, below), and the build scripts' land here.
CARGO_TARGET_DIR=target/pgo-generate RUSTFLAGS="-Cprofile-generate=$PWD/target/pgo-generate/profiles" \
    cargo build --release --locked --quiet --bin fencegate
TRAINEE=$PWD/target/pgo-generate/release/fencegate

log "2/3 training"
# The servers' own profiles, apart from those the build scripts left in step 1.
export LLVM_PROFILE_FILE=$WORK/served/fencegate-%p-%m.profraw
start_nginx upstream bench/nginx/upstream.conf "$UPSTREAM_PORT" "$PROXY_CPUS"
load() { # script [url-base] [wrk options...]
    local script=$1 base=${2:-http://127.0.0.1:$FENCEGATE_PORT}
    shift 2 || shift $#
    wrk -t1 -c32 -d"${TRAIN_SECONDS}s" --timeout 5s -s "$script" "$@" "$base/" >/dev/null
}
put() { # url token [curl options...]
    local url=$1 token=$2
    shift 2
    curl -fsS -o /dev/null -X PUT -H "Fencing-Token: $token" "$@" "$url"
}
# Plain HTTP, every route of bench/lib.sh: the hot path, the zombies, advances, the profiles.
start_fencegate_binary "$TRAINEE" "$WORK/train.db"
put "http://127.0.0.1:$FENCEGATE_PORT/r/hot" 1
for n in $(seq 0 99); do put "http://127.0.0.1:$FENCEGATE_PORT/r/zombie$n" 2; done
for target in put get zombie advance plain_put etcd_put etcd_txn100 couch_put couch_bulk100 \
    s3_put s3_delete100; do
    load "bench/wrk/$target.lua"
done
kill -TERM "$FENCEGATE_PID"
wait "$FENCEGATE_PID" || true

# HTTPS: the same hot path over TLS, kept alive and then a handshake per request.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=localhost \
    -addext subjectAltName=DNS:localhost,IP:127.0.0.1 \
    -keyout "$WORK/server.key" -out "$WORK/server.crt" 2>/dev/null
write_tls_config "$WORK/tls.toml" "$WORK/train-tls.db"
"$TRAINEE" serve --config "$WORK/tls.toml" 2>>"$WORK/fencegate-tls.log" &
FENCEGATE_PID=$!
PIDS+=("$FENCEGATE_PID")
wait_for_port "$FENCEGATE_PORT"
put "https://127.0.0.1:$FENCEGATE_PORT/r/hot" 1 --insecure
load bench/wrk/put.lua "https://127.0.0.1:$FENCEGATE_PORT"
load bench/wrk/put.lua "https://127.0.0.1:$FENCEGATE_PORT" -H "Connection: close"
# HTTP/2, which wrk does not speak: curl multiplexes its requests on one connection (its
# parallel mode draws a progress meter despite -s).
curl -fksS --no-progress-meter --http2 --parallel --parallel-max 64 -X PUT -H "Fencing-Token: 1" \
    "https://127.0.0.1:$FENCEGATE_PORT/r/hot?n=[1-$((TRAIN_SECONDS * 5000))]" >/dev/null
kill -TERM "$FENCEGATE_PID"
wait "$FENCEGATE_PID" || true

log "3/3 optimised build (target/pgo-use)"
served=("$WORK"/served/*.profraw)
[ -e "${served[0]}" ] || { echo "bench/pgo.sh: the training left no profile" >&2; exit 1; }
"$profdata" merge -o "$WORK/fencegate.profdata" "${served[@]}"
# A new path every run: cargo rebuilds when the flags change, not when the profile does.
CARGO_TARGET_DIR=target/pgo-use RUSTFLAGS="-Cprofile-use=$WORK/fencegate.profdata" \
    cargo build --release --locked --quiet --bin fencegate
mkdir -p target/pgo
cp target/pgo-use/release/fencegate target/pgo/fencegate
log "done: target/pgo/fencegate"

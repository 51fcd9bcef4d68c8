#!/usr/bin/env bash
# Fuzzes every target for SECONDS each (default 60) on the stable toolchain, without sanitizers
# (panics, overflow checks and the targets' own assertions are the oracles).
#
#   fuzz/run.sh            # the short run CI does: 60 s per target
#   fuzz/run.sh 3600 dataplane route   # a longer run of some targets
#
# Corpora grow in fuzz/corpus/<target> (kept between runs, not committed); fuzz/seeds/<target>
# holds the committed starting points. A finding is written to fuzz/artifacts/<target>/ and ends
# the run with a non-zero status; replay it with `cargo fuzz run --sanitizer none <target> <file>`.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(token route config dataplane etcd couchdb s3 upstream_response request_head)

command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
cargo fuzz build --sanitizer none

for target in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$target"
    log=$(mktemp)
    if ! cargo fuzz run --sanitizer none "$target" "fuzz/corpus/$target" "fuzz/seeds/$target" -- \
        -max_total_time="$seconds" -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
        cat "$log"
        echo "fuzz target $target found a failure (see fuzz/artifacts/$target/)" >&2
        exit 1
    fi
    runs=$(sed -n 's/^Done \([0-9]*\) runs in \([0-9]*\) second.*/\1 inputs in \2 s/p' "$log")
    echo "fuzz $target: ${runs:-no summary}, corpus $(find "fuzz/corpus/$target" -type f | wc -l) inputs"
    rm -f "$log"
done

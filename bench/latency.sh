#!/usr/bin/env bash
# Same-token write latency through fencegate against the upstream directly, in one run, on a
# release build. Writes bench/results/latency.{md,json}. BENCH_REQUESTS sets the sample count.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench --bench latency

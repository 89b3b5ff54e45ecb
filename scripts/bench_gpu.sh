#!/usr/bin/env bash
# GPU kernels vs the CPU kernels on all cores: builds and runs examples/bench_gpu.rs and writes
# the markdown table to scripts/bench_gpu_results.md (device named in it).
#   scripts/bench_gpu.sh            build + run here
#   BENCH_BIN=path scripts/bench_gpu.sh   run a prebuilt binary (the device machine has no network)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${BENCH_BIN:-}
if [ -z "$bin" ]; then
    cargo build --release --features gpu --example bench_gpu
    bin=target/release/examples/bench_gpu
fi
out=${BENCH_OUT:-scripts/bench_gpu_results.md}
"$bin" | tee "$out"

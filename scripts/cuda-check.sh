#!/usr/bin/env bash
# The CUDA worker compiles and passes clippy on a machine without a GPU: nvcc and
# the CUDA headers come from PyPI (scripts/cuda-toolkit.sh); candle's kernels are
# built for one compute capability into a target directory of its own
# (~/.cache/kandle/target-cuda), where they stay: built once per toolkit and
# machine. scripts/test.sh runs this beside its main build.
set -euo pipefail
cd "$(dirname "$0")/.."

cache="${KANDLE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kandle}"
start=$SECONDS
cuda_home="$(scripts/cuda-toolkit.sh)"
CUDA_HOME="$cuda_home" CUDA_PATH="$cuda_home" CUDA_ROOT="$cuda_home" PATH="$cuda_home/bin:$PATH" \
  CUDA_COMPUTE_CAP=80 CARGO_TARGET_DIR="$cache/target-cuda" \
  cargo clippy -p kandle-worker --features cuda --all-targets --locked -- -D warnings
echo "cuda check: $((SECONDS - start)) s"

#!/usr/bin/env bash
# The CUDA worker compiles and passes clippy on a machine without a GPU: nvcc and
# the CUDA headers come from PyPI (scripts/cuda-toolkit.sh); candle's kernels are
# built for one compute capability, on every core (CUDAFORGE_THREADS), into the
# target directory, where they stay: built once per toolkit and machine. The
# whole workspace is checked so that features resolve as in the main build and
# its proc macros and build scripts are reused, not built again.
set -euo pipefail
cd "$(dirname "$0")/.."

cuda_home="$(scripts/cuda-toolkit.sh)"
CUDA_HOME="$cuda_home" CUDA_PATH="$cuda_home" CUDA_ROOT="$cuda_home" PATH="$cuda_home/bin:$PATH" \
  CUDA_COMPUTE_CAP=80 CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-$(nproc)}" \
  cargo clippy --workspace --features kandle-worker/cuda --all-targets --locked -- -D warnings

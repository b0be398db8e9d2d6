#!/usr/bin/env bash
# The CUDA worker compiles and passes clippy on a machine without a GPU. By
# default candle's CUDA kernels are not built: a stand-in nvcc
# (scripts/cuda-stub) answers candle's build scripts with empty outputs, since
# clippy only checks Rust and the kernels are candle's (the image build compiles
# them with the real toolkit). KANDLE_CUDA_KERNELS=nvcc builds them too, with
# CUDA 13's compiler from PyPI (scripts/cuda-toolkit.sh), for one compute
# capability, on every core, kept in the target directory. The whole workspace
# is checked so that features resolve as in the main build and its proc macros
# and build scripts are reused, not built again.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${KANDLE_CUDA_KERNELS:-stub}" == "nvcc" ]]; then
  cuda_home="$(scripts/cuda-toolkit.sh)"
else
  cuda_home="$PWD/scripts/cuda-stub"
fi
NVCC="$cuda_home/bin/nvcc" CUDA_HOME="$cuda_home" CUDA_PATH="$cuda_home" CUDA_ROOT="$cuda_home" \
  PATH="$cuda_home/bin:$PATH" CUDA_COMPUTE_CAP=80 CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-$(nproc)}" \
  cargo clippy --workspace --features kandle-worker/cuda --all-targets --locked -- -D warnings

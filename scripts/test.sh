#!/usr/bin/env bash
# Runs every test: formatting, clippy, the Rust unit and integration tests, and the
# conformance tests that drive the real binaries with the official openai SDK.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore -r tests/requirements.txt
KANDLE_TEST_GGUF="$(scripts/fetch-smollm2.sh)"
export KANDLE_TEST_GGUF

cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The CUDA worker compiles (and passes clippy) on this GPU-less machine: nvcc and
# the CUDA headers come from PyPI; one compute capability's kernels are built.
cuda_home="$(scripts/cuda-toolkit.sh)"
CUDA_HOME="$cuda_home" CUDA_PATH="$cuda_home" CUDA_ROOT="$cuda_home" PATH="$cuda_home/bin:$PATH" CUDA_COMPUTE_CAP=80 \
    cargo clippy -p kandle-worker --features cuda --all-targets --locked -- -D warnings
# Also builds both binaries (each crate has integration tests), which pytest drives.
cargo test --workspace --locked -- --skip request_fuzz
# The request fuzz pass on its own, so that its count of cases shows in the output.
cargo test --workspace --locked --test tiny_models request_fuzz -- --nocapture
python3 -m pytest tests -q

#!/usr/bin/env bash
# Installs the pieces of the CUDA toolkit that building the worker's `cuda` feature
# needs (nvcc, cicc, ptxas, the runtime and CCCL headers) from PyPI into
# ~/.cache/kandle/cuda-<version>, once, and prints the CUDA home to use:
#
#   CUDA_HOME="$(scripts/cuda-toolkit.sh)" PATH="$CUDA_HOME/bin:$PATH" \
#     CUDA_COMPUTE_CAP=80 cargo build -p kandle-worker --features cuda
#
# No GPU or driver is needed to build. (The `-cu12` wheels carry ptxas and libnvvm
# but no nvcc driver; the CUDA 13 wheels have the whole compiler.)
set -euo pipefail

VERSION=13.0.88
CACHE="${KANDLE_CACHE:-$HOME/.cache/kandle}"
TARGET="$CACHE/cuda-$VERSION"
HOME_DIR="$TARGET/nvidia/cu13"

if [ ! -x "$HOME_DIR/bin/nvcc" ] || [ ! -x "$HOME_DIR/nvvm/bin/cicc" ]; then
    rm -rf "$TARGET.part"
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps \
        --target "$TARGET.part" \
        "nvidia-cuda-nvcc==$VERSION" "nvidia-nvvm==$VERSION" "nvidia-cuda-crt==$VERSION" \
        "nvidia-cuda-runtime==$VERSION" "nvidia-cuda-cccl==13.0.85" >&2
    rm -rf "$TARGET"
    mv "$TARGET.part" "$TARGET"
fi
# Some wheels lose the executable bit of their tools.
chmod +x "$HOME_DIR"/bin/* "$HOME_DIR"/nvvm/bin/* 2>/dev/null || true
echo "$HOME_DIR"

# syntax=docker/dockerfile:1
# One image with both binaries: kandle-worker and kandle-operator.
#
#   docker build -t kandle:dev .                          # CPU image (the default target)
#   docker build --target cuda -t kandle:dev-cuda .       # CUDA image, for pods that request nvidia.com/gpu
#
# Release builds target baseline x86-64: the worker's kernels detect the CPU's
# features at start-up (AVX2, AVX-VNNI, AVX-512 VNNI, else portable code), so
# one image runs on any x86-64 node at that node's best.
#
# The CUDA image runs the worker with candle's CUDA backend (the `cuda` cargo
# feature) on a CUDA 13 runtime; the node needs an NVIDIA driver for CUDA 13
# (580 or newer) and the NVIDIA container toolkit. Its kernels are built for one
# compute capability, CUDA_COMPUTE_CAP: 80 (the default) runs on Ampere and Ada
# (A100, A10, A30, L4, L40S, RTX 30xx/40xx); build with 90 for Hopper (H100,
# H200):
#
#   docker build --target cuda --build-arg CUDA_COMPUTE_CAP=90 -t kandle:dev-cuda-sm90 .

ARG BUILDER=rust:1-bookworm
ARG RUNTIME=gcr.io/distroless/cc-debian12:nonroot
ARG CUDA_BUILDER=nvidia/cuda:13.0.1-devel-ubuntu24.04
ARG CUDA_RUNTIME=nvidia/cuda:13.0.1-runtime-ubuntu24.04

FROM ${BUILDER} AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock rustfmt.toml clippy.toml ./
COPY worker worker
COPY operator operator
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bins \
 && mkdir -p /out \
 && cp target/release/kandle-worker target/release/kandle-operator /out/

FROM ${CUDA_BUILDER} AS build-cuda
ARG CUDA_COMPUTE_CAP=80
ENV CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP} PATH=/root/.cargo/bin:${PATH}
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl build-essential pkg-config \
 && rm -rf /var/lib/apt/lists/* \
 && curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain stable
WORKDIR /src
COPY Cargo.toml Cargo.lock rustfmt.toml clippy.toml ./
COPY worker worker
COPY operator operator
RUN --mount=type=cache,target=/root/.cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p kandle-worker --features cuda \
 && mkdir -p /out \
 && cp target/release/kandle-worker /out/

FROM ${CUDA_RUNTIME} AS cuda
COPY --from=build-cuda /out/kandle-worker /usr/local/bin/
COPY --from=build /out/kandle-operator /usr/local/bin/
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/kandle-worker"]
CMD ["--help"]

FROM ${RUNTIME} AS cpu
COPY --from=build /out/kandle-worker /out/kandle-operator /usr/local/bin/
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/kandle-worker"]
CMD ["--help"]

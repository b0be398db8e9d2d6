# syntax=docker/dockerfile:1
# One image with both binaries: kandle-worker and kandle-operator.
#
#   docker build -t kandle:dev .
#
# Release builds target baseline x86-64: the worker's kernels detect the CPU's
# features at start-up (AVX2, AVX-VNNI, AVX-512 VNNI, else portable code), so
# one image runs on any x86-64 node at that node's best.
#
# CUDA variant (for pods that request nvidia.com/gpu): build with
#   --build-arg BUILDER=nvidia/cuda:12.6.3-devel-ubuntu24.04 \
#   --build-arg RUNTIME=nvidia/cuda:12.6.3-runtime-ubuntu24.04 \
#   --build-arg FEATURES=cuda
# (the worker's `cuda` feature is not built yet: GPU device selection lands with
# its own issue; the arguments are here so the image layout does not change).

ARG BUILDER=rust:1-bookworm
ARG RUNTIME=gcr.io/distroless/cc-debian12:nonroot

FROM ${BUILDER} AS build
ARG FEATURES=""
WORKDIR /src
COPY Cargo.toml Cargo.lock rustfmt.toml clippy.toml ./
COPY worker worker
COPY operator operator
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bins ${FEATURES:+--features ${FEATURES}} \
 && mkdir -p /out \
 && cp target/release/kandle-worker target/release/kandle-operator /out/

FROM ${RUNTIME}
COPY --from=build /out/kandle-worker /out/kandle-operator /usr/local/bin/
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/kandle-worker"]
CMD ["--help"]

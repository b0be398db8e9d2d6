#!/usr/bin/env python3
"""Greedy answers and next-token distributions of kandle-worker against
llama-server on the same GGUF file.

    python3 scripts/compare_llama_cpp.py [--gguf FILE] [--tokens 48] [--top 10] [--kernels LEVEL]

Both servers get each prompt of a fixed set as raw text (kandle through a
chat template that renders the user's content alone, llama.cpp through
/completion; both put BOS first as the file asks) and answer it greedily,
with the top log-probabilities of every step. For each prompt it prints
whether the answers are identical token by token and, where they part, both
sides' log-probabilities of both candidates there: a parting at a near tie is
a gap of a few hundredths of a nat on both sides. Over every step before a
parting (where both saw the same text) it compares the distributions: top-1
agreement, the mean and largest difference of the log-probabilities of the
tokens both list, and the total variation distance between the two
distributions over those tokens (the rest of each side's mass as one more
outcome). Builds llama-server and kandle-worker as scripts/bench_engine.py
does (cached). Not part of CI.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import subprocess
import sys
import tempfile
import urllib.request

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_engine import ROOT, Server, build_kandle, build_llama_server, cpu_model, free_port  # noqa: E402

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):\n",
    "The three primary colors are",
    "Water boils at a temperature of",
    "A list of prime numbers: 2, 3, 5, 7,",
    "In 1969, the first humans to walk on the Moon",
    "Photosynthesis is the process by which",
    "The best way to learn a new language is",
    "Question: What is 12 times 12?\nAnswer:",
]


def post(port: int, path: str, body: dict) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as r:
        return json.load(r)


def text_of(entry: dict) -> bytes:
    return bytes(entry.get("bytes") or entry["token"].encode())


def kandle_steps(port: int, prompt: str, tokens: int, top: int) -> list[tuple[bytes, dict[bytes, float]]]:
    r = post(port, "/v1/chat/completions", {
        "model": "model", "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens,
        "temperature": 0, "logprobs": True, "top_logprobs": top})
    content = r["choices"][0]["logprobs"]["content"]
    return [(text_of(c), {text_of(t): t["logprob"] for t in c["top_logprobs"]}) for c in content]


def llama_steps(port: int, prompt: str, tokens: int, top: int) -> list[tuple[bytes, dict[bytes, float]]]:
    r = post(port, "/completion", {"prompt": prompt, "n_predict": tokens, "temperature": 0, "n_probs": top,
                                   "cache_prompt": False})
    return [(text_of(c), {text_of(t): t["logprob"] for t in c["top_logprobs"]}) for c in r["completion_probabilities"]]


def total_variation(a: dict[bytes, float], b: dict[bytes, float]) -> float:
    shared = set(a) & set(b)
    pa = {t: math.exp(a[t]) for t in shared}
    pb = {t: math.exp(b[t]) for t in shared}
    rest = abs((1 - sum(pa.values())) - (1 - sum(pb.values())))
    return 0.5 * (sum(abs(pa[t] - pb[t]) for t in shared) + rest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", default=None, help="GGUF file (default: Gemma 3 270M from scripts/fetch-gemma3.sh)")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--kernels", default=None, help="kandle-worker --kernels (default: the best this CPU runs)")
    args = parser.parse_args()
    gguf = args.gguf or subprocess.run([str(ROOT / "scripts" / "fetch-gemma3.sh")], capture_output=True, text=True,
                                       check=True).stdout.strip()
    llama_bin = build_llama_server("native")
    kandle_bin = build_kandle()
    version = subprocess.run([str(llama_bin), "--version"], capture_output=True, text=True).stderr.strip()
    with tempfile.NamedTemporaryFile("w", suffix=".jinja", delete=False) as template:
        template.write("{% for m in messages %}{{ m.content }}{% endfor %}")
    kport, lport = free_port(), free_port()
    kandle_args = [str(kandle_bin), "serve", "--model", gguf, "--served-model-name", "model", "--no-auth",
                   "--host", "127.0.0.1", "--port", str(kport), "--chat-template", template.name,
                   "--max-context", "4096", "--log-format", "text"]
    if args.kernels:
        kandle_args += ["--kernels", args.kernels]
    servers = [Server("kandle", kandle_args, kport, {}, model="model"),
               Server("llama.cpp", [str(llama_bin), "-m", gguf, "--host", "127.0.0.1", "--port", str(lport),
                                    "-c", "4096", "-np", "1"], lport, {})]
    identical = 0
    agree = compared = 0
    diffs: list[float] = []
    tvs: list[float] = []
    try:
        for prompt in PROMPTS:
            ours = kandle_steps(kport, prompt, args.tokens, args.top)
            theirs = llama_steps(lport, prompt, args.tokens, args.top)
            parting = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a[0] != b[0]), None)
            for i, ((_, a), (_, b)) in enumerate(zip(ours, theirs)):
                if parting is not None and i > parting:
                    break
                compared += 1
                agree += max(a, key=a.get) == max(b, key=b.get)
                diffs.extend(abs(a[t] - b[t]) for t in set(a) & set(b))
                tvs.append(total_variation(a, b))
            if parting is None and len(ours) == len(theirs):
                identical += 1
                print(f"identical ({len(ours)} tokens): {prompt!r}")
                continue
            if parting is None:
                print(f"same tokens, lengths {len(ours)} vs {len(theirs)}: {prompt!r}")
                continue
            (k_tok, k_top), (l_tok, l_top) = ours[parting], theirs[parting]
            nan = float("nan")
            print(f"parts at token {parting}: {prompt!r}")
            print(f"    kandle    {k_tok!r} {k_top.get(k_tok, nan):.3f}, {l_tok!r} {k_top.get(l_tok, nan):.3f}")
            print(f"    llama.cpp {k_tok!r} {l_top.get(k_tok, nan):.3f}, {l_tok!r} {l_top.get(l_tok, nan):.3f}")
    finally:
        for server in servers:
            server.stop()
        pathlib.Path(template.name).unlink(missing_ok=True)
    print()
    print(f"CPU: {cpu_model()}; llama.cpp: {version.splitlines()[0] if version else 'unknown'}; "
          f"model: {pathlib.Path(gguf).name}")
    print(f"identical answers: {identical} of {len(PROMPTS)} ({args.tokens} tokens each)")
    print(f"steps compared (up to each parting): {compared}; top-1 agreement {agree / max(compared, 1):.3f}")
    if diffs:
        print(f"|logprob difference| over shared top-{args.top} tokens: mean {sum(diffs) / len(diffs):.4f}, "
              f"max {max(diffs):.4f}")
        print(f"total variation distance: mean {sum(tvs) / len(tvs):.4f}, max {max(tvs):.4f}")


if __name__ == "__main__":
    main()

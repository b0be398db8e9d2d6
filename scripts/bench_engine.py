#!/usr/bin/env python3
"""kandle-worker against llama-server on the same GGUF file, in one run.

    python3 scripts/bench_engine.py [--runs 3] [--max-tokens 128] [--concurrency 1,4,8]
                                    [--gguf FILE | --quantize Q8_0|Q4_K_M|...] [--level native|avx2]
                                    [--prefix-cache off|on|both]

Builds (once, cached in ~/.cache/kandle/llama-cpp) llama-server from the llama.cpp
sources vendored in the llama-cpp-python sdist on PyPI, and kandle-worker in
release mode; starts both on localhost; then, alternating between them, runs
streaming chat completions at each concurrency (aggregate completion tokens
per second, time to first token) and a prefill of a ~1000-token prompt (prompt
tokens per second), with prefix caching off on both (kandle --no-prefix-cache,
llama-server cache_prompt=false) and then on. Prints every figure with its
ratio (kandle / llama.cpp), the CPU model and the llama.cpp version. With
--json-schema it also runs the concurrency levels with a `response_format`
json_schema on both (constrained decoding: kandle's llguidance matcher,
llama.cpp's grammar sampler), prefix cache off, to compare with the
unconstrained figures of the same run. With --level avx2 both are held to
AVX2: kandle-worker --kernels avx2 (refused on a CPU without it) against a
llama-server built with GGML_NATIVE=OFF and only AVX/AVX2/FMA/F16C on (cached
apart from the native build). With --quantize TYPE both serve a copy of SmolLM2
requantized by llama.cpp's own llama-quantize (built once beside llama-server;
the copy is cached in ~/.cache/kandle/llama-cpp/models): Q8_0 and Q4_K_M are
what people download most (Q4_K_M of SmolLM2 is Q5_0 where a row of 576 values
cannot hold 256-value K-quant blocks, Q4_K and Q6_K elsewhere). Not part of CI:
it takes minutes and wants an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parent.parent
CACHE = pathlib.Path(os.environ.get("KANDLE_BENCH_CACHE", pathlib.Path.home() / ".cache" / "kandle" / "llama-cpp"))
TOPICS = [
    "the history of the printing press", "how volcanoes form", "a day in the life of a lighthouse keeper",
    "why the sky is blue", "the rules of chess", "how bread is baked", "the water cycle", "a trip to the moon",
    "the life of honey bees", "how computers store numbers", "the first airplane flight", "how rivers shape valleys",
]


# A bounded answer: the essay prompts fill it with text, as they would unconstrained.
ESSAY_SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 80},
        "sections": {"type": "array", "maxItems": 4, "items": {
            "type": "object",
            "properties": {"heading": {"type": "string", "maxLength": 60}, "text": {"type": "string", "maxLength": 600}},
            "required": ["heading", "text"], "additionalProperties": False}},
    },
    "required": ["title", "sections"],
    "additionalProperties": False,
}


def log(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


def cpu_model() -> str:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def cpu_flags() -> set[str]:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


# llama.cpp's CMake switches for a build held to AVX2 (+ FMA, F16C): what an
# AVX2-only node runs, whatever this machine has.
AVX2_ONLY = ["-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
             "-DGGML_AVX512=OFF", "-DGGML_AVX512_VBMI=OFF", "-DGGML_AVX512_VNNI=OFF", "-DGGML_AVX512_BF16=OFF",
             "-DGGML_AVX_VNNI=OFF", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]


def build_llama_server(level: str) -> pathlib.Path:
    """llama-server built for this CPU (`native`) or for AVX2 only (`avx2`)."""
    build = CACHE / ("build" if level == "native" else f"build-{level}")
    binary = build / "bin" / "llama-server"
    if binary.exists():
        return binary
    CACHE.mkdir(parents=True, exist_ok=True)
    sdists = sorted(CACHE.glob("llama_cpp_python-*.tar.gz"))
    if not sdists:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python",
                        "llama-cpp-python", "-d", str(CACHE)], check=True)
        sdists = sorted(CACHE.glob("llama_cpp_python-*.tar.gz"))
    src = CACHE / "src"
    if not src.exists():
        with tarfile.open(sdists[-1]) as tar:
            tar.extractall(src, filter="data")
    llama = next(src.glob("*/vendor/llama.cpp"))
    if shutil.which("cmake") is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "cmake"], check=True)
    flags = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
             "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON"]
    flags += ["-DGGML_NATIVE=ON"] if level == "native" else AVX2_ONLY
    if level == "native" and "amx_tile" in cpu_flags():
        # llama.cpp's AMX Q4_1 path crashes; keep it out of the native build.
        flags.append("-DCMAKE_C_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16")
        flags.append("-DCMAKE_CXX_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16")
    subprocess.run(["cmake", "-S", str(llama), "-B", str(build), *flags], check=True)
    subprocess.run(["cmake", "--build", str(build), "--target", "llama-server", "-j", str(os.cpu_count() or 2)],
                   check=True)
    return binary


def requantized(source: str, kind: str) -> str:
    """`source` requantized to `kind` by llama-quantize (cached)."""
    out = CACHE / "models" / f"{pathlib.Path(source).stem.rsplit('.', 1)[0]}.{kind}.gguf"
    if out.exists():
        return str(out)
    build = build_llama_server("native").parent.parent
    tool = build / "bin" / "llama-quantize"
    if not tool.exists():
        subprocess.run(["cmake", "--build", str(build), "--target", "llama-quantize", "-j", str(os.cpu_count() or 2)],
                       check=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial")
    subprocess.run([str(tool), "--allow-requantize", source, str(partial), kind], check=True,
                   stdout=subprocess.DEVNULL)
    partial.rename(out)
    return str(out)


def build_kandle() -> pathlib.Path:
    subprocess.run(["cargo", "build", "--release", "--locked", "-p", "kandle-worker"], cwd=ROOT, check=True)
    return ROOT / "target" / "release" / "kandle-worker"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, name: str, args: list[str], port: int, extra: dict, model: str = "smollm2"):
        self.name, self.port, self.extra, self.model = name, port, extra, model
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200 and self.ready():
                        return
            except OSError:
                pass
            if self.process.poll() is not None:
                raise RuntimeError(f"{name} exited with {self.process.returncode}")
            time.sleep(0.5)
        raise RuntimeError(f"{name} did not become ready")

    def ready(self) -> bool:
        try:
            self.chat([{"role": "user", "content": "hi"}], 1)
            return True
        except OSError:
            return False

    def chat(self, messages: list[dict], max_tokens: int) -> tuple[float, float, int, int]:
        """Streams one completion: (seconds to first token, total seconds, prompt tokens, completion tokens)."""
        body = {"model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}, **self.extra}
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/v1/chat/completions",
                                         data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        start = time.perf_counter()
        first = None
        usage = {}
        with urllib.request.urlopen(request, timeout=600) as response:
            for raw in response:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices", []):
                    if first is None and (choice.get("delta", {}).get("content") or choice.get("finish_reason")):
                        first = time.perf_counter() - start
        total = time.perf_counter() - start
        return first or total, total, usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()


def concurrent(server: Server, clients: int, max_tokens: int, salt: int) -> dict:
    results: list[tuple[float, float, int, int]] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        topic = TOPICS[(salt + i) % len(TOPICS)]
        messages = [{"role": "user", "content": f"Request {salt}-{i}. Write a long, detailed essay about {topic}."}]
        r = server.chat(messages, max_tokens)
        with lock:
            results.append(r)

    start = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    tokens = sum(r[3] for r in results)
    return {"tok_s": tokens / wall, "ttft_p50": statistics.median(r[0] for r in results)}


def grammar_mask_ms(port: int) -> float:
    """Mean time of kandle's grammar mask per masked token, from its metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line.startswith("kandle_grammar_mask_seconds_sum") or line.startswith("kandle_grammar_mask_seconds_count")}
    count = values.get("kandle_grammar_mask_seconds_count", 0.0)
    return 1000 * values.get("kandle_grammar_mask_seconds_sum", 0.0) / count if count else 0.0


def prefill(server: Server, salt: int) -> float:
    words = " ".join(f"{TOPICS[(salt + i) % len(TOPICS)]} {i}," for i in range(150))
    messages = [{"role": "user", "content": f"Run {salt}. Summarize this list: {words}"}]
    _, total, prompt_tokens, _ = server.chat(messages, 1)
    return prompt_tokens / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", default=None, help="GGUF file (default: SmolLM2 from scripts/fetch-smollm2.sh)")
    parser.add_argument("--quantize", default=None, metavar="TYPE",
                        help="serve the GGUF requantized to TYPE by llama-quantize (Q8_0, Q4_K_M, ...)")
    parser.add_argument("--prefix-cache", choices=["off", "on", "both"], default="both")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--concurrency", default="1,4,8")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--json-schema", action="store_true", help="also run constrained to a JSON schema")
    parser.add_argument("--level", choices=["native", "avx2"], default="native",
                        help="native: both at this CPU's best; avx2: kandle --kernels avx2 against llama.cpp "
                             "built for AVX2 only (the pairing of an AVX2-only node, on any x86 machine with AVX2)")
    args = parser.parse_args()
    gguf = args.gguf or subprocess.run([str(ROOT / "scripts" / "fetch-smollm2.sh")], capture_output=True, text=True,
                                       check=True).stdout.strip()
    if args.quantize:
        gguf = requantized(gguf, args.quantize)
    llama_bin = build_llama_server(args.level)
    kandle_bin = build_kandle()
    version = subprocess.run([str(llama_bin), "--version"], capture_output=True, text=True).stderr.strip()
    levels = [int(c) for c in args.concurrency.split(",")]
    table: dict[tuple[str, str, str], list[float]] = {}

    modes = [(caching, None) for caching in (False, True) if args.prefix_cache in ("both", "on" if caching else "off")]
    if args.json_schema:
        modes.append((False, {"type": "json_schema", "json_schema": {"name": "essay", "schema": ESSAY_SCHEMA}}))
    for caching, response_format in modes:
        mode = "prefix cache on" if caching else "prefix cache off"
        constrained = {"response_format": response_format} if response_format else {}
        if response_format:
            mode = "json_schema, " + mode
        log(f"== {mode}")
        kport, lport = free_port(), free_port()
        kandle_args = [str(kandle_bin), "serve", "--model", gguf, "--served-model-name", "smollm2", "--no-auth",
                       "--host", "127.0.0.1", "--port", str(kport), "--max-batch-size", "8",
                       "--threads", str(args.threads), "--log-format", "text"]
        if not caching:
            kandle_args.append("--no-prefix-cache")
        if args.level != "native":
            kandle_args += ["--kernels", args.level]
        servers = [
            Server("kandle", kandle_args, kport, constrained),
            Server("llama.cpp", [str(llama_bin), "-m", gguf, "--host", "127.0.0.1", "--port", str(lport), "-np", "8",
                                 "-c", "8192", "-kvu", "-t", str(args.threads), "--jinja"], lport,
                   {"cache_prompt": caching, **constrained}),
        ]
        try:
            for run in range(args.runs):
                order = servers if run % 2 == 0 else servers[::-1]
                for server in order:
                    salt = run * 1000 + (0 if caching else 500)
                    for c in levels:
                        r = concurrent(server, c, args.max_tokens, salt + c)
                        table.setdefault((mode, f"throughput c={c} (tok/s)", server.name), []).append(r["tok_s"])
                        table.setdefault((mode, f"TTFT p50 c={c} (s)", server.name), []).append(r["ttft_p50"])
                        log(f"run {run} {server.name} c={c}: {r['tok_s']:.1f} tok/s, TTFT p50 {r['ttft_p50']:.3f} s")
                    if response_format:
                        continue
                    p = prefill(server, salt)
                    table.setdefault((mode, "prefill ~1000 tokens (tok/s)", server.name), []).append(p)
                    log(f"run {run} {server.name} prefill: {p:.1f} tok/s")
            if response_format:
                mask_ms = grammar_mask_ms(kport)
                log(f"kandle grammar mask: {mask_ms:.3f} ms per masked token")
                table.setdefault((mode, "grammar mask per token (ms)", "kandle"), []).append(mask_ms)
        finally:
            for server in servers:
                server.stop()

    print(f"CPU: {cpu_model()} ({os.cpu_count()} cores), threads {args.threads}, level {args.level}")
    print(f"llama.cpp: {version.splitlines()[0] if version else 'unknown'}; model: {pathlib.Path(gguf).name}")
    print(f"runs: {args.runs}, max_tokens {args.max_tokens}; medians; ratio = kandle / llama.cpp "
          "(for TTFT lower is better)")
    print()
    print("| mode | figure | kandle | llama.cpp | ratio |")
    print("|---|---|---|---|---|")
    keys = sorted({(m, f) for m, f, _ in table}, key=lambda k: (k[0], k[1]))
    for mode, figure in keys:
        k = statistics.median(table[(mode, figure, "kandle")])
        if (mode, figure, "llama.cpp") not in table:
            print(f"| {mode} | {figure} | {k:.3f} | | |")
            continue
        lc = statistics.median(table[(mode, figure, "llama.cpp")])
        print(f"| {mode} | {figure} | {k:.3f} | {lc:.3f} | {k / lc:.2f} |")


if __name__ == "__main__":
    main()

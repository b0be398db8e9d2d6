#!/usr/bin/env python3
"""Soak test: concurrent clients through the router to two workers for minutes.

Starts two workers serving SmolLM2 (release builds, built first with
`cargo build --release -p kandle-worker -p kandle-operator` unless --bin-dir is
given) and a router in front of them, then runs N clients until the time is up.
Each client loops over a random mix: streaming and non-streaming requests,
short to long prompts (a shared system prompt, so the prefix cache works as in
real traffic), max_tokens from 8 to 128, and some streams cancelled part-way
(the client closes the connection). Every 10 s it samples each process's RSS.

Reports requests by outcome, errors by kind (a status other than 200, a
connection error, an SSE error event, a stream without [DONE], a non-streaming
answer without a finish_reason), time to first token (p50/p99 over streams:
up to the first chunk with content), non-streaming latency, and each process's
RSS over time with its growth after the first minute. Exits 1 when there was an
error or an RSS grew by --max-rss-growth percent or more after the first minute.

    python3 scripts/soak.py [--clients 8] [--minutes 10] [--threads 1] [--seed 1]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import pathlib
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import Router, Worker, smollm2_path, use_binaries  # noqa: E402

KEY = "sk-soak"
SYSTEM = "You are a concise assistant. Answer in plain sentences and stay on topic."
TOPICS = ["rivers", "volcanoes", "bread", "bicycles", "owls", "glass", "tides", "chess", "maps", "copper",
          "clouds", "violins", "bees", "deserts", "ink", "trains"]
MAX_TOKENS = [8, 16, 32, 64, 128]
SAMPLE_S = 10
WARMUP_S = 60
TIMEOUT_S = 300


def prompt(rng: random.Random) -> list[dict]:
    """A system prompt, then a question of 1 to ~60 sentences (short to ~600 tokens)."""
    topic = rng.choice(TOPICS)
    sentences = rng.choice([1, 1, 4, 15, 60])
    context = " ".join(f"Fact {i}: {rng.choice(TOPICS)} relate to {rng.choice(TOPICS)}." for i in range(sentences - 1))
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"{context} Tell me about {topic}.".strip()}]


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.outcomes: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.ttft: list[float] = []
        self.latency: list[float] = []
        self.tokens = 0

    def error(self, kind: str) -> None:
        with self.lock:
            self.outcomes["error"] += 1
            self.errors[kind] += 1


def one_request(address: str, rng: random.Random, stats: Stats) -> None:
    stream = rng.random() < 0.5
    cancel_after = rng.randint(1, 12) if stream and rng.random() < 0.2 else None
    body = {"model": "smollm2", "messages": prompt(rng), "max_tokens": rng.choice(MAX_TOKENS),
            "temperature": rng.choice([0, 0.7, 1.0]), "seed": rng.randrange(1 << 30)}
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT_S)
    started = time.perf_counter()
    try:
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body).encode(),
                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            response.read()
            stats.error(f"http {response.status}")
            return
        if stream:
            read_stream(response, started, cancel_after, stats)
        else:
            answer = json.loads(response.read())
            if not answer.get("choices") or not answer["choices"][0].get("finish_reason"):
                stats.error("answer without finish_reason")
                return
            with stats.lock:
                stats.outcomes["complete"] += 1
                stats.latency.append(time.perf_counter() - started)
                stats.tokens += answer["usage"]["completion_tokens"]
    except (OSError, http.client.HTTPException, json.JSONDecodeError) as e:
        stats.error(type(e).__name__)
    finally:
        conn.close()


def read_stream(response, started: float, cancel_after: int | None, stats: Stats) -> None:
    first = None
    chunks = 0
    for raw in response:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            with stats.lock:
                stats.outcomes["complete"] += 1
                if first is not None:
                    stats.ttft.append(first - started)
            return
        event = json.loads(data)
        if "error" in event:
            stats.error("sse error event")
            return
        if event.get("usage"):
            with stats.lock:
                stats.tokens += event["usage"]["completion_tokens"]
        if event["choices"] and event["choices"][0]["delta"].get("content"):
            chunks += 1
            if first is None:
                first = time.perf_counter()
            if cancel_after is not None and chunks >= cancel_after:
                # Leaving: the caller closes the connection.
                with stats.lock:
                    stats.outcomes["cancelled"] += 1
                    stats.ttft.append(first - started)
                return
    stats.error("stream without [DONE]")


def client(address: str, seed: int, deadline: float, stats: Stats) -> None:
    rng = random.Random(seed)
    while time.monotonic() < deadline:
        one_request(address, rng, stats)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown CPU"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                        help="compute threads per worker (default: half the cores each)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-rss-growth", type=float, default=10.0, help="percent, after the first minute")
    parser.add_argument("--bin-dir", help="where the binaries are (default: build release ones)")
    args = parser.parse_args()

    bin_dir = use_binaries(args.bin_dir)

    stats = Stats()
    samples: list[tuple[float, dict[str, int]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        keys = pathlib.Path(tmp) / "keys"
        keys.mkdir()
        (keys / "key").write_text(KEY)
        workers = [Worker(["serve", "--model", str(smollm2_path()), "--served-model-name", "smollm2",
                           "--host", "127.0.0.1", "--port", "0", "--api-keys-dir", str(keys),
                           "--threads", str(args.threads)]) for _ in range(2)]
        router = None
        try:
            for w in workers:
                w.wait_ready()
            routes = pathlib.Path(tmp) / "routes.yaml"
            endpoints = json.dumps([w.base_url for w in workers])
            routes.write_text(f"models:\n  - model: smollm2\n    endpoints: {endpoints}\n")
            router = Router(["--routes", str(routes), "--host", "127.0.0.1", "--port", "0"]).wait_ready()
            processes = {"worker 1": workers[0], "worker 2": workers[1], "router": router}

            start = time.monotonic()
            deadline = start + args.minutes * 60
            threads = [threading.Thread(target=client, args=(router.address, args.seed * 1000 + i, deadline, stats))
                       for i in range(args.clients)]
            for t in threads:
                t.start()
            while time.monotonic() < deadline:
                samples.append((time.monotonic() - start, {n: rss_kib(s.proc.pid) for n, s in processes.items()}))
                print(f"{samples[-1][0]:6.0f}s  requests {sum(stats.outcomes.values()):6d}  errors "
                      f"{sum(stats.errors.values())}  RSS MiB " +
                      "  ".join(f"{n} {kib / 1024:.1f}" for n, kib in samples[-1][1].items()), flush=True)
                time.sleep(max(0.0, min(SAMPLE_S, deadline - time.monotonic())))
            for t in threads:
                t.join()
            samples.append((time.monotonic() - start, {n: rss_kib(s.proc.pid) for n, s in processes.items()}))
            exited = [n for n, s in processes.items() if s.proc.poll() is not None]
        finally:
            for s in (router, *workers):
                if s is not None:
                    s.stop()

    elapsed = samples[-1][0]
    total = sum(stats.outcomes.values())
    print()
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores; binaries {bin_dir}; {args.clients} clients for "
          f"{args.minutes:g} min; 2 workers ({args.threads} compute threads each) and a router")
    print(f"requests: {total} ({', '.join(f'{k} {v}' for k, v in sorted(stats.outcomes.items()))}); "
          f"{total / elapsed:.2f} req/s, {stats.tokens / elapsed:.1f} completion tokens/s")
    print(f"errors: {sum(stats.errors.values())}" +
          (f" ({', '.join(f'{k} {v}' for k, v in sorted(stats.errors.items()))})" if stats.errors else ""))
    print(f"time to first token (streams, n={len(stats.ttft)}): p50 {pct(stats.ttft, 50) * 1e3:.0f} ms, "
          f"p99 {pct(stats.ttft, 99) * 1e3:.0f} ms")
    if stats.latency:
        print(f"non-streaming latency (n={len(stats.latency)}): p50 {pct(stats.latency, 50) * 1e3:.0f} ms, "
              f"p99 {pct(stats.latency, 99) * 1e3:.0f} ms, mean {statistics.mean(stats.latency) * 1e3:.0f} ms")
    after_warmup = [s for s in samples if s[0] >= WARMUP_S] or samples[-1:]
    grew = False
    print("RSS MiB: process | first sample | at 1 min | max after | last | growth after 1 min")
    for name in samples[0][1]:
        base = after_warmup[0][1][name]
        peak = max(s[1][name] for s in after_warmup)
        last = samples[-1][1][name]
        growth = (last - base) / base * 100 if base else float("nan")
        grew |= growth >= args.max_rss_growth
        print(f"  {name} | {samples[0][1][name] / 1024:.1f} | {base / 1024:.1f} | {peak / 1024:.1f} | "
              f"{last / 1024:.1f} | {growth:+.1f}%")
    if exited:
        print(f"exited during the run: {', '.join(exited)}")
    return 1 if stats.errors or grew or exited else 0


if __name__ == "__main__":
    sys.exit(main())

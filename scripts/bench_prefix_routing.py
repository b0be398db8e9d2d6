#!/usr/bin/env python3
"""Prefix-aware routing against least-load routing: 2 and 4 SmolLM2 workers
behind `kandle-operator router`, in one run on one machine.

    python3 scripts/bench_prefix_routing.py [--workers 2,4] [--runs 1] [--prompts 8] [--questions 12]
                                            [--concurrency 8] [--kv-cache-memory 96M] [--bin-dir target/release]

Two workloads, each sent by `--concurrency` clients in a fixed shuffled order:

- `shared`: `--prompts` long system prompts (~650 tokens each, a policy
  document apiece) each asked `--questions` different short questions, the
  way many users hit one assistant.
- `uniform`: as many requests, each with a long prompt of its own (nothing
  to share beyond the chat template's opening).

For each pool size and workload the same requests go through a router with
prefix routing (the default) and one with `--no-prefix-routing` (least load
only), and, for `shared`, straight to the workers by the ideal assignment
(system prompt `p` always to worker `p mod n`, no router): each over freshly
started workers (empty caches). Every request streams
`--max-tokens` tokens at temperature 0 with usage on, so the workers'
`usage.prompt_tokens_details.cached_tokens` gives the prefix-cache hit rate
(cached / prompt tokens); TTFT is the time to the first content chunk,
throughput the requests and prompt tokens per second of the whole workload.

The ideal assignment's measured hit rate is the target; above it is a
bound no routing reaches under concurrency (a question that arrives while
its system prompt is still being computed computes it too): every system
prompt computed once and served from cache to every later question, cached
tokens = sum over prompts of (questions - 1) x the prompt's shareable
tokens, measured first on a fresh worker by sending one prompt twice with
different questions. Each worker runs one compute thread (`--threads 1`) and a KV cache
of `--kv-cache-memory`: the default, 96 MiB, holds about six of the eight
system prompts and the running batch, so a worker cannot keep every prompt
(as in a real fleet, where the prompts of many teams exceed one worker's
cache) but can keep its share. Not part of CI: it takes minutes.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import pathlib
import platform
import queue
import random
import statistics
import sys
import tempfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import Router, Worker, smollm2_path  # noqa: E402

WORDS = ("account access audit backup billing budget cache change client cluster code contract customer data "
         "deadline deploy device document email escalation expense export feature file hardware holiday incident "
         "invoice laptop license log meeting network office onboarding order outage partner password payment "
         "policy printer privacy project purchase quota refund release report request review risk schedule "
         "security server service shipment software storage subscription support ticket training travel upgrade "
         "vendor warranty").split()
VERBS = "must should may never always can only".split()
ACTIONS = ("be approved by a manager", "be logged in the tracker", "be reviewed within two days",
           "be encrypted at rest", "be reported to the security team", "go through the service desk",
           "be renewed every year", "be shared outside the company", "be kept for seven years")


def policy(seed: int) -> str:
    """A long system prompt: a numbered policy document of its own."""
    rng = random.Random(seed)
    rules = []
    for i in range(1, 41):
        a, b = rng.sample(WORDS, 2)
        rules.append(f"{i}. Every {a} {b} {rng.choice(VERBS)} {rng.choice(ACTIONS)}.")
    return (f"You are the help desk assistant of company number {seed}. Answer using only policy {seed} below.\n"
            + "\n".join(rules))


def question(seed: int) -> str:
    rng = random.Random(10_000 + seed)
    return f"Question {seed}: what does the policy say about the {rng.choice(WORDS)} {rng.choice(WORDS)}?"


def shared_workload(prompts: int, questions: int) -> list[tuple[int | None, list[dict]]]:
    requests = [(p, [{"role": "system", "content": policy(p)}, {"role": "user", "content": question(p * 1000 + q)}])
                for p in range(prompts) for q in range(questions)]
    random.Random(7).shuffle(requests)
    return requests


def uniform_workload(count: int) -> list[tuple[int | None, list[dict]]]:
    # Each prompt its own policy, sent as the user's message: nothing in common
    # but the template's opening.
    return [(None, [{"role": "user", "content": policy(100_000 + i) + "\n" + question(i)}]) for i in range(count)]


class Result:
    def __init__(self) -> None:
        self.ttft: list[float] = []
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.completion_tokens = 0
        self.failed = 0
        self.lock = threading.Lock()


def stream(address: str, messages: list[dict], max_tokens: int) -> tuple[float, dict]:
    """One streamed chat completion: time to first content, and the usage."""
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=600)
    body = json.dumps({"model": "smollm2", "messages": messages, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True, "stream_options": {"include_usage": True}})
    started = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"status {response.status}: {response.read()[:300]!r}")
    first = None
    usage: dict = {}
    for raw in response:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if first is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
            first = time.perf_counter() - started
        if chunk.get("usage"):
            usage = chunk["usage"]
    conn.close()
    return (first if first is not None else time.perf_counter() - started), usage


def run_workload(address_of, requests: list, clients: int, max_tokens: int) -> tuple[Result, float]:
    """Sends `requests` (system prompt number or None, messages), each to
    `address_of(prompt)`, from `clients` threads."""
    work: queue.Queue = queue.Queue()
    for r in requests:
        work.put(r)
    result = Result()

    def client() -> None:
        while True:
            try:
                prompt, messages = work.get_nowait()
            except queue.Empty:
                return
            try:
                ttft, usage = stream(address_of(prompt), messages, max_tokens)
            except (RuntimeError, OSError, ValueError):
                with result.lock:
                    result.failed += 1
                continue
            with result.lock:
                result.ttft.append(ttft)
                result.prompt_tokens += usage.get("prompt_tokens", 0)
                result.completion_tokens += usage.get("completion_tokens", 0)
                result.cached_tokens += (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return result, time.perf_counter() - started


def start_workers(n: int, kv: str) -> list[Worker]:
    workers = [Worker(["serve", "--model", str(smollm2_path()), "--served-model-name", "smollm2",
                       "--host", "127.0.0.1", "--port", "0", "--no-auth", "--threads", "1",
                       "--kv-cache-memory", kv]) for _ in range(n)]
    return [w.wait_ready() for w in workers]


def shareable_tokens(prompts: int, kv: str) -> list[int]:
    """Per system prompt, the tokens a worker that served it serves from cache
    to the same prompt with another question."""
    (worker,) = start_workers(1, kv)
    try:
        out = []
        for p in range(prompts):
            system = {"role": "system", "content": policy(p)}
            stream(worker.address, [system, {"role": "user", "content": question(p * 1000)}], 1)
            _, usage = stream(worker.address, [system, {"role": "user", "content": question(p * 1000 + 1)}], 1)
            out.append((usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0))
        return out
    finally:
        worker.stop()


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else float("nan")


def prefix_counters(router: Router) -> dict[str, int]:
    host, port = router.address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    counts: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith("kandle_router_prefix_routing_total{"):
            outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
            counts[outcome] = int(float(line.rsplit(" ", 1)[1]))
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="2,4")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--questions", type=int, default=12)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--kv-cache-memory", default="96M")
    parser.add_argument("--workloads", default="shared,uniform")
    parser.add_argument("--modes", default="prefix,least-load,ideal")
    parser.add_argument("--load-factor", default=None, help="the prefix router's --prefix-load-factor")
    parser.add_argument("--bin-dir", default=str(ROOT / "target" / "release"))
    args = parser.parse_args()
    os.environ["KANDLE_WORKER_BIN"] = str(pathlib.Path(args.bin_dir) / "kandle-worker")
    os.environ["KANDLE_OPERATOR_BIN"] = str(pathlib.Path(args.bin_dir) / "kandle-operator")

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.machine())
    print(f"machine: {cpu}, {os.cpu_count()} cores; workers: --threads 1 --kv-cache-memory {args.kv_cache_memory}; "
          f"{args.concurrency} clients, max_tokens {args.max_tokens}", flush=True)
    shareable = shareable_tokens(args.prompts, args.kv_cache_memory)
    print(f"shareable tokens per system prompt: {shareable}", flush=True)
    workloads = {
        "shared": shared_workload(args.prompts, args.questions),
        "uniform": uniform_workload(args.prompts * args.questions),
    }
    ideal_cached = sum((args.questions - 1) * s for s in shareable)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in [int(x) for x in args.workers.split(",")]:
            for name in args.workloads.split(","):
                for run in range(args.runs):
                    # Alternate which mode goes first from run to run.
                    modes = ["prefix", "least-load"] if run % 2 == 0 else ["least-load", "prefix"]
                    if name == "shared":
                        modes.append("ideal")
                    for mode in [m for m in modes if m in args.modes.split(",")]:
                        workers = start_workers(n, args.kv_cache_memory)
                        router = None
                        try:
                            if mode == "ideal":
                                addresses = [w.address for w in workers]
                                result, seconds = run_workload(lambda p: addresses[p % n], workloads[name],
                                                               args.concurrency, args.max_tokens)
                                counters = {}
                            else:
                                routes = pathlib.Path(tmp) / "routes.yaml"
                                endpoints = ", ".join(f'"{w.base_url}"' for w in workers)
                                routes.write_text(f"models:\n  - model: smollm2\n    endpoints: [{endpoints}]\n")
                                extra = ["--no-prefix-routing"] if mode == "least-load" else (
                                    ["--prefix-load-factor", args.load_factor] if args.load_factor else [])
                                router = Router(["--routes", str(routes), "--host", "127.0.0.1", "--port", "0", *extra])
                                router.wait_ready()
                                address = router.address
                                result, seconds = run_workload(lambda _: address, workloads[name], args.concurrency,
                                                               args.max_tokens)
                                counters = prefix_counters(router)
                        finally:
                            if router is not None:
                                router.stop()
                            for w in workers:
                                w.stop()
                        hit = result.cached_tokens / max(result.prompt_tokens, 1)
                        bound = ideal_cached / max(result.prompt_tokens, 1) if name == "shared" else None
                        row = {"workers": n, "workload": name, "mode": mode, "hit": hit, "bound": bound,
                               "ttft_p50": pct(result.ttft, 50), "ttft_p99": pct(result.ttft, 99),
                               "rps": len(result.ttft) / seconds, "prompt_tps": result.prompt_tokens / seconds,
                               "failed": result.failed, "counters": counters}
                        rows.append(row)
                        print(json.dumps(row), flush=True)

    print()
    order = {"prefix": 0, "least-load": 1, "ideal": 2}
    print("| workers | workload | routing | hit rate | vs ideal assignment | TTFT p50 (s) | TTFT p99 (s) | requests/s |")
    print("|---|---|---|---|---|---|---|---|")
    for key in sorted({(r["workers"], r["workload"], r["mode"]) for r in rows}, key=lambda k: (k[0], k[1], order[k[2]])):
        same = [r for r in rows if (r["workers"], r["workload"], r["mode"]) == key]
        med = lambda f, rs=same: statistics.median(r[f] for r in rs)  # noqa: E731
        ideal_rows = [r for r in rows if (r["workers"], r["workload"], r["mode"]) == (key[0], key[1], "ideal")]
        versus = f"{med('hit') / med('hit', ideal_rows):.2f}" if ideal_rows else "-"
        bound = f" (bound {same[0]['bound']:.3f})" if key[2] == "ideal" else ""
        failed = sum(r["failed"] for r in same)
        note = f" ({failed} failed)" if failed else ""
        print(f"| {key[0]} | {key[1]} | {key[2]} | {med('hit'):.3f}{bound} | {versus} | {med('ttft_p50'):.2f} | "
              f"{med('ttft_p99'):.2f} | {med('rps'):.2f}{note} |")


if __name__ == "__main__":
    main()

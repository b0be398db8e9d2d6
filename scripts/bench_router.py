#!/usr/bin/env python3
"""Router overhead benchmark: the same chat requests sent straight to a worker and
through `kandle-operator router`, measured in one run on one machine.

Two workloads: `light` requests that the worker rejects at once (an invalid
temperature, answered 400 after the full proxy path: body, model lookup,
endpoint choice, upstream request, relay), which isolates what the router adds;
and `generate` requests for one token, which shows that cost against real work.
Reports latency percentiles (sequential requests) and throughput (concurrent
clients) for both paths, the latency the router adds, and the ratios.

    python3 scripts/bench_router.py [--requests 200] [--concurrency 4] [--bin-dir target/release]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import Router, Worker, smollm2_path  # noqa: E402

WORKLOADS = {
    # (body, expected status)
    "light": (json.dumps({"model": "smollm2", "messages": [{"role": "user", "content": "Say yes."}],
                          "temperature": 5}).encode(), 400),
    "generate": (json.dumps({"model": "smollm2", "messages": [{"role": "user", "content": "Say yes."}],
                             "max_tokens": 1, "temperature": 0}).encode(), 200),
}
WORKLOAD = WORKLOADS["light"]


def one_request(conn: http.client.HTTPConnection) -> float:
    body, expected = WORKLOAD
    started = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    response.read()
    if response.status != expected:
        raise RuntimeError(f"status {response.status}")
    return time.perf_counter() - started


def connect(address: str) -> http.client.HTTPConnection:
    host, port = address.rsplit(":", 1)
    return http.client.HTTPConnection(host, int(port), timeout=60)


def latencies(address: str, n: int) -> list[float]:
    conn = connect(address)
    for _ in range(5):
        one_request(conn)  # warm-up
    return [one_request(conn) for _ in range(n)]


def throughput(address: str, clients: int, seconds: float) -> float:
    done = [0] * clients
    stop = time.perf_counter() + seconds

    def client(i: int) -> None:
        conn = connect(address)
        while time.perf_counter() < stop:
            one_request(conn)
            done[i] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / seconds


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--bin-dir", default=str(ROOT / "target" / "debug"))
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="light")
    args = parser.parse_args()
    global WORKLOAD
    WORKLOAD = WORKLOADS[args.workload]
    os.environ["KANDLE_WORKER_BIN"] = str(pathlib.Path(args.bin_dir) / "kandle-worker")
    os.environ["KANDLE_OPERATOR_BIN"] = str(pathlib.Path(args.bin_dir) / "kandle-operator")

    with tempfile.TemporaryDirectory() as tmp:
        routes = pathlib.Path(tmp) / "routes.yaml"
        worker = Worker(["serve", "--model", str(smollm2_path()), "--served-model-name", "smollm2",
                         "--host", "127.0.0.1", "--port", "0", "--no-auth",
                         "--max-batch-size", str(args.concurrency)]).wait_ready()
        router = None
        try:
            routes.write_text(f"models:\n  - model: smollm2\n    endpoints: [\"{worker.base_url}\"]\n")
            router = Router(["--routes", str(routes), "--host", "127.0.0.1", "--port", "0"]).wait_ready()
            direct = latencies(worker.address, args.requests)
            routed = latencies(router.address, args.requests)
            direct_rps = throughput(worker.address, args.concurrency, args.seconds)
            routed_rps = throughput(router.address, args.concurrency, args.seconds)
        finally:
            for s in (router, worker):
                if s is not None:
                    s.stop()

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}")
    print(f"binaries: {args.bin_dir}; workload {args.workload}; {args.requests} sequential requests, "
          f"{args.concurrency} clients for {args.seconds:.0f}s")
    print(f"{'':>10} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8}")
    for name, lat, rps in (("direct", direct, direct_rps), ("router", routed, routed_rps)):
        print(f"{name:>10} {pct(lat, 50) * 1e3:8.2f} {pct(lat, 99) * 1e3:8.2f} {rps:8.1f}")
    print(f"added latency: p50 {(pct(routed, 50) - pct(direct, 50)) * 1e3:+.2f} ms, "
          f"p99 {(pct(routed, 99) - pct(direct, 99)) * 1e3:+.2f} ms")
    print(f"ratios router/direct: p50 {pct(routed, 50) / pct(direct, 50):.3f}, "
          f"p99 {pct(routed, 99) / pct(direct, 99):.3f}, throughput {routed_rps / direct_rps:.3f}")
    print(f"mean direct {statistics.mean(direct) * 1e3:.2f} ms, routed {statistics.mean(routed) * 1e3:.2f} ms")


if __name__ == "__main__":
    main()

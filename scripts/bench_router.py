#!/usr/bin/env python3
"""Router overhead benchmark: the same chat requests sent straight to a worker and
through `kandle-operator router`, measured in one run on one machine.

Two workloads: `light` requests that the worker rejects at once (an invalid
temperature, answered 400 after the full proxy path: body, model lookup,
endpoint choice, upstream request, relay), which isolates what the router adds;
and `generate` requests for one token, which shows that cost against real work.
Reports latency percentiles (sequential requests) and throughput (concurrent
clients) for both paths, the latency the router adds, and the ratios.

With `--tenants`, the same run also measures a router with a tenants file
(every request authenticated, admitted under limits and its usage charged, in
process) and one whose limits live in Redis (`redis-server` started here), and
reports what each adds over the plain router.

    python3 scripts/bench_router.py [--requests 200] [--concurrency 4] [--tenants] [--bin-dir target/release]
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

from conftest import Router, Worker, smollm2_path, start_redis  # noqa: E402

WORKLOADS = {
    # (body, expected status)
    "light": (json.dumps({"model": "smollm2", "messages": [{"role": "user", "content": "Say yes."}],
                          "temperature": 5}).encode(), 400),
    "generate": (json.dumps({"model": "smollm2", "messages": [{"role": "user", "content": "Say yes."}],
                             "max_tokens": 1, "temperature": 0}).encode(), 200),
}
WORKLOAD = WORKLOADS["light"]
KEY = "sk-bench"
# Limits no request reaches: every request still runs admission and charging.
TENANTS = ("tenants:\n  - name: bench\n    keys: [sk-bench]\n    requestsPerMinute: 100000000\n"
           "    tokensPerMinute: 100000000000\n    concurrentRequests: 100000\n    models: ['*']\n")


def one_request(conn: http.client.HTTPConnection) -> float:
    body, expected = WORKLOAD
    started = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body=body,
                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    response = conn.getresponse()
    answer = response.read()
    if response.status != expected:
        raise RuntimeError(f"status {response.status}: {answer[:300]!r}")
    return time.perf_counter() - started


def connect(address: str) -> http.client.HTTPConnection:
    host, port = address.rsplit(":", 1)
    return http.client.HTTPConnection(host, int(port), timeout=60)


def latencies(address: str, n: int) -> list[float]:
    conn = connect(address)
    for _ in range(5):
        one_request(conn)  # warm-up
    return [one_request(conn) for _ in range(n)]


def throughput(address: str, clients: int, seconds: float) -> tuple[float, int]:
    """Requests per second answered as expected, and the count of other answers."""
    done = [0] * clients
    failed = [0] * clients
    stop = time.perf_counter() + seconds

    def client(i: int) -> None:
        conn = connect(address)
        while time.perf_counter() < stop:
            try:
                one_request(conn)
                done[i] += 1
            except RuntimeError:
                failed[i] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / seconds, sum(failed)


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
    parser.add_argument("--tenants", action="store_true", help="also measure routers with tenants, in process and in Redis")
    args = parser.parse_args()
    global WORKLOAD
    WORKLOAD = WORKLOADS[args.workload]
    os.environ["KANDLE_WORKER_BIN"] = str(pathlib.Path(args.bin_dir) / "kandle-worker")
    os.environ["KANDLE_OPERATOR_BIN"] = str(pathlib.Path(args.bin_dir) / "kandle-operator")

    results: dict[str, tuple[list[float], float]] = {}
    failures: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        routes = pathlib.Path(tmp) / "routes.yaml"
        tenants = pathlib.Path(tmp) / "tenants.yaml"
        tenants.write_text(TENANTS)
        worker = Worker(["serve", "--model", str(smollm2_path()), "--served-model-name", "smollm2",
                         "--host", "127.0.0.1", "--port", "0", "--no-auth",
                         "--max-batch-size", str(args.concurrency)]).wait_ready()
        redis = None
        routers: dict[str, Router] = {}
        try:
            routes.write_text(f"models:\n  - model: smollm2\n    endpoints: [\"{worker.base_url}\"]\n")
            base = ["--routes", str(routes), "--host", "127.0.0.1", "--port", "0"]
            routers["router"] = Router(base).wait_ready()
            if args.tenants:
                routers["+tenants"] = Router([*base, "--tenants", str(tenants)]).wait_ready()
                redis, url = start_redis(pathlib.Path(tmp))
                routers["+tenants+redis"] = Router([*base, "--tenants", str(tenants), "--quota-store", url]).wait_ready()
            targets = {"direct": worker.address, **{name: r.address for name, r in routers.items()}}
            for name, address in targets.items():
                results[name] = (latencies(address, args.requests), 0.0)
            for name, address in targets.items():
                rps, failures[name] = throughput(address, args.concurrency, args.seconds)
                results[name] = (results[name][0], rps)
        finally:
            for s in (*routers.values(), worker):
                s.stop()
            if redis is not None:
                redis.terminate()
                redis.wait(timeout=10)

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.machine())
    print(f"machine: {cpu}, {os.cpu_count()} cores, {platform.platform()}")
    print(f"binaries: {args.bin_dir}; workload {args.workload}; {args.requests} sequential requests, "
          f"{args.concurrency} clients for {args.seconds:.0f}s")
    direct = results["direct"][0]
    print(f"{'':>16} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8} {'p50 vs direct':>14} {'p99 vs direct':>14}")
    for name, (lat, rps) in results.items():
        print(f"{name:>16} {pct(lat, 50) * 1e3:8.2f} {pct(lat, 99) * 1e3:8.2f} {rps:8.1f} "
              f"{(pct(lat, 50) - pct(direct, 50)) * 1e3:+13.2f}ms {(pct(lat, 99) - pct(direct, 99)) * 1e3:+13.2f}ms")
    routed = results["router"][0]
    for name, (lat, _) in results.items():
        if name.startswith("+"):
            print(f"{name} adds over the plain router: p50 {(pct(lat, 50) - pct(routed, 50)) * 1e3:+.2f} ms, "
                  f"p99 {(pct(lat, 99) - pct(routed, 99)) * 1e3:+.2f} ms")
    print(f"mean direct {statistics.mean(direct) * 1e3:.2f} ms, routed {statistics.mean(routed) * 1e3:.2f} ms")
    if any(failures.values()):
        print("answers other than expected under concurrency:", failures)


if __name__ == "__main__":
    main()

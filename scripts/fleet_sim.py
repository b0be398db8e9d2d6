#!/usr/bin/env python3
"""A fleet on one machine: several models behind one router, traffic that comes
in bursts or hardly at all, and the autoscaler's decisions applied by starting
and stopping local workers. Prints the time to first token (p50/p99, cold
starts included) and the replica-seconds the fleet used, against always-on
pools that ran the same traffic.

Every model is SmolLM2-135M Q4_1 under its own name. A scaler loop reads the
router's and workers' /metrics as the operator does (demand = held + the larger
of the router's requests in flight and the workers' running + waiting), asks
`kandle-operator decide` (the operator's own decision function as a line
filter) every interval, and at once when the router holds a request for a pool
at zero (checked every second, as the operator does), and applies the answer:
a new worker joins the route file once it is ready; a worker leaving is taken
out of the file, then gets SIGTERM and drains.
Durations are shortened (scale-down delay, idle time before zero, decision
interval) so that a few minutes show every transition.

    python3 scripts/fleet_sim.py [--duration 240] [--bin-dir target/release] [--seed 7]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import pathlib
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import Router, Worker, operator_binary, smollm2_path, use_binaries  # noqa: E402

KEY = "sk-fleet-sim"
ROUTE_RELOAD_S = 1.0  # the router re-reads its route file every second
WAKE_S = 1.0  # between rounds, held requests for a pool at zero start one (as the operator does)
SAMPLE = re.compile(r'^([a-z_:]+)\{model(?:_name)?="([^"]+)"[^}]*\} ([0-9.e+-]+)$')


def traffic(models: list[str], duration: float, seed: int) -> list[tuple[float, str]]:
    """(send time, model), sorted. The first model is steady (Poisson, one request
    every 4 s on average); the second comes in bursts of 8 requests every 60 s;
    the rest are rare (one request every 70 s on average: idle in between)."""
    rng = random.Random(seed)
    plan: list[tuple[float, str]] = []
    for i, model in enumerate(models):
        if i == 0:
            t = rng.expovariate(1 / 4)
            while t < duration:
                plan.append((t, model))
                t += rng.expovariate(1 / 4)
        elif i == 1:
            for start in range(10, int(duration), 60):
                plan.extend((start + rng.uniform(0, 2), model) for _ in range(8))
        else:
            t = rng.uniform(5, 40)
            while t < duration:
                plan.append((t, model))
                t += rng.expovariate(1 / 70)
    return sorted(plan)


def scrape(url: str) -> dict[tuple[str, str], float]:
    """{(metric, model): value} of the per-model gauges at `url`/metrics."""
    found: dict[tuple[str, str], float] = {}
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return found
    for line in text.splitlines():
        m = SAMPLE.match(line)
        if m:
            key = (m.group(1), m.group(2))
            found[key] = found.get(key, 0) + float(m.group(3))
    return found


class Pool:
    """The local workers of one model."""

    def __init__(self, model: str):
        self.model = model
        self.starting: list[Worker] = []
        self.ready: list[Worker] = []
        self.cold_starts = 0


class Fleet:
    def __init__(self, models: list[str], scaling: dict, keys: pathlib.Path, routes: pathlib.Path, threads: int):
        self.pools = {m: Pool(m) for m in models}
        self.scaling = scaling
        self.keys = keys
        self.routes = routes
        self.threads = threads
        self.lock = threading.Lock()
        self.lifetimes: list[tuple[float, float | None]] = []  # (started, exited) per worker process
        self.events: list[str] = []
        self.t0 = time.monotonic()
        self.decider = subprocess.Popen([str(operator_binary()), "decide"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
        self.write_routes()

    def write_routes(self) -> None:
        with self.lock:
            lines = ["models:"]
            for pool in self.pools.values():
                lines.append(f"  - model: {pool.model}")
                lines.append(f"    endpoints: {json.dumps([w.base_url for w in pool.ready])}")
        tmp = self.routes.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(self.routes)

    def decide(self, pool: Pool, replicas: int, in_flight: int, held: int) -> dict:
        line = json.dumps({"pool": pool.model, "scaling": self.scaling, "replicas": replicas,
                           "inFlight": in_flight, "held": held})
        assert self.decider.stdin and self.decider.stdout
        self.decider.stdin.write(line + "\n")
        self.decider.stdin.flush()
        answer = json.loads(self.decider.stdout.readline())
        if "error" in answer:
            raise RuntimeError(answer["error"])
        return answer

    def start_worker(self, pool: Pool) -> None:
        worker = Worker(["serve", "--model", str(smollm2_path()), "--served-model-name", pool.model,
                         "--host", "127.0.0.1", "--port", "0", "--api-keys-dir", str(self.keys),
                         "--threads", str(self.threads)])
        index = len(self.lifetimes)
        self.lifetimes.append((time.monotonic(), None))
        with self.lock:
            pool.starting.append(worker)

        def join() -> None:
            worker.wait_ready()
            with self.lock:
                if worker in pool.starting:
                    pool.starting.remove(worker)
                    pool.ready.append(worker)
            self.write_routes()
            self.reap(worker, index)

        threading.Thread(target=join, daemon=True).start()

    def reap(self, worker: Worker, index: int) -> None:
        def wait() -> None:
            worker.proc.wait()
            started, _ = self.lifetimes[index]
            self.lifetimes[index] = (started, time.monotonic())

        threading.Thread(target=wait, daemon=True).start()

    def stop_worker(self, pool: Pool) -> None:
        """Takes the newest worker out of the routes, then drains it (SIGTERM)."""
        with self.lock:
            worker = (pool.starting or pool.ready).pop()
        self.write_routes()

        def drain() -> None:
            time.sleep(ROUTE_RELOAD_S + 0.5)
            worker.stop()

        threading.Thread(target=drain, daemon=True).start()

    def tick(self, router_url: str) -> None:
        routers = scrape(router_url)
        workers: dict[str, float] = {}
        with self.lock:
            urls = [(p.model, w.base_url) for p in self.pools.values() for w in p.ready]
        for model, url in urls:
            for (name, _), value in scrape(url).items():
                if name in ("vllm:num_requests_running", "vllm:num_requests_waiting"):
                    workers[model] = workers.get(model, 0) + value
        for pool in self.pools.values():
            in_flight = int(max(routers.get(("kandle_router_in_flight", pool.model), 0), workers.get(pool.model, 0)))
            held = int(routers.get(("kandle_router_held", pool.model), 0))
            with self.lock:
                replicas = len(pool.starting) + len(pool.ready)
            answer = self.decide(pool, replicas, in_flight, held)
            if answer["replicas"] != replicas:
                self.events.append(f"{time.monotonic() - self.t0:6.1f} s  {pool.model}: {answer['reason']} {answer['message']}")
            if replicas == 0 and answer["replicas"] > 0:
                pool.cold_starts += 1
            for _ in range(replicas, answer["replicas"]):
                self.start_worker(pool)
            for _ in range(answer["replicas"], replicas):
                self.stop_worker(pool)

    def held_at_zero(self, router_url: str) -> bool:
        """Whether the router holds a request for a pool at zero (the operator
        checks this every second, between its rounds)."""
        with self.lock:
            at_zero = [p.model for p in self.pools.values() if not p.starting and not p.ready]
        if not at_zero:
            return False
        held = scrape(router_url)
        return any(held.get(("kandle_router_held", model), 0) > 0 for model in at_zero)

    def replica_seconds(self, end: float) -> float:
        return sum((exited or end) - started for started, exited in self.lifetimes)

    def close(self) -> None:
        for pool in self.pools.values():
            for worker in pool.starting + pool.ready:
                worker.stop()
        if self.decider.stdin:
            self.decider.stdin.close()
        self.decider.wait(timeout=10)


def send(router_url: str, model: str, results: list[dict]) -> None:
    host, port = router_url.removeprefix("http://").rsplit(":", 1)
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Name three colors."}],
                       "max_tokens": 16, "stream": True}).encode()
    start = time.monotonic()
    result = {"model": model, "sent": start}
    try:
        conn = http.client.HTTPConnection(host, int(port), timeout=600)
        conn.request("POST", "/v1/chat/completions", body=body,
                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
        response = conn.getresponse()
        if response.status != 200:
            result["error"] = f"HTTP {response.status}"
        else:
            for line in response:
                # The first chunk with text (the role chunk that opens a stream has none).
                if "ttft" not in result and line.startswith(b"data: {") and b'"content":"' in line \
                        and b'"content":""' not in line:
                    result["ttft"] = time.monotonic() - start
            result["done"] = time.monotonic() - start
        conn.close()
    except OSError as e:
        result["error"] = str(e)
    results.append(result)


def run_pass(models: list[str], scaling: dict, plan: list[tuple[float, str]], duration: float,
             interval: float, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        keys = pathlib.Path(tmp) / "keys"
        keys.mkdir()
        (keys / "key").write_text(KEY)
        routes = pathlib.Path(tmp) / "routes.yaml"
        fleet = Fleet(models, scaling, keys, routes, threads)
        router = Router(["--routes", str(routes), "--host", "127.0.0.1", "--port", "0"]).wait_ready()
        results: list[dict] = []
        clients: list[threading.Thread] = []
        try:
            fleet.tick(router.base_url)  # pools with minReplicas > 0 start now
            while any(p.starting for p in fleet.pools.values()):
                time.sleep(0.1)
            start = time.monotonic()
            fleet.t0 = start
            for pool in fleet.pools.values():
                pool.cold_starts = 0  # the always-on pools' first start is not a cold start of a request
            fleet.events.clear()
            pending = list(plan)
            next_tick = start + interval
            next_wake = start + WAKE_S
            while time.monotonic() - start < duration or any(c.is_alive() for c in clients):
                now = time.monotonic()
                while pending and pending[0][0] <= now - start:
                    _, model = pending.pop(0)
                    client = threading.Thread(target=send, args=(router.base_url, model, results))
                    client.start()
                    clients.append(client)
                if now >= next_tick:
                    fleet.tick(router.base_url)
                    next_tick += interval
                elif now >= next_wake:
                    next_wake = now + WAKE_S
                    if fleet.held_at_zero(router.base_url):
                        fleet.tick(router.base_url)
                time.sleep(0.02)
            end = time.monotonic()
            replica_seconds = fleet.replica_seconds(end) - sum(
                min(e or end, start) - s for s, e in fleet.lifetimes if s < start)  # count from the first request
            return {"results": results, "elapsed": end - start, "replica_seconds": replica_seconds,
                    "events": fleet.events, "cold_starts": {p.model: p.cold_starts for p in fleet.pools.values()}}
        finally:
            fleet.close()
            router.stop()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def report(name: str, models: list[str], outcome: dict) -> None:
    results = outcome["results"]
    print(f"\n{name}: {outcome['replica_seconds']:.0f} replica-seconds over {outcome['elapsed']:.0f} s")
    print(f"  {'model':8} {'requests':>8} {'failed':>6} {'to zero→up':>10} {'TTFT p50':>9} {'p99':>7} {'max':>7}")
    for model in models + ["all"]:
        mine = [r for r in results if model in ("all", r["model"])]
        ttft = [r["ttft"] for r in mine if "ttft" in r]
        failed = sum(1 for r in mine if "ttft" not in r)
        cold = sum(outcome["cold_starts"].values()) if model == "all" else outcome["cold_starts"][model]
        if ttft:
            print(f"  {model:8} {len(mine):8d} {failed:6d} {cold:10d} {statistics.median(ttft):8.2f}s "
                  f"{percentile(ttft, 0.99):6.2f}s {max(ttft):6.2f}s")
    errors = sorted({r["error"] for r in results if "error" in r})
    if errors:
        print("  errors:", "; ".join(errors))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=4, help="models in the fleet (at least 2)")
    parser.add_argument("--duration", type=float, default=240, help="seconds of traffic per pass")
    parser.add_argument("--interval", type=float, default=2, help="seconds between two scaling decisions")
    parser.add_argument("--threads", type=int, default=1, help="threads per worker")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--bin-dir", help="where the binaries are (default: build release ones)")
    parser.add_argument("--no-always-on", action="store_true", help="skip the pass with always-on pools")
    args = parser.parse_args()
    use_binaries(args.bin_dir)

    models = ["chat", "batch"] + [f"rare{i}" for i in range(1, max(2, args.models) - 1)]
    plan = traffic(models, args.duration, args.seed)
    scaled = {"minReplicas": 0, "maxReplicas": 2, "targetRequests": 2, "scaleDownDelay": "15s",
              "scaleToZeroAfter": "30s"}
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
               platform.processor())
    print(f"machine: {cpu}, {os.cpu_count()} cores; SmolLM2-135M Q4_1 as {len(models)} models, "
          f"{args.threads} thread(s) per worker; {len(plan)} requests over {args.duration:.0f} s "
          f"(max_tokens 16, streamed); decisions every {args.interval:g} s")
    print(f"scaling: {json.dumps(scaled)}")

    outcome = run_pass(models, scaled, plan, args.duration, args.interval, args.threads)
    print("\nscaling events:")
    for event in outcome["events"]:
        print("  " + event)
    report("autoscaled (min 0, max 2)", models, outcome)
    if not args.no_always_on:
        fixed = {"minReplicas": 1, "maxReplicas": 1}
        always = run_pass(models, fixed, plan, args.duration, args.interval, args.threads)
        report("always on (1 worker per model)", models, always)
        print(f"\nreplica-seconds: autoscaled {outcome['replica_seconds']:.0f} vs always-on "
              f"{always['replica_seconds']:.0f} ({outcome['replica_seconds'] / always['replica_seconds']:.2f}×)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

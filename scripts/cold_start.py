#!/usr/bin/env python3
"""Cold start through the router: a request to a model whose pool is at zero
(a route-file entry with `endpoints: []`), a worker started at that moment (as
the autoscaler would start a pod), the route file given its address once it is
ready, and the time to the request's first token. Repeated `--runs` times;
prints each phase and the worker's own start-up breakdown from its log.

    python3 scripts/cold_start.py [--runs 5] [--bin-dir target/release]
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

from conftest import Router, Worker, smollm2_path, use_binaries  # noqa: E402

KEY = "sk-cold-start"
BODY = json.dumps({"model": "smollm2", "messages": [{"role": "user", "content": "Name three colors."}],
                   "max_tokens": 8, "stream": True}).encode()


def write_routes(path: pathlib.Path, endpoints: list[str]) -> None:
    path.write_text(f"models:\n  - model: smollm2\n    endpoints: {json.dumps(endpoints)}\n")


def first_token(address: str, sent: list[float], out: dict) -> None:
    """Streams one request; records when it was sent and when its first content chunk came."""
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=600)
    sent.append(time.monotonic())
    conn.request("POST", "/v1/chat/completions", body=BODY,
                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    response = conn.getresponse()
    if response.status != 200:
        out["error"] = f"status {response.status}: {response.read()[:200]!r}"
        return
    for line in response:
        # The first chunk with text (the role chunk that opens a stream has none).
        if line.startswith(b"data: {") and b'"content":"' in line and b'"content":""' not in line:
            out["first_token"] = time.monotonic()
            break
    response.read()
    conn.close()


def startup_line(worker: Worker) -> str:
    for line in worker.logs:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "startup_seconds" in record.get("fields", {}):
            return record["fields"]["message"]
    return "(no start-up line)"


def one_run(router: Router, routes: pathlib.Path, keys: pathlib.Path, threads: int) -> dict:
    write_routes(routes, [])
    time.sleep(1.5)  # the router re-reads the file every second
    sent: list[float] = []
    out: dict = {}
    client = threading.Thread(target=first_token, args=(router.address, sent, out))
    client.start()
    while not sent:
        time.sleep(0.001)
    start = sent[0]
    worker = Worker(["serve", "--model", str(smollm2_path()), "--served-model-name", "smollm2",
                     "--host", "127.0.0.1", "--port", "0", "--api-keys-dir", str(keys), "--threads", str(threads)])
    try:
        worker.wait_ready()
        ready = time.monotonic()
        write_routes(routes, [worker.base_url])
        client.join(timeout=600)
        if "error" in out or "first_token" not in out:
            raise RuntimeError(out.get("error", "no first token"))
        return {"ready": ready - start, "first_token": out["first_token"] - start,
                "after_ready": out["first_token"] - ready, "startup": startup_line(worker)}
    finally:
        worker.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--bin-dir", help="where the binaries are (default: build release ones)")
    args = parser.parse_args()
    use_binaries(args.bin_dir)

    with tempfile.TemporaryDirectory() as tmp:
        keys = pathlib.Path(tmp) / "keys"
        keys.mkdir()
        (keys / "key").write_text(KEY)
        routes = pathlib.Path(tmp) / "routes.yaml"
        write_routes(routes, [])
        router = Router(["--routes", str(routes), "--host", "127.0.0.1", "--port", "0"]).wait_ready()
        try:
            runs = [one_run(router, routes, keys, args.threads) for _ in range(args.runs)]
        finally:
            router.stop()

    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
               platform.processor())
    print(f"machine: {cpu}, {os.cpu_count()} cores; SmolLM2-135M Q4_1; {args.runs} runs")
    print("run  worker ready  first token  (after ready)  worker start-up")
    for i, r in enumerate(runs, 1):
        print(f"{i:3d}  {r['ready']:10.2f} s  {r['first_token']:9.2f} s  {r['after_ready']:11.2f} s  {r['startup']}")
    for key, name in (("ready", "worker ready"), ("first_token", "first token"), ("after_ready", "ready → first token")):
        values = [r[key] for r in runs]
        print(f"{name}: median {statistics.median(values):.2f} s, max {max(values):.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Scale from zero through the real router: a route-file pool with no
endpoints holds its requests (streamed and not) until the file gives it a
worker, which the test starts only after the requests arrived; then both
complete, and the router's held gauge falls back to zero."""

from __future__ import annotations

import threading
import time

from conftest import Router
from test_faults import wait_for
from test_router import NO_EOS, client, metric, worker, write_routes

KEY = "sk-scaling"
HELLO = [{"role": "user", "content": "Name three colors."}]
HELD = 'kandle_router_held{model="smollm2"}'


def test_requests_to_a_pool_at_zero_wait_for_its_first_worker(smollm2, tmp_path):
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "k").write_text(KEY)
    routes = tmp_path / "routes.yaml"
    write_routes(routes, [("smollm2", [], [])])
    router = Router(["--routes", str(routes), "--host", "127.0.0.1", "--port", "0", "--hold-timeout", "120s"])
    started = None
    try:
        router.wait_ready()
        results: dict[str, object] = {}

        def plain():
            r = client(router, KEY).chat.completions.create(model="smollm2", messages=HELLO, max_tokens=4)
            results["plain"] = r.choices[0].finish_reason

        def streamed():
            chunks = list(client(router, KEY).chat.completions.create(
                model="smollm2", messages=HELLO, max_tokens=8, stream=True, logit_bias=NO_EOS,
                stream_options={"include_usage": True},
            ))
            results["stream"] = (chunks[-1].usage.completion_tokens, len(chunks))

        threads = [threading.Thread(target=f) for f in (plain, streamed)]
        for t in threads:
            t.start()
        wait_for(lambda: metric(router, HELD) == 2, "the requests were not held", timeout=30)
        time.sleep(0.5)
        assert not results, "answered with no worker"

        # The scaler's part, done by hand: a worker starts, and the route file names it.
        started = worker(smollm2, "smollm2", tmp_path / "keys").wait_ready()
        write_routes(routes, [("smollm2", [], [started.base_url])])
        for t in threads:
            t.join(timeout=120)
        assert results["plain"] == "length"
        tokens, chunks = results["stream"]
        assert tokens == 8 and chunks >= 9
        assert metric(router, HELD) == 0
        assert metric(router, "kandle_router_hold_seconds_count") == 2
    finally:
        for s in (router, started):
            if s is not None:
                s.stop()

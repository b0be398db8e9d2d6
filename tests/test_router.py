"""The router in front of real workers, driven by the official openai SDK: each
model reaches its own pool, streams pass through unbuffered, errors are the
router's own (404, 503) or the worker's passed through (401), and a worker that
dies mid-run fails its requests cleanly while new ones go to the survivor."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import openai
import pytest

from conftest import Router, Worker

KEY_A, KEY_B = "sk-router-a", "sk-router-b"
HELLO = [{"role": "user", "content": "Name three colors."}]
# SmolLM2's end tokens, banned where a test needs a long completion.
NO_EOS = {"0": -100, "2": -100}
# An alias only the route file knows: the `other` worker was not started with it.
OTHER_ALIASES = ["model-b-alias"]


def worker(smollm2, name, keys, aliases=()):
    args = ["serve", "--model", str(smollm2), "--served-model-name", name, "--host", "127.0.0.1", "--port", "0",
            "--api-keys-dir", str(keys)]
    for alias in aliases:
        args += ["--alias", alias]
    return Worker(args)


def write_routes(path, pools):
    lines = ["models:"]
    for model, aliases, endpoints in pools:
        lines.append(f"  - model: {model}")
        lines.append(f"    aliases: {json.dumps(list(aliases))}")
        lines.append(f"    endpoints: {json.dumps(endpoints)}")
    path.write_text("\n".join(lines) + "\n")


def client(service, key) -> openai.OpenAI:
    return openai.OpenAI(base_url=service.base_url + "/v1", api_key=key, max_retries=0, timeout=120)


def metric(service, name: str) -> float:
    with urllib.request.urlopen(service.base_url + "/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture(scope="module")
def fleet(smollm2, tmp_path_factory):
    d = tmp_path_factory.mktemp("fleet")
    (d / "keys-a").mkdir()
    (d / "keys-a" / "k").write_text(KEY_A)
    (d / "keys-b").mkdir()
    (d / "keys-b" / "k").write_text(KEY_B)
    workers = [
        worker(smollm2, "smollm2", d / "keys-a", ["gpt-4o-mini"]),
        worker(smollm2, "smollm2", d / "keys-a", ["gpt-4o-mini"]),
        worker(smollm2, "other", d / "keys-b"),
    ]
    router = None
    try:
        for w in workers:
            w.wait_ready()
        routes = d / "routes.yaml"
        write_routes(routes, [
            ("smollm2", ["gpt-4o-mini"], [workers[0].base_url, workers[1].base_url]),
            ("other", OTHER_ALIASES, [workers[2].base_url]),
            ("empty", [], []),
        ])
        # A pool without endpoints is held for: a short hold keeps these tests quick.
        router = Router(
            ["--routes", str(routes), "--host", "127.0.0.1", "--port", "0", "--hold-timeout", "1s"]
        ).wait_ready()
        yield {"router": router, "workers": workers, "routes": routes}
    finally:
        for s in [router, *workers]:
            if s is not None:
                s.stop()


def test_each_model_reaches_its_own_pool(fleet):
    r = fleet["router"]
    a = client(r, KEY_A).chat.completions.create(model="smollm2", messages=HELLO, max_tokens=3)
    assert a.model == "smollm2"
    alias = client(r, KEY_A).chat.completions.create(model="gpt-4o-mini", messages=HELLO, max_tokens=3)
    assert alias.model == "gpt-4o-mini"
    b = client(r, KEY_B).chat.completions.create(model="other", messages=HELLO, max_tokens=3)
    assert b.model == "other"
    # Both workers of the first pool took requests (least in flight, ties rotate).
    for _ in range(4):
        client(r, KEY_A).chat.completions.create(model="smollm2", messages=HELLO, max_tokens=1)
    served = [metric(w, "kandle_prompt_tokens_total") for w in fleet["workers"][:2]]
    assert all(s > 0 for s in served), served


def test_legacy_completions_reach_the_pool_under_an_alias(fleet):
    r = client(fleet["router"], KEY_A).completions.create(model="gpt-4o-mini", prompt="Hello", max_tokens=3)
    assert r.model == "gpt-4o-mini" and r.object == "text_completion"
    events = list(client(fleet["router"], KEY_A).responses.create(model="gpt-4o-mini", input="Hello",
                                                                  max_output_tokens=16, stream=True))
    assert events[0].response.model == events[-1].response.model == "gpt-4o-mini"
    with pytest.raises(openai.NotFoundError):
        client(fleet["router"], KEY_A).completions.create(model="nope", prompt="Hello", max_tokens=3)


def test_node_sdk_through_the_router(fleet):
    from test_node_sdk import run_check

    run_check(fleet["router"].base_url, KEY_A, "smollm2")


def test_route_file_aliases_reach_the_worker_as_its_served_name(fleet):
    c = client(fleet["router"], KEY_B)
    r = c.chat.completions.create(model="model-b-alias", messages=HELLO, max_tokens=3)
    assert r.model == "model-b-alias"
    chunks = list(c.chat.completions.create(model="model-b-alias", messages=HELLO, max_tokens=3, stream=True,
                                            stream_options={"include_usage": True}))
    assert len(chunks) > 2
    assert {chunk.model for chunk in chunks} == {"model-b-alias"}
    raw = urllib.request.Request(
        fleet["router"].base_url + "/api/v1/chat/completions",
        data=json.dumps({"model": "model-b-alias", "messages": HELLO, "max_tokens": 2}).encode(),
        headers={"Authorization": f"Bearer {KEY_B}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(raw, timeout=60) as answer:
        assert json.loads(answer.read())["data"]["model"] == "model-b-alias"


def test_streams_pass_through_unbuffered(fleet):
    start = time.monotonic()
    stream = client(fleet["router"], KEY_A).chat.completions.create(
        model="smollm2", messages=HELLO, max_tokens=48, stream=True, stream_options={"include_usage": True},
        logit_bias=NO_EOS,
    )
    arrivals, chunks = [], []
    for chunk in stream:
        arrivals.append(time.monotonic())
        chunks.append(chunk)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == 48
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    # Events arrive as the worker makes them, not all at once at the end: the
    # chunks spread over most of the request's time (decoding 48 tokens takes
    # far longer than the prompt), whatever the machine's speed.
    spread, total = arrivals[-1] - arrivals[1], arrivals[-1] - start
    assert spread > 0.5 * total, (spread, total)


def test_tool_calls_and_structured_output_pass_through(fleet):
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999}},
        "required": ["id"], "additionalProperties": False}}}
    named = {"type": "function", "function": {"name": "lookup"}}
    for stream in (False, True):
        r = client(fleet["router"], KEY_A).chat.completions.create(
            model="gpt-4o-mini", messages=HELLO, tools=[tool], tool_choice=named, max_tokens=40, stream=stream)
        if stream:
            deltas = [d for c in r for ch in c.choices for d in (ch.delta.tool_calls or [])]
            assert [d.function.name for d in deltas if d.function.name] == ["lookup"]
            arguments = "".join(d.function.arguments or "" for d in deltas)
            assert isinstance(json.loads(arguments)["id"], int)
        else:
            assert r.choices[0].finish_reason == "tool_calls"
            assert r.choices[0].message.tool_calls[0].function.name == "lookup"
    obj = client(fleet["router"], KEY_A).chat.completions.create(
        model="smollm2", messages=HELLO, max_tokens=60, response_format={"type": "json_object"})
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content), dict)


def test_client_that_leaves_stops_the_workers_generation(fleet):
    stream = client(fleet["router"], KEY_A).chat.completions.create(
        model="smollm2", messages=HELLO, max_tokens=2000, stream=True, logit_bias=NO_EOS
    )
    it = iter(stream)
    for _ in range(3):
        next(it)
    running = lambda: sum(metric(w, "vllm:num_requests_running") for w in fleet["workers"][:2])  # noqa: E731
    assert running() == 1
    stream.close()
    deadline = time.monotonic() + 10
    while running() != 0:
        assert time.monotonic() < deadline, "the worker kept generating after the client left"
        time.sleep(0.05)


def test_unknown_model_is_the_routers_404(fleet):
    with pytest.raises(openai.NotFoundError) as e:
        client(fleet["router"], KEY_A).chat.completions.create(model="nope", messages=HELLO)
    assert e.value.body["code"] == "model_not_found"


def test_pool_that_stays_without_workers_is_503_with_retry_after_once_the_hold_ends(fleet):
    req = urllib.request.Request(
        fleet["router"].base_url + "/v1/chat/completions",
        data=json.dumps({"model": "empty", "messages": HELLO}).encode(),
        headers={"Authorization": f"Bearer {KEY_A}", "Content-Type": "application/json"},
    )
    started = time.monotonic()
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert time.monotonic() - started >= 1, "held for --hold-timeout first"
    assert e.value.code == 503
    assert e.value.headers["Retry-After"] == "10"
    assert json.loads(e.value.read())["error"]["code"] == "no_ready_endpoint"


def test_worker_errors_pass_through_unchanged(fleet):
    with pytest.raises(openai.AuthenticationError) as e:
        client(fleet["router"], "sk-wrong").chat.completions.create(model="smollm2", messages=HELLO)
    assert e.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.BadRequestError) as e:
        client(fleet["router"], KEY_A).chat.completions.create(model="smollm2", messages=HELLO, temperature=9)
    assert e.value.body["param"] == "temperature"


def test_model_list_shows_only_pools_that_accept_the_key(fleet):
    r = fleet["router"]
    assert {m.id for m in client(r, KEY_A).models.list().data} == {"smollm2", "gpt-4o-mini"}
    assert {m.id for m in client(r, KEY_B).models.list().data} == {"other"}
    with pytest.raises(openai.AuthenticationError):
        client(r, "sk-wrong").models.list()


def test_request_id_is_propagated_and_made_when_absent(fleet):
    raw = client(fleet["router"], KEY_A).chat.completions.with_raw_response.create(
        model="smollm2", messages=HELLO, max_tokens=1, extra_headers={"x-request-id": "trace-123"}
    )
    assert raw.headers["x-request-id"] == "trace-123"
    raw = client(fleet["router"], KEY_A).chat.completions.with_raw_response.create(
        model="smollm2", messages=HELLO, max_tokens=1
    )
    assert raw.headers["x-request-id"]
    assert metric(fleet["router"], "kandle_router_requests_total") > 0


def test_every_request_gets_one_router_access_line_without_the_key(fleet):
    r = fleet["router"]
    lines = lambda request_id: r.access_lines("kandle_operator::access", request_id)  # noqa: E731
    workers = {w.base_url for w in fleet["workers"]}
    c = client(r, KEY_A)
    c.chat.completions.create(model="smollm2", messages=HELLO, max_tokens=3,
                              extra_headers={"x-request-id": "router-plain"})
    stream = c.chat.completions.create(model="gpt-4o-mini", messages=HELLO, max_tokens=24, stream=True,
                                       logit_bias=NO_EOS, extra_headers={"x-request-id": "router-stream"})
    arrivals = [time.monotonic() for _ in stream]
    left = c.chat.completions.create(model="smollm2", messages=HELLO, max_tokens=2000, stream=True,
                                     logit_bias=NO_EOS, extra_headers={"x-request-id": "router-left"})
    it = iter(left)
    for _ in range(3):
        next(it)
    left.close()
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="nope", messages=HELLO, extra_headers={"x-request-id": "router-404"})
    ids = ("router-plain", "router-stream", "router-left", "router-404")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not all(lines(i) for i in ids):
        time.sleep(0.05)
    (plain,) = lines("router-plain")
    assert plain["method"] == "POST" and plain["path"] == "/v1/chat/completions" and plain["status"] == 200
    assert plain["model"] == "smollm2" and plain["worker"] in workers and plain["attempts"] == 1
    assert plain["finished"] is True and plain["duration_ms"] > 0
    (streamed,) = lines("router-stream")
    assert streamed["model"] == "gpt-4o-mini" and streamed["status"] == 200 and streamed["finished"] is True
    # Written when the stream ended, so its duration spans every chunk.
    assert streamed["duration_ms"] >= (arrivals[-1] - arrivals[0]) * 1000
    (gone,) = lines("router-left")
    assert gone["status"] == 200 and gone["finished"] is False
    (missing,) = lines("router-404")
    assert missing["status"] == 404 and missing["model"] == "nope"
    assert missing["worker"] == "-" and missing["attempts"] == 0
    assert not any(KEY_A in line or KEY_B in line for line in r.logs)


def test_route_file_changes_apply_without_restart(fleet):
    w = fleet["workers"]
    routes = fleet["routes"]

    def other_pool(endpoints):
        write_routes(routes, [
            ("smollm2", ["gpt-4o-mini"], [w[0].base_url, w[1].base_url]),
            ("other", OTHER_ALIASES, endpoints),
        ])

    def wait_until(predicate, what):
        deadline = time.monotonic() + 10
        while not predicate():
            assert time.monotonic() < deadline, what
            time.sleep(0.2)

    def other_status():
        try:
            client(fleet["router"], KEY_B).chat.completions.create(model="other", messages=HELLO, max_tokens=1)
            return 200
        except openai.APIStatusError as e:
            return e.status_code

    other_pool([])
    wait_until(lambda: other_status() == 503, "emptied pool still routed")
    other_pool([w[2].base_url])
    wait_until(lambda: other_status() == 200, "restored pool not routed")


def test_killed_worker_fails_its_requests_cleanly_and_the_survivor_takes_new_ones(smollm2, tmp_path):
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "k").write_text(KEY_A)
    pair = [worker(smollm2, "smollm2", tmp_path / "keys") for _ in range(2)]
    router = None
    try:
        for w in pair:
            w.wait_ready()
        routes = tmp_path / "routes.yaml"
        write_routes(routes, [("smollm2", [], [w.base_url for w in pair])])
        router = Router(["--routes", str(routes), "--host", "127.0.0.1", "--port", "0"]).wait_ready()
        stream = client(router, KEY_A).chat.completions.create(
            model="smollm2", messages=HELLO, max_tokens=2000, stream=True, logit_bias=NO_EOS
        )
        it = iter(stream)
        for _ in range(3):
            next(it)
        busy = [w for w in pair if metric(w, "vllm:num_requests_running") == 1]
        assert len(busy) == 1
        busy[0].kill()
        with pytest.raises((openai.APIError, openai.APIConnectionError)):
            for _ in it:
                pass
        survivor = next(w for w in pair if w is not busy[0])
        for _ in range(3):
            r = client(router, KEY_A).chat.completions.create(model="smollm2", messages=HELLO, max_tokens=2)
            assert r.choices[0].message.content is not None
        assert metric(survivor, "kandle_prompt_tokens_total") > 0
    finally:
        for s in [router, *pair]:
            if s is not None:
                s.stop()

"""Tenants at the router, against a real worker and the official openai SDK:
keys (401), model lists per tenant (403, /v1/models), limits with OpenAI's
headers (requests and tokens per minute, concurrent requests), tokens charged
from real usage (streamed, not, and cut short), key rotation and bad files,
and two routers sharing one limit through a real Redis (Debian
`redis-server`, started here)."""

from __future__ import annotations

import concurrent.futures
import json
import time
import urllib.error
import urllib.request

import openai
import pytest

from conftest import Router, Worker, start_redis

UPSTREAM = "sk-router-upstream"
HELLO = [{"role": "user", "content": "Name three colors."}]
NO_EOS = {"0": -100, "2": -100}

TENANTS = """\
tenants:
  - name: team-a
    keys: [sk-team-a]
    models: [fast]
  - name: team-b
    keys: [sk-team-b]
    models: [gated]
  - name: paced
    keys: [sk-paced]
    requestsPerMinute: 30
    models: ['*']
  - name: metered
    keys: [sk-metered]
    models: ['*']
  - name: thrifty
    keys: [sk-thrifty]
    tokensPerMinute: 120
    models: ['*']
  - name: single
    keys: [sk-single]
    concurrentRequests: 1
    models: ['*']
  - name: neighbour
    keys: [sk-neighbour]
    models: ['*']
"""


def client(router, key) -> openai.OpenAI:
    return openai.OpenAI(base_url=router.base_url + "/v1", api_key=key, max_retries=0, timeout=120)


def post(router, key, body, path="/v1/chat/completions"):
    """(status, headers, parsed body) of a raw request."""
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(router.base_url + path, data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.headers, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.loads(e.read() or b"null")


def metric(service, name: str, **labels) -> float:
    """The value of the first sample of `name` with these labels (0 if none)."""
    with urllib.request.urlopen(service.base_url + "/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            head, _, value = line.rpartition(" ")
            base, _, rest = head.partition("{")
            if base == name and all(f'{k}="{v}"' in rest for k, v in labels.items()):
                return float(value)
    return 0.0


def ready_body(router) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(router.base_url + "/ready", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def start_router(routes, tenants, upstream, *extra) -> Router:
    return Router(["--routes", str(routes), "--host", "127.0.0.1", "--port", "0", "--tenants", str(tenants),
                   "--upstream-key-file", str(upstream), "--hold-timeout", "1s", *extra]).wait_ready()


@pytest.fixture(scope="module")
def fleet(smollm2, tmp_path_factory):
    d = tmp_path_factory.mktemp("tenants")
    (d / "keys").mkdir()
    (d / "keys" / "router").write_text(UPSTREAM)
    (d / "upstream").write_text(UPSTREAM + "\n")
    worker = Worker(["serve", "--model", str(smollm2), "--served-model-name", "smollm2", "--host", "127.0.0.1",
                     "--port", "0", "--api-keys-dir", str(d / "keys")])
    router = None
    try:
        worker.wait_ready()
        routes = d / "routes.yaml"
        routes.write_text(f"models:\n  - model: smollm2\n    aliases: [fast]\n    endpoints: [{worker.base_url}]\n"
                          "  - model: gated\n    endpoints: []\n")
        tenants = d / "tenants.yaml"
        tenants.write_text(TENANTS)
        router = start_router(routes, tenants, d / "upstream")
        yield {"router": router, "worker": worker, "routes": routes, "tenants": tenants, "dir": d}
    finally:
        for s in (router, worker):
            if s is not None:
                s.stop()


def test_keys_are_checked_at_the_router_and_workers_get_the_routers_own(fleet):
    r = fleet["router"]
    status, _, body = post(r, None, {"model": "smollm2", "messages": HELLO})
    assert (status, body["error"]["code"]) == (401, "missing_api_key")
    with pytest.raises(openai.AuthenticationError) as e:
        client(r, "sk-nobody").chat.completions.create(model="smollm2", messages=HELLO, max_tokens=2)
    assert e.value.body["code"] == "invalid_api_key"
    # The worker knows only the router's key: a tenant's request reaches it.
    answer = client(r, "sk-team-a").chat.completions.create(model="smollm2", messages=HELLO, max_tokens=2)
    assert answer.choices[0].message.content is not None
    # The access line is written when the answer ends, and read from the router's output a moment later.
    wait_for(lambda: any('"tenant":"team-a"' in line for line in r.logs), "the access log naming the tenant")
    assert not any("sk-team-a" in line for line in r.logs), "keys are never logged"


def test_models_outside_a_tenants_list_look_like_models_that_do_not_exist(fleet):
    r = fleet["router"]
    # team-a lists the alias `fast`: the pool is open to it by either name.
    for model in ("fast", "smollm2"):
        assert client(r, "sk-team-a").chat.completions.create(model=model, messages=HELLO, max_tokens=1).model == model
    for key, model in (("sk-team-a", "gated"), ("sk-team-a", "no-such-model"), ("sk-team-b", "smollm2")):
        with pytest.raises(openai.PermissionDeniedError) as e:
            client(r, key).chat.completions.create(model=model, messages=HELLO, max_tokens=1)
        assert e.value.body["code"] == "model_not_found"
        assert e.value.body["message"] == f"The model `{model}` does not exist or you do not have access to it."
    # A tenant open to every model gets the usual 404 for one that does not exist.
    with pytest.raises(openai.NotFoundError):
        client(r, "sk-metered").chat.completions.create(model="no-such-model", messages=HELLO, max_tokens=1)


def test_model_list_shows_only_what_the_key_may_call(fleet):
    r = fleet["router"]
    assert "smollm2" in {m.id for m in client(r, "sk-team-a").models.list()}
    assert [m.id for m in client(r, "sk-team-b").models.list()] == []
    with pytest.raises(openai.AuthenticationError):
        client(r, "sk-nobody").models.list()


def test_requests_per_minute_gives_429_with_openai_headers_then_admits_again(fleet):
    r = fleet["router"]
    bad = {"model": "smollm2", "messages": HELLO, "temperature": 9}  # the worker's quick 400 still counts
    remaining = []
    for _ in range(30):
        status, headers, _ = post(r, "sk-paced", bad)
        assert status == 400
        assert headers["x-ratelimit-limit-requests"] == "30"
        remaining.append(int(headers["x-ratelimit-remaining-requests"]))
    assert remaining[0] == 29 and remaining[-1] <= 1, remaining
    while True:  # the bucket refills one request every 2 s: drain what came back meanwhile
        status, headers, body = post(r, "sk-paced", bad)
        if status == 429:
            break
    assert body["error"]["code"] == "rate_limit_exceeded"
    assert body["error"]["type"] == "requests"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"].endswith("s")
    wait = int(headers["Retry-After"])
    assert 1 <= wait <= 2
    assert metric(r, "kandle_router_tenant_rate_limited_total", tenant="paced", limit="requests") >= 1
    time.sleep(wait)
    ok = client(r, "sk-paced").chat.completions.with_raw_response.create(model="smollm2", messages=HELLO,
                                                                        max_tokens=1)
    assert ok.headers["x-ratelimit-limit-requests"] == "30"


def wait_for(condition, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.05)


def tenant_tokens(r, tenant, kind) -> float:
    return metric(r, "kandle_router_tenant_tokens_total", tenant=tenant, model="smollm2", kind=kind)


def test_usage_is_counted_per_tenant_streamed_or_not_and_when_the_client_leaves(fleet):
    r, w = fleet["router"], fleet["worker"]
    c = client(r, "sk-metered")
    answer = c.chat.completions.create(model="smollm2", messages=HELLO, max_tokens=5)
    assert tenant_tokens(r, "metered", "prompt") == answer.usage.prompt_tokens
    assert tenant_tokens(r, "metered", "completion") == answer.usage.completion_tokens

    # A stream whose client did not ask for usage: charged all the same, and
    # the usage chunk the router asked the worker for never reaches the client.
    before = (tenant_tokens(r, "metered", "prompt"), tenant_tokens(r, "metered", "completion"))
    worker_before = metric(w, "kandle_completion_tokens_total")
    chunks = list(c.chat.completions.create(model="smollm2", messages=HELLO, max_tokens=6, stream=True,
                                            logit_bias=NO_EOS))
    assert all(chunk.usage is None for chunk in chunks)
    assert all(chunk.choices for chunk in chunks)
    # Charged when the router lets go of the answer, just after its last byte.
    wait_for(lambda: tenant_tokens(r, "metered", "completion") - before[1] == 6, "the stream's charge")
    assert metric(w, "kandle_completion_tokens_total") - worker_before == 6
    assert tenant_tokens(r, "metered", "prompt") - before[0] == answer.usage.prompt_tokens

    # One that asked gets its usage chunk as usual.
    chunks = list(c.chat.completions.create(model="smollm2", messages=HELLO, max_tokens=3, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 3

    # A client that leaves mid-stream is charged its prompt and what it was sent.
    before = (tenant_tokens(r, "metered", "prompt"), tenant_tokens(r, "metered", "completion"))
    stream = c.chat.completions.create(model="smollm2", messages=HELLO, max_tokens=500, stream=True,
                                       logit_bias=NO_EOS)
    it = iter(stream)
    for _ in range(6):
        next(it)
    stream.close()
    wait_for(lambda: tenant_tokens(r, "metered", "completion") - before[1] >= 5, "the cut stream's charge")
    assert tenant_tokens(r, "metered", "prompt") - before[0] == answer.usage.prompt_tokens

    # A client that leaves a non-streamed answer before it comes is charged the
    # prompt's estimate (four bytes a token of what the router sent on).
    before = tenant_tokens(r, "metered", "prompt")
    impatient = openai.OpenAI(base_url=r.base_url + "/v1", api_key="sk-metered", max_retries=0, timeout=0.5)
    with pytest.raises(openai.APITimeoutError):
        impatient.chat.completions.create(model="smollm2", messages=HELLO, max_tokens=500, logit_bias=NO_EOS)
    wait_for(lambda: tenant_tokens(r, "metered", "prompt") > before, "the charge of a client that left")
    sent = len(json.dumps({"model": "smollm2", "messages": HELLO, "max_tokens": 500, "logit_bias": NO_EOS}))
    assert 0.5 * sent / 4 <= tenant_tokens(r, "metered", "prompt") - before <= 2 * sent / 4


def test_legacy_completions_are_routed_and_charged_like_chat(fleet):
    r = fleet["router"]
    c = client(r, "sk-metered")
    before = (tenant_tokens(r, "metered", "prompt"), tenant_tokens(r, "metered", "completion"))
    whole = c.completions.create(model="smollm2", prompt="Once upon a time", max_tokens=4, temperature=0,
                                 extra_body={"ignore_eos": True})
    assert whole.object == "text_completion" and whole.usage.completion_tokens == 4
    chunks = list(c.completions.create(model="smollm2", prompt="Once upon a time", max_tokens=4, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True}))
    # The router asked the worker for the stream's usage and kept it from this client.
    assert all(chunk.usage is None and chunk.choices for chunk in chunks)
    assert "".join(ch.text for chunk in chunks for ch in chunk.choices) == whole.choices[0].text
    wait_for(lambda: tenant_tokens(r, "metered", "completion") - before[1] == 8, "both answers' charge")
    assert tenant_tokens(r, "metered", "prompt") - before[0] == 2 * whole.usage.prompt_tokens


def test_responses_are_routed_and_charged_like_chat(fleet):
    r = fleet["router"]
    c = client(r, "sk-metered")
    before = (tenant_tokens(r, "metered", "prompt"), tenant_tokens(r, "metered", "completion"))
    whole = c.responses.create(model="smollm2", input="Once upon a time", max_output_tokens=16, temperature=0)
    assert whole.object == "response"
    events = list(c.responses.create(model="smollm2", input="Once upon a time", max_output_tokens=16,
                                     temperature=0, stream=True))
    assert events[0].type == "response.created" and events[-1].response.output_text == whole.output_text
    spent = 2 * whole.usage.output_tokens
    wait_for(lambda: tenant_tokens(r, "metered", "completion") - before[1] == spent, "both answers' charge")
    assert tenant_tokens(r, "metered", "prompt") - before[0] == 2 * whole.usage.input_tokens


def test_tenants_never_share_prefix_cache_blocks(fleet):
    r = fleet["router"]
    system = {"role": "system", "content": "You answer questions about the city's bus timetable. " * 8}
    messages = [system, {"role": "user", "content": "When is the last bus?"}]

    def cached(key, **extra):
        answer = client(r, key).chat.completions.create(model="smollm2", messages=messages, max_tokens=1, **extra)
        return answer.usage.prompt_tokens_details.cached_tokens

    cached("sk-metered")
    assert cached("sk-metered") > 0, "a tenant reuses its own blocks"
    assert cached("sk-neighbour") == 0, "another tenant's blocks are not reused"
    # A salt the client picks narrows within its tenant; it never reaches another's blocks.
    assert cached("sk-neighbour", extra_body={"cache_salt": "tenant:metered"}) == 0


def test_tokens_per_minute_are_charged_from_usage_and_refill(fleet):
    r = fleet["router"]
    c = client(r, "sk-thrifty")
    # More than the 120 tokens a minute in one answer: admitted (the budget was
    # there when it started), then the tenant is in debt.
    first = c.chat.completions.create(model="smollm2", messages=HELLO, max_tokens=100, logit_bias=NO_EOS)
    assert first.usage.total_tokens > 120
    deadline = time.monotonic() + 5
    while True:
        status, headers, body = post(r, "sk-thrifty", {"model": "smollm2", "messages": HELLO, "max_tokens": 1})
        if status == 429 or time.monotonic() > deadline:
            break
    assert status == 429, "the charge never arrived"
    assert body["error"]["type"] == "tokens"
    assert headers["x-ratelimit-limit-tokens"] == "120"
    assert headers["x-ratelimit-remaining-tokens"] == "0"
    wait = int(headers["Retry-After"])
    assert 1 <= wait <= 60
    time.sleep(wait)
    status, headers, _ = post(r, "sk-thrifty", {"model": "smollm2", "messages": HELLO, "max_tokens": 1})
    assert status == 200


def test_concurrent_requests_are_limited_until_one_ends(fleet):
    r = fleet["router"]
    c = client(r, "sk-single")
    stream = c.chat.completions.create(model="smollm2", messages=HELLO, max_tokens=500, stream=True,
                                       logit_bias=NO_EOS)
    it = iter(stream)
    next(it)
    with pytest.raises(openai.RateLimitError) as e:
        c.chat.completions.create(model="smollm2", messages=HELLO, max_tokens=1)
    assert "concurrent requests" in e.value.body["message"]
    stream.close()
    deadline = time.monotonic() + 10
    while True:
        try:
            c.chat.completions.create(model="smollm2", messages=HELLO, max_tokens=1)
            break
        except openai.RateLimitError:
            assert time.monotonic() < deadline, "the stream that ended still counts"
            time.sleep(0.05)


def test_with_quota_wait_a_request_past_its_limit_waits_for_its_place(fleet):
    d = fleet["dir"]
    router = start_router(fleet["routes"], fleet["tenants"], d / "upstream", "--quota-wait", "20s")
    try:
        c = client(router, "sk-single")
        stream = c.chat.completions.create(model="smollm2", messages=HELLO, max_tokens=500, stream=True,
                                           logit_bias=NO_EOS)
        it = iter(stream)
        next(it)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(c.chat.completions.create, model="smollm2", messages=HELLO, max_tokens=1)
            time.sleep(1)
            assert not waiting.done(), "admitted past concurrentRequests: 1"
            stream.close()
            assert waiting.result(timeout=20).choices
        assert metric(router, "kandle_router_tenant_rate_limited_total", tenant="single") == 0
    finally:
        router.stop()


def test_keys_rotate_and_a_bad_file_keeps_the_last_good_set(fleet):
    r, tenants = fleet["router"], fleet["tenants"]
    try:
        tenants.write_text(TENANTS.replace("sk-team-a", "sk-team-a-new"))
        deadline = time.monotonic() + 10
        while post(r, "sk-team-a-new", {"model": "smollm2", "messages": HELLO, "max_tokens": 1})[0] != 200:
            assert time.monotonic() < deadline, "the new key never worked"
            time.sleep(0.1)
        assert post(r, "sk-team-a", {"model": "smollm2", "messages": HELLO, "max_tokens": 1})[0] == 401
        # A key listed twice: refused whole, the last good set stays, /ready says so.
        tenants.write_text(TENANTS.replace("sk-team-b", "sk-paced"))
        deadline = time.monotonic() + 10
        while "refused" not in ready_body(r)[1]:
            assert time.monotonic() < deadline, "the bad file was never noticed"
            time.sleep(0.1)
        status, text = ready_body(r)
        assert status == 200 and "share a key" in text and "sk-paced" not in text
        assert post(r, "sk-team-b", {"model": "gated", "messages": HELLO})[0] != 401
    finally:
        tenants.write_text(TENANTS)


def test_a_router_that_never_had_good_tenants_refuses_traffic(fleet):
    d = fleet["dir"]
    broken = d / "broken.yaml"
    broken.write_text("tenants:\n  - name: x\n    keys: [k]\n    requestPerMinute: 3\n    models: ['*']\n")
    router = Router(["--routes", str(fleet["routes"]), "--host", "127.0.0.1", "--port", "0", "--tenants",
                     str(broken), "--upstream-key-file", str(d / "upstream")])
    try:
        router._listening.wait(30)
        status, text = ready_body(router)
        assert status == 503 and "requestPerMinute" in text
        status, _, body = post(router, "k", {"model": "smollm2", "messages": HELLO})
        assert (status, body["error"]["code"]) == (503, "tenants_not_loaded")
    finally:
        router.stop()


@pytest.fixture
def redis_server(tmp_path):
    proc, url = start_redis(tmp_path)
    yield {"proc": proc, "url": url}
    proc.terminate()
    proc.wait(timeout=10)


def test_two_routers_share_one_limit_through_redis_and_fail_as_configured(fleet, redis_server):
    d = fleet["dir"]
    tenants = d / "shared-tenants.yaml"
    tenants.write_text("tenants:\n  - name: shared\n    keys: [sk-shared]\n    requestsPerMinute: 10\n"
                       "    models: ['*']\n")
    store = ["--quota-store", redis_server["url"]]
    routers = [start_router(fleet["routes"], tenants, d / "upstream", *store),
               start_router(fleet["routes"], tenants, d / "upstream", *store, "--quota-store-failure", "closed")]
    try:
        bad = {"model": "smollm2", "messages": HELLO, "temperature": 9}
        statuses = [post(routers[i % 2], "sk-shared", bad)[0] for i in range(12)]
        # Ten admitted between them (a request may have refilled meanwhile), then both refuse.
        assert statuses[:10] == [400] * 10, statuses
        assert statuses[-1] == 429, statuses
        assert post(routers[0], "sk-shared", bad)[0] == 429
        assert post(routers[1], "sk-shared", bad)[0] == 429

        redis_server["proc"].terminate()
        redis_server["proc"].wait(timeout=10)
        # Fail open: served without limits; fail closed: 503. Both say so in /ready.
        assert post(routers[0], "sk-shared", {"model": "smollm2", "messages": HELLO, "max_tokens": 1})[0] == 200
        status, _, body = post(routers[1], "sk-shared", {"model": "smollm2", "messages": HELLO, "max_tokens": 1})
        assert (status, body["error"]["code"]) == (503, "quota_store_unavailable")
        assert "serving without limits" in ready_body(routers[0])[1]
        assert "refusing requests" in ready_body(routers[1])[1]
        assert sum("quota store unreachable" in line for line in routers[0].logs) == 1, "logged once"
    finally:
        for router in routers:
            router.stop()

"""Conformance of kandle-worker serving SmolLM2, driven by the official openai SDK.

Assertions are about behaviour (shapes, limits, determinism, errors), never about
what a 135M model happens to say.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import openai
import pytest

from conftest import Worker

KEY = "sk-test-primary"
HELLO = [{"role": "user", "content": "Name three colors."}]


def client(worker, key=KEY, prefix="/v1") -> openai.OpenAI:
    return openai.OpenAI(base_url=worker.base_url + prefix, api_key=key, max_retries=0, timeout=120)


def post(worker, path, body: bytes | dict, key=KEY):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(
        worker.base_url + path,
        data=data,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def metric(worker, name: str) -> float:
    with urllib.request.urlopen(worker.base_url + "/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"metric {name} not found")


def test_non_streaming_shape_and_usage(worker):
    raw = client(worker).chat.completions.with_raw_response.create(
        model="smollm2", messages=HELLO, max_tokens=16, temperature=0
    )
    assert raw.headers.get("x-request-id")
    r = raw.parse()
    assert r.id.startswith("chatcmpl-")
    assert r.object == "chat.completion"
    assert r.model == "smollm2"
    assert r.system_fingerprint
    assert len(r.choices) == 1
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert 0 < r.usage.completion_tokens <= 16
    assert r.usage.prompt_tokens > 10
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens_details.cached_tokens == 0


def test_streaming_with_usage_matches_non_streaming(worker):
    c = client(worker)
    whole = c.chat.completions.create(model="smollm2", messages=HELLO, max_tokens=24, temperature=0)
    chunks = list(
        c.chat.completions.create(
            model="smollm2",
            messages=HELLO,
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    assert len({ch.id for ch in chunks}) == 1
    with_choices = [ch for ch in chunks if ch.choices]
    finishes = [ch.choices[0].finish_reason for ch in with_choices]
    assert finishes[-1] == whole.choices[0].finish_reason
    assert all(f is None for f in finishes[:-1])
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage.completion_tokens == whole.usage.completion_tokens
    assert usage_chunk.usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(ch.usage is None for ch in chunks[:-1])
    streamed = "".join(ch.choices[0].delta.content or "" for ch in with_choices)
    assert streamed == whole.choices[0].message.content


def test_stream_ends_with_done(worker):
    status, headers, body = post(
        worker,
        "/v1/chat/completions",
        {"model": "smollm2", "messages": HELLO, "max_tokens": 4, "stream": True},
    )
    assert status == 200
    assert headers["content-type"].startswith("text/event-stream")
    events = [line[len("data: "):] for line in body.decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert "usage" not in json.loads(events[0])


def test_stop_sequence_cuts_before_it(worker):
    c = client(worker)
    free = c.chat.completions.create(model="smollm2", messages=HELLO, max_tokens=32, temperature=0)
    text = free.choices[0].message.content
    assert len(text) > 12
    stop = text[8:12]
    cut = c.chat.completions.create(model="smollm2", messages=HELLO, max_tokens=32, temperature=0, stop=[stop, "@@@"])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert stop not in cut.choices[0].message.content
    streamed = c.chat.completions.create(
        model="smollm2", messages=HELLO, max_tokens=32, temperature=0, stop=stop, stream=True
    )
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices) == text[: text.index(stop)]


def test_seed_reproduces_sampling(worker):
    c = client(worker)

    def run(seed):
        r = c.chat.completions.create(model="smollm2", messages=HELLO, max_tokens=20, temperature=1.0, seed=seed)
        return r.choices[0].message.content

    assert run(42) == run(42)
    assert len({run(1), run(2), run(3)}) > 1


def test_max_tokens_one_is_length(worker):
    for field in ("max_tokens", "max_completion_tokens"):
        r = client(worker).chat.completions.create(model="smollm2", messages=HELLO, temperature=0, **{field: 1})
        assert r.choices[0].finish_reason == "length"
        assert r.usage.completion_tokens == 1


def test_n_choices_and_logprobs(worker):
    r = client(worker).chat.completions.create(
        model="smollm2", messages=HELLO, max_tokens=5, n=2, seed=3, logprobs=True, top_logprobs=3
    )
    assert [c.index for c in r.choices] == [0, 1]
    for choice in r.choices:
        entries = choice.logprobs.content
        assert entries
        for e in entries:
            assert e.logprob <= 0
            assert len(e.top_logprobs) == 3
            assert e.top_logprobs[0].logprob >= e.top_logprobs[-1].logprob
    assert r.usage.completion_tokens == sum(1 for c in r.choices for _ in c.logprobs.content)


def test_alias_and_model_list(worker):
    models = client(worker).models.list()
    assert {m.id for m in models.data} == {"smollm2", "gpt-4o-mini"}
    r = client(worker).chat.completions.create(model="gpt-4o-mini", messages=HELLO, max_tokens=2)
    assert r.model == "gpt-4o-mini"


def test_missing_and_wrong_key_are_401(worker):
    with pytest.raises(openai.AuthenticationError) as e:
        client(worker, key="sk-wrong").chat.completions.create(model="smollm2", messages=HELLO)
    assert e.value.body["code"] == "invalid_api_key"
    status, _, body = post(worker, "/v1/chat/completions", {"model": "smollm2", "messages": HELLO}, key="")
    assert status == 401
    assert json.loads(body)["error"]["code"] == "missing_api_key"
    with pytest.raises(openai.AuthenticationError):
        client(worker, key="sk-wrong").models.list()


def test_unknown_model_is_404(worker):
    with pytest.raises(openai.NotFoundError) as e:
        client(worker).chat.completions.create(model="no-such-model", messages=HELLO)
    assert e.value.body["code"] == "model_not_found"
    assert e.value.body["param"] == "model"


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"temperature": 5}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"logit_bias": {"99999999": 1}}, "logit_bias.99999999"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"enable_thinking": True}, "enable_thinking"),
        ({"reasoning_effort": "high"}, "reasoning_effort"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}},
         "response_format.json_schema.name"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": {"type": "nope"}}}},
         "response_format"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"enable_search": True}, "enable_search"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function", "function": {"name": "g"}}},
         "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}],
          "tool_choice": "required"}, "tools"),
        ({"frobnicate": 1}, "frobnicate"),
    ],
)
def test_invalid_parameters_are_400_naming_param(worker, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        client(worker).chat.completions.create(model="smollm2", messages=HELLO, max_tokens=2, extra_body=extra)
    assert e.value.body["param"] == param
    assert e.value.body["message"]


def test_invalid_messages_are_400(worker):
    cases = [
        ("not a list", "messages"),
        ([], "messages"),
        ([{"role": "wizard", "content": "x"}], "messages[0].role"),
        ([{"role": "user"}], "messages[0].content"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages[0].content[0].type"),
        ([{"role": "tool", "content": "x"}], "messages[0].tool_call_id"),
    ]
    for messages, param in cases:
        status, _, body = post(worker, "/v1/chat/completions", {"model": "smollm2", "messages": messages})
        assert status == 400, (messages, body)
        assert json.loads(body)["error"]["param"] == param


def test_text_parts_and_developer_role_are_accepted(worker):
    r = client(worker).chat.completions.create(
        model="smollm2",
        messages=[
            {"role": "developer", "content": "Answer briefly."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]},
        ],
        max_tokens=3,
    )
    assert r.choices[0].message.content is not None


def test_malformed_json_is_400(worker):
    status, headers, body = post(worker, "/v1/chat/completions", b'{"model": "smollm2", "messages": [')
    assert status == 400
    assert json.loads(body)["error"]["code"] == "invalid_json"
    assert headers.get("x-request-id")


def test_prompt_past_context_is_400(worker):
    with pytest.raises(openai.BadRequestError) as e:
        client(worker).chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi " * 2100}])
    assert e.value.body["code"] == "context_length_exceeded"
    status, _, body = post(worker, "/v1/chat/completions", {"model": "smollm2", "messages": HELLO, "max_tokens": 2040})
    assert status == 400 and json.loads(body)["error"]["param"] == "max_tokens"


def test_oversized_body_is_413(worker):
    status, _, body = post(worker, "/v1/chat/completions", b"x" * 70_000)
    assert status == 413
    assert json.loads(body)["error"]["code"] == "request_too_large"


def test_compatible_mode_path(worker):
    r = client(worker, prefix="/compatible-mode/v1").chat.completions.create(
        model="smollm2", messages=HELLO, max_tokens=3, extra_body={"top_k": 20, "enable_thinking": False}
    )
    assert r.choices[0].message.content is not None
    assert {m.id for m in client(worker, prefix="/compatible-mode/v1").models.list().data} >= {"smollm2"}


def test_envelope_path(worker):
    status, _, body = post(worker, "/api/v1/chat/completions", {"model": "smollm2", "messages": HELLO, "max_tokens": 3})
    assert status == 200
    env = json.loads(body)
    assert env["success"] is True and env["code"] == "200" and env["message"]
    assert env["data"]["object"] == "chat.completion"
    assert env["data"]["usage"]["completion_tokens"] <= 3

    status, _, body = post(worker, "/api/v1/chat/completions", {"model": "nope", "messages": HELLO})
    assert status == 404
    env = json.loads(body)
    assert env["success"] is False and env["code"] == "model_not_found" and env["data"] is None

    status, _, body = post(
        worker, "/api/v1/chat/completions", {"model": "smollm2", "messages": HELLO, "max_tokens": 3, "stream": True}
    )
    events = [line[6:] for line in body.decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[0])["object"] == "chat.completion.chunk"


def test_metrics_expose_vllm_gauges_and_counts(worker):
    client(worker).chat.completions.create(model="smollm2", messages=HELLO, max_tokens=2)
    assert metric(worker, "vllm:num_requests_running") >= 0
    assert metric(worker, "vllm:num_requests_waiting") >= 0
    assert 0 <= metric(worker, "vllm:kv_cache_usage_perc") <= 1
    assert metric(worker, "kandle_prompt_tokens_total") > 0
    assert metric(worker, "kandle_completion_tokens_total") > 0
    assert metric(worker, "kandle_time_to_first_token_seconds_count") > 0
    assert metric(worker, "kandle_requests_total") > 0
    # Once the work is done the load gauges return to zero.
    deadline = time.monotonic() + 5
    while metric(worker, "vllm:num_requests_running") != 0 or metric(worker, "kandle_batch_size") != 0:
        assert time.monotonic() < deadline, "load gauges stuck after the request finished"
        time.sleep(0.05)


def wait_until_idle(worker, timeout=10.0):
    """Until the worker runs nothing (an earlier test's abandoned stream may still be ending)."""
    deadline = time.monotonic() + timeout
    while metric(worker, "vllm:num_requests_running") != 0:
        assert time.monotonic() < deadline, "the worker never went idle"
        time.sleep(0.05)


def test_client_disconnect_stops_generation(worker):
    wait_until_idle(worker)
    stream = client(worker).chat.completions.create(
        model="smollm2", messages=HELLO, max_tokens=1500, temperature=1.0, stream=True, extra_body={"min_p": 0.0}
    )
    for i, _ in enumerate(stream):
        if i == 3:
            break
    assert metric(worker, "vllm:num_requests_running") == 1
    stream.close()
    wait_until_idle(worker)


def test_rotated_key_works_without_restart(smollm2, tmp_path):
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "k").write_text("sk-old")
    w = Worker(["serve", "--model", str(smollm2), "--served-model-name", "smollm2", "--host", "127.0.0.1",
                "--port", "0", "--api-keys-dir", str(keys)])
    try:
        w.wait_ready()
        assert client(w, key="sk-old").models.list().data
        (keys / "k").write_text("sk-new")
        deadline = time.monotonic() + 10
        while True:
            try:
                client(w, key="sk-new").models.list()
                break
            except openai.AuthenticationError:
                assert time.monotonic() < deadline, "rotated key not accepted"
                time.sleep(0.1)
        with pytest.raises(openai.AuthenticationError):
            client(w, key="sk-old").models.list()
        assert not any("sk-new" in line or "sk-old" in line for line in w.logs)
    finally:
        w.stop()


def test_refuses_to_start_without_keys(smollm2, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    w = Worker(["serve", "--model", str(smollm2), "--port", "0", "--api-keys-dir", str(empty)])
    assert w.proc.wait(timeout=30) != 0
    w.join_logs()
    assert any("no API keys" in line for line in w.logs), w.logs


def test_every_request_gets_one_access_line_without_the_key(worker):
    def lines(request_id):
        return worker.access_lines("kandle_worker::access", request_id)

    c = client(worker)
    r = c.chat.completions.create(model="smollm2", messages=HELLO, max_tokens=5,
                                  extra_headers={"x-request-id": "access-plain"})
    stream = c.chat.completions.create(model="smollm2", messages=HELLO, max_tokens=5, stream=True,
                                       extra_headers={"x-request-id": "access-stream"})
    streamed = sum(1 for _ in stream)
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="nope", messages=HELLO, extra_headers={"x-request-id": "access-404"})
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not all(lines(i) for i in ("access-plain", "access-stream", "access-404")):
        time.sleep(0.05)
    (plain,) = lines("access-plain")
    assert plain["path"] == "/v1/chat/completions" and plain["status"] == 200 and plain["method"] == "POST"
    assert plain["prompt_tokens"] == r.usage.prompt_tokens
    assert plain["completion_tokens"] == r.usage.completion_tokens
    assert plain["duration_ms"] > 0
    (streamed_line,) = lines("access-stream")
    assert streamed_line["status"] == 200 and streamed_line["finished"] is True and streamed > 1
    assert 0 < streamed_line["completion_tokens"] <= 5
    (missing,) = lines("access-404")
    assert missing["status"] == 404
    assert not any("sk-test-primary" in line for line in worker.logs)

"""openai SDK checks against a kandle router in a cluster (run by e2e/run.sh,
which sets KANDLE_E2E_BASE_URL and KANDLE_E2E_KEY)."""

from __future__ import annotations

import os

import openai
import pytest

BASE_URL = os.environ["KANDLE_E2E_BASE_URL"]
KEY = os.environ["KANDLE_E2E_KEY"]
HELLO = [{"role": "user", "content": "Name three colors."}]


def client(key: str = KEY, prefix: str = "/v1") -> openai.OpenAI:
    return openai.OpenAI(base_url=BASE_URL + prefix, api_key=key, max_retries=0, timeout=120)


def test_chat_and_alias():
    r = client().chat.completions.create(model="smollm2", messages=HELLO, max_tokens=8, temperature=0)
    assert r.choices[0].message.content
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert client().chat.completions.create(model="gpt-4o-mini", messages=HELLO, max_tokens=2).model == "gpt-4o-mini"


def test_stream_with_usage_equals_non_stream():
    whole = client().chat.completions.create(model="smollm2", messages=HELLO, max_tokens=16, temperature=0)
    chunks = list(client().chat.completions.create(
        model="smollm2", messages=HELLO, max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content


def test_compatible_mode_path():
    r = client(prefix="/compatible-mode/v1").chat.completions.create(model="smollm2", messages=HELLO, max_tokens=2)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_errors():
    with pytest.raises(openai.AuthenticationError):
        client("sk-wrong").chat.completions.create(model="smollm2", messages=HELLO)
    with pytest.raises(openai.NotFoundError):
        client().chat.completions.create(model="nope", messages=HELLO)
    with pytest.raises(openai.BadRequestError) as e:
        client().chat.completions.create(model="smollm2", messages=HELLO, temperature=7)
    assert e.value.body["param"] == "temperature"


def test_model_list():
    assert {m.id for m in client().models.list().data} == {"smollm2", "gpt-4o-mini"}

"""kandle-worker serving the real Gemma 3 270M GGUF (a base model without a
chat template: kandle renders chats in its documented ChatML default),
driven by the official openai SDK. Assertions are about behaviour, never
about what the model says. The whole conformance suite runs against it with
`KANDLE_TEST_GGUF=$(scripts/fetch-gemma3.sh) python3 -m pytest tests/test_worker_openai.py`.
"""

from __future__ import annotations

import json
import urllib.request

import jsonschema
import openai
import pytest

from conftest import Worker, gemma3_path

KEY = "sk-test-primary"
ASK = [{"role": "user", "content": "Name three colors."}]


@pytest.fixture(scope="module")
def gemma(key_dir):
    w = Worker(["serve", "--model", str(gemma3_path()), "--served-model-name", "gemma3", "--host", "127.0.0.1",
                "--port", "0", "--api-keys-dir", str(key_dir), "--max-context", "4096"])
    try:
        yield w.wait_ready()
    finally:
        w.stop()


def client(worker) -> openai.OpenAI:
    return openai.OpenAI(base_url=worker.base_url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def test_ready_says_the_chat_template_is_the_default(gemma):
    with urllib.request.urlopen(gemma.base_url + "/ready", timeout=10) as r:
        ready = json.load(r)
    assert ready["chat_template"] == "default", ready
    assert ready["model"]["architecture"] == "gemma3", ready
    assert any("no chat template" in line for line in gemma.logs), "the start-up log says so"


def test_streamed_and_whole_answers_agree(gemma):
    c = client(gemma)
    whole = c.chat.completions.create(model="gemma3", messages=ASK, max_tokens=24, temperature=0, logprobs=True,
                                      top_logprobs=3)
    choice = whole.choices[0]
    assert choice.finish_reason in ("stop", "length")
    # The token that completes a stop string counts, and has no log-probability entry (its text is cut).
    assert len(choice.logprobs.content) <= whole.usage.completion_tokens <= len(choice.logprobs.content) + 1
    assert all(len(t.top_logprobs) == 3 for t in choice.logprobs.content)
    stream = c.chat.completions.create(model="gemma3", messages=ASK, max_tokens=24, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    text, usage = "", None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for ch in chunk.choices:
            text += ch.delta.content or ""
    assert text == (choice.message.content or "")
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens


def test_the_default_templates_turn_end_ends_the_answer(gemma):
    # Gemma 3's tokenizer has no <|im_end|> token: the base model writes it
    # as text, which ends the answer like a stop string, never shown.
    for seed in range(3):
        r = client(gemma).chat.completions.create(model="gemma3", messages=ASK, max_tokens=48, temperature=0.8,
                                                  seed=seed)
        assert "<|im_end|>" not in (r.choices[0].message.content or "")


def test_structured_output_and_tool_calls_hold_their_schema(gemma):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": False}
    c = client(gemma)
    r = c.chat.completions.create(model="gemma3", messages=[{"role": "user", "content": "A person as JSON."}],
                                  max_tokens=60, temperature=0.7, seed=3,
                                  response_format={"type": "json_schema",
                                                   "json_schema": {"name": "person", "schema": schema, "strict": True}})
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 30}}, "required": ["city"],
        "additionalProperties": False}}}]
    r = c.chat.completions.create(model="gemma3", messages=[{"role": "user", "content": "Weather in Oslo?"}],
                                  tools=tools, tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                  max_tokens=60, temperature=0)
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and r.choices[0].finish_reason == "tool_calls"
    assert isinstance(json.loads(call.function.arguments)["city"], str)


def test_a_prompt_past_the_context_is_a_clear_400(gemma):
    with pytest.raises(openai.BadRequestError) as e:
        client(gemma).chat.completions.create(model="gemma3", messages=[{"role": "user", "content": "x " * 5000}],
                                              max_tokens=8)
    assert "context" in str(e.value)

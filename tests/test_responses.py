"""The Responses API (`POST /v1/responses`) of kandle-worker serving SmolLM2,
driven by the official openai SDK's `client.responses.create`: text, the typed
event stream in order, a function tool round trip with `function_call_output`,
`text.format` json_schema, and 400s. Behaviour only, never what a 135M model
says."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from test_worker_openai import client

WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                          "required": ["city"], "additionalProperties": False}}



@pytest.fixture(scope="module")
def worker(module_worker):
    """This module's own worker: its prefix cache does not reach other modules' tests."""
    return module_worker

def create(worker, **params):
    return client(worker).responses.create(model="smollm2", **params)


def test_text_answer_shape_and_usage(worker):
    r = create(worker, input="Name three colors.", instructions="Answer briefly.", max_output_tokens=16,
               temperature=0, metadata={"team": "a"})
    assert r.id.startswith("resp_") and r.object == "response" and r.model == "smollm2"
    assert r.status in ("completed", "incomplete") and r.instructions == "Answer briefly."
    (message,) = r.output
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert message.content[0].type == "output_text" and r.output_text == message.content[0].text
    assert r.usage.output_tokens <= 16
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.usage.input_tokens_details.cached_tokens >= 0 and r.metadata == {"team": "a"}
    if r.status == "incomplete":
        assert r.incomplete_details.reason == "max_output_tokens"
    # The same request as chat gives the same greedy text (one engine path).
    chat = client(worker).chat.completions.create(model="smollm2", temperature=0, max_tokens=16, messages=[
        {"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name three colors."}])
    assert chat.choices[0].message.content == r.output_text


def test_message_items_and_logprobs(worker):
    r = create(worker, input=[{"role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
                              {"type": "message", "role": "assistant",
                               "content": [{"type": "output_text", "text": "Hello!"}]},
                              {"role": "user", "content": "Count to three."}],
               max_output_tokens=8, temperature=0, include=["message.output_text.logprobs"], top_logprobs=2)
    part = r.output[0].content[0]
    assert len(part.logprobs) == r.usage.output_tokens
    assert all(len(lp.top_logprobs) == 2 and lp.logprob <= 0 for lp in part.logprobs)


def test_stream_events_come_in_order_and_build_the_response(worker):
    whole = create(worker, input="Name three colors.", max_output_tokens=12, temperature=0)
    events = list(create(worker, input="Name three colors.", max_output_tokens=12, temperature=0, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed" if whole.status == "completed" else "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[2].item.content == [], "parts arrive in content_part.added, not in the added item"
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == whole.output_text == events[-1].response.output_text
    assert events[-1].response.usage.output_tokens == whole.usage.output_tokens


def test_function_tool_round_trip(worker):
    first = create(worker, input="What is the weather in Paris?", tools=[WEATHER],
                   tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=60, temperature=0)
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].call_id
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER["parameters"])
    # The call and its output go back as items; the model answers in text.
    second = create(worker, tools=[WEATHER], max_output_tokens=20, temperature=0, input=[
        {"role": "user", "content": "What is the weather in Paris?"},
        {"type": "function_call", "call_id": calls[0].call_id, "name": "get_weather", "arguments": calls[0].arguments},
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": "Sunny, 21 C."}])
    assert second.output and second.usage.input_tokens > first.usage.input_tokens
    # Streamed calls: arguments arrive as deltas and add up to the call.
    events = list(create(worker, input="Weather in Oslo?", tools=[WEATHER], tool_choice="required",
                         max_output_tokens=60, temperature=0, stream=True))
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert done, [e.type for e in events]
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert deltas == done[0].arguments


def test_text_format_json_schema_holds(worker):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": False}
    r = create(worker, input="A person as JSON.", max_output_tokens=60, temperature=0,
               text={"format": {"type": "json_schema", "name": "person", "schema": schema, "strict": True}})
    assert r.status == "completed"
    jsonschema.validate(json.loads(r.output_text), schema)
    assert r.text.format.type == "json_schema"


@pytest.mark.parametrize("params, param", [
    ({"store": True}, "store"),
    ({"previous_response_id": "resp_123"}, "previous_response_id"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}]},
     "input[0].content[0].type"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}, "strict": "yes"}}},
     "text.format.strict"),
    ({"temperature": 2.5}, "temperature"),
    ({"include": ["reasoning.encrypted_content"]}, "include[0]"),
    ({"extra_body": {"messages": []}}, "messages"),
])
def test_what_cannot_be_honoured_is_a_400_naming_it(worker, params, param):
    params.setdefault("input", "Hi")
    with pytest.raises(openai.BadRequestError) as e:
        create(worker, max_output_tokens=16, **params)
    assert e.value.body["param"] == param, e.value.body

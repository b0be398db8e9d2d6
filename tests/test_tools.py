"""Tool calling through the official openai SDK on SmolLM2, whose template has
no tools: kandle's generic tool prompt, and constrained decoding for the
`required` and named choices. Assertions are about the shape of the calls.
"""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from test_worker_openai import client


WEATHER_PARAMS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 30},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather forecast for a city",
                                      "parameters": WEATHER_PARAMS}},
    {"type": "function", "function": {"name": "get_time", "description": "Current time in a city",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                                                     "required": ["city"], "additionalProperties": False}}},
]
ASK = [{"role": "user", "content": "What will the weather be in Paris this week?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def assert_valid_call(call):
    args = json.loads(call.function.arguments)
    if call.function.name == "get_weather":
        jsonschema.validate(args, WEATHER_PARAMS)
    else:
        assert call.function.name == "get_time" and isinstance(args, dict)


def ask(module_worker, **extra):
    params = {"model": "smollm2", "messages": ASK, "tools": TOOLS, "max_tokens": 120, **extra}
    return client(module_worker).chat.completions.create(**params)


def test_a_named_tool_choice_is_always_a_valid_call_of_that_function(module_worker):
    for seed in range(5):
        r = ask(module_worker, tool_choice=NAMED, temperature=1.0, seed=seed)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.content is None
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), WEATHER_PARAMS)


def test_required_makes_at_least_one_call_of_an_offered_tool(module_worker):
    for seed in range(3):
        r = ask(module_worker, tool_choice="required", temperature=1.0, seed=seed, n=2, parallel_tool_calls=False)
        for choice in r.choices:
            assert choice.finish_reason == "tool_calls", choice
            (call,) = choice.message.tool_calls
            assert call.function.name in {"get_weather", "get_time"}
            assert isinstance(json.loads(call.function.arguments), dict)


def test_required_with_parallel_calls_ends_with_complete_calls(module_worker):
    # Parallel calls allowed (the default): forced calls come as an array the
    # model closes, so a single weather question ends in its call.
    choice = ask(module_worker, tool_choice="required", max_tokens=200, temperature=0).choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.content is None, choice
    (call,) = choice.message.tool_calls
    assert_valid_call(call)
    # Sampled, a 135M model may go on adding calls until max_tokens: each
    # complete one is valid, and a cut one is never content.
    choice = ask(module_worker, tool_choice="required", max_tokens=200, temperature=1.0, seed=7).choices[0]
    assert choice.message.content is None, choice
    calls = choice.message.tool_calls
    complete = calls if choice.finish_reason == "tool_calls" else calls[:-1]
    assert choice.finish_reason in {"tool_calls", "length"} and calls
    for call in complete:
        assert_valid_call(call)


def test_a_forced_call_cut_by_max_tokens_is_never_content(module_worker):
    for stream in (False, True):
        r = ask(module_worker, tool_choice="required", temperature=0, max_tokens=8, stream=stream)
        if stream:
            chunks = list(r)
            content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
            assert finish == ["length"]
        else:
            content = r.choices[0].message.content or ""
            assert r.choices[0].finish_reason == "length"
        assert content == "", content


def test_a_streamed_call_reassembles_to_the_non_streamed_one(module_worker):
    whole = ask(module_worker, tool_choice=NAMED, temperature=0).choices[0]
    stream = ask(module_worker, tool_choice=NAMED, temperature=0, stream=True)
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = call["id"] or delta.id
                if delta.function.name:
                    call["name"] += delta.function.name
                call["arguments"] += delta.function.arguments or ""
            finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (c.function.name, c.function.arguments) for c in whole.message.tool_calls
    ]


def test_a_tool_result_round_trip_is_accepted(module_worker):
    first = ask(module_worker, tool_choice=NAMED, temperature=0).choices[0].message
    call = first.tool_calls[0]
    messages = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C all week."},
    ]
    r = client(module_worker).chat.completions.create(model="smollm2", messages=messages, tools=TOOLS, max_tokens=20)
    assert r.choices[0].finish_reason in {"stop", "length", "tool_calls"}


def test_tool_choice_none_offers_no_tools(module_worker):
    r = ask(module_worker, tool_choice="none", temperature=0, max_tokens=10)
    assert r.choices[0].message.tool_calls is None
    assert r.choices[0].finish_reason in {"stop", "length"}


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"tool_choice": {"type": "function", "function": {"name": "no_such_tool"}}}, "tool_choice"),
        ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ],
)
def test_bad_tool_requests_are_400_naming_the_param(module_worker, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        ask(module_worker, **extra)
    assert e.value.body["param"] == param


def test_auto_answers_are_text_or_valid_calls(module_worker):
    # With kandle's generic prompt, `auto` is constrained too: an answer that
    # opens a call is a valid call of an offered tool; anything else is text.
    for seed in range(6):
        choice = ask(module_worker, temperature=1.0, seed=seed, max_tokens=80).choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason in {"tool_calls", "length"}
            for call in choice.message.tool_calls:
                assert_valid_call(call)
        else:
            assert not (choice.message.content or "").lstrip().startswith("{")

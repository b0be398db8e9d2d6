"""Structured output through the official openai SDK on SmolLM2: whatever a
135M model would write, constrained decoding keeps it inside the format.

Assertions are about the shape of the output, never about what it says.
"""

from __future__ import annotations

import concurrent.futures
import json

import jsonschema
import openai
import pytest

from test_worker_openai import client, metric


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "role", "tags", "address"],
    "additionalProperties": False,
}

ASK = [{"role": "user", "content": "Describe a library user as JSON."}]


def person_format(strict: bool = True) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": strict}}


def test_json_schema_output_always_parses_and_validates(module_worker):
    def one(seed: int):
        return client(module_worker).chat.completions.create(
            model="smollm2", messages=ASK, max_tokens=300, temperature=1.0, seed=seed, response_format=person_format()
        )

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(20)))
    for r in answers:
        choice = r.choices[0]
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), PERSON)
    assert metric(module_worker, "kandle_grammar_mask_seconds_count") > 0


def test_json_object_output_is_an_object(module_worker):
    for seed in range(4):
        r = client(module_worker).chat.completions.create(
            model="smollm2", messages=ASK, max_tokens=200, temperature=0.8, seed=seed,
            response_format={"type": "json_object"},
        )
        if r.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(r.choices[0].message.content), dict)
        else:
            # Cut by max_tokens: still the start of an object.
            assert r.choices[0].finish_reason == "length"
            assert r.choices[0].message.content.startswith("{")


def test_streamed_constrained_output_equals_the_non_streamed_one(module_worker):
    params = dict(model="smollm2", messages=ASK, max_tokens=300, temperature=0, response_format=person_format())
    whole = client(module_worker).chat.completions.create(**params).choices[0].message.content
    stream = client(module_worker).chat.completions.create(stream=True, **params)
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed == whole
    jsonschema.validate(json.loads(streamed), PERSON)


def test_choices_and_logprobs_keep_working_under_a_schema(module_worker):
    r = client(module_worker).chat.completions.create(
        model="smollm2", messages=ASK, max_tokens=300, temperature=1.0, seed=3, n=3, logprobs=True, top_logprobs=2,
        response_format=person_format(),
    )
    assert len(r.choices) == 3
    for choice in r.choices:
        jsonschema.validate(json.loads(choice.message.content), PERSON)
        # Log-probabilities are those of the constrained distribution: finite.
        assert all(t.logprob > float("-inf") for t in choice.logprobs.content)


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}},
        {"type": "no-such-type"},
        {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
    ],
)
def test_schemas_that_cannot_be_enforced_are_400_naming_response_format(module_worker, schema):
    with pytest.raises(openai.BadRequestError) as e:
        client(module_worker).chat.completions.create(
            model="smollm2", messages=ASK, max_tokens=5,
            response_format={"type": "json_schema", "json_schema": {"name": "bad", "schema": schema, "strict": True}},
        )
    assert e.value.body["param"] == "response_format"
    assert "response_format" in e.value.body["message"]

"""The legacy Completions API (`POST /v1/completions`) of kandle-worker serving
SmolLM2, driven by the official openai SDK's `client.completions.create`.
Assertions are about behaviour, never about what a 135M model says.
"""

from __future__ import annotations

import openai
import pytest

from test_worker_openai import KEY, client, post

PROMPT = "The three primary colors are"



@pytest.fixture(scope="module")
def worker(module_worker):
    """This module's own worker: its prefix cache does not reach other modules' tests."""
    return module_worker

def complete(worker, **params):
    return client(worker).completions.create(model="smollm2", **params)


def test_shape_usage_and_the_legacy_default_length(worker):
    r = complete(worker, prompt=PROMPT, temperature=0)
    assert r.id.startswith("cmpl-") and r.object == "text_completion" and r.model == "smollm2"
    (choice,) = r.choices
    assert choice.index == 0 and choice.logprobs is None
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 16, "max_tokens defaults to 16"
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_several_prompts_and_n_make_one_list_of_choices(worker):
    prompts = [PROMPT, "Once upon a time"]
    r = complete(worker, prompt=prompts, n=2, max_tokens=6, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    # Prompt p's choice j is at p * n + j; greedy choices of one prompt agree.
    assert r.choices[0].text == r.choices[1].text and r.choices[2].text == r.choices[3].text
    alone = [complete(worker, prompt=p, max_tokens=6, temperature=0) for p in prompts]
    assert [r.choices[0].text, r.choices[2].text] == [a.choices[0].text for a in alone]
    assert r.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)


def test_token_id_prompts_and_echo(worker):
    text = complete(worker, prompt=PROMPT, max_tokens=5, temperature=0, echo=True)
    assert text.choices[0].text.startswith(PROMPT)
    ids = [504, 1907, 3085, 5093, 359]
    by_ids = complete(worker, prompt=ids, max_tokens=5, temperature=0, echo=True)
    assert by_ids.usage.prompt_tokens == len(ids)
    nothing = complete(worker, prompt=PROMPT, max_tokens=0, echo=True)
    assert (nothing.choices[0].text, nothing.choices[0].finish_reason) == (PROMPT, "length")
    assert nothing.usage.completion_tokens == 0


def test_logprobs_list_each_token_with_its_alternatives_and_offset(worker):
    r = complete(worker, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    n = r.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    text = r.choices[0].text
    for token, logprob, top, offset in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, lp.text_offset):
        assert logprob <= 0 and token in top and len(top) <= 4
        assert max(top.values()) == pytest.approx(logprob), "greedy: the sampled token is the likeliest"
        assert text[offset:offset + len(token)] == token


def test_echo_with_logprobs_scores_the_prompt(worker):
    r = complete(worker, prompt=PROMPT, max_tokens=4, temperature=0, echo=True, logprobs=2)
    lp, text = r.choices[0].logprobs, r.choices[0].text
    prompt_tokens = r.usage.prompt_tokens
    assert len(lp.tokens) == prompt_tokens + r.usage.completion_tokens
    # The first prompt token has nothing before it to be scored against.
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x is not None and x <= 0 for x in lp.token_logprobs[1:])
    assert "".join(lp.tokens[:prompt_tokens]) == PROMPT and text.startswith(PROMPT)
    for token, offset in zip(lp.tokens, lp.text_offset):
        assert text[offset:offset + len(token)] == token
    # The prompt's scores do not depend on what follows, on n, or on a stream.
    nothing = complete(worker, prompt=PROMPT, max_tokens=0, echo=True, logprobs=2)
    assert nothing.choices[0].logprobs.token_logprobs == lp.token_logprobs[:prompt_tokens]
    assert nothing.choices[0].text == PROMPT and nothing.usage.completion_tokens == 0
    two = complete(worker, prompt=[PROMPT, PROMPT], n=2, max_tokens=2, temperature=0, echo=True, logprobs=2)
    for choice in two.choices:
        assert choice.logprobs.token_logprobs[:prompt_tokens] == pytest.approx(lp.token_logprobs[:prompt_tokens])
    chunks = list(complete(worker, prompt=PROMPT, max_tokens=4, temperature=0, echo=True, logprobs=2, stream=True))
    streamed = [x for c in chunks for ch in c.choices if ch.logprobs for x in ch.logprobs.token_logprobs]
    assert streamed[:prompt_tokens] == lp.token_logprobs[:prompt_tokens]
    assert "".join(ch.text for c in chunks for ch in c.choices) == text


def test_a_one_token_prompt_is_echoed_with_its_null_score(worker):
    whole = complete(worker, prompt="Hi", max_tokens=2, temperature=0, echo=True, logprobs=1)
    assert whole.usage.prompt_tokens == 1
    lp = whole.choices[0].logprobs
    assert lp.tokens[0] == "Hi" and lp.token_logprobs[0] is None
    chunks = list(complete(worker, prompt="Hi", max_tokens=2, temperature=0, echo=True, logprobs=1, stream=True))
    assert "".join(ch.text for c in chunks for ch in c.choices) == whole.choices[0].text


def test_stream_matches_the_whole_answer(worker):
    whole = complete(worker, prompt=PROMPT, max_tokens=12, temperature=0)
    chunks = list(complete(worker, prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                           stream_options={"include_usage": True}))
    assert all(c.object == "text_completion" and c.id == chunks[0].id for c in chunks)
    assert "".join(ch.text for c in chunks for ch in c.choices) == whole.choices[0].text
    finishes = [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_vllm_extensions_work_on_completions(worker):
    r = complete(worker, prompt=PROMPT, max_tokens=6, temperature=0,
                 extra_body={"ignore_eos": True, "min_tokens": 6, "stop_token_ids": [2]})
    assert (r.choices[0].finish_reason, r.usage.completion_tokens) == ("length", 6)


@pytest.mark.parametrize("params, param", [
    ({"suffix": " and blue."}, "suffix"),
    ({"best_of": 3}, "best_of"),
    ({"logprobs": 6}, "logprobs"),
    ({"n": 0}, "n"),
    ({"extra_body": {"messages": []}}, "messages"),
])
def test_what_cannot_be_honoured_is_a_400_naming_it(worker, params, param):
    with pytest.raises(openai.BadRequestError) as e:
        complete(worker, prompt=PROMPT, max_tokens=4, **params)
    assert e.value.body["param"] == param, e.value.body


def test_missing_prompt_and_unknown_model(worker):
    status, _, body = post(worker, "/v1/completions", {"model": "smollm2"})
    assert status == 400 and b'"param":"prompt"' in body
    status, _, _ = post(worker, "/v1/completions", {"model": "nope", "prompt": "x"}, key=KEY)
    assert status == 404

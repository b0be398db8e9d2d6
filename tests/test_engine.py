"""The engine seen through the official openai SDK on SmolLM2: continuous
batching, the prefix cache, shared prefill of n choices, KV-cache limits.

Assertions are about behaviour and accounting, never about what the model says.
"""

from __future__ import annotations

import concurrent.futures
import json
import pathlib
import subprocess
import time
import urllib.error
import urllib.request

import openai
import pytest

from conftest import serve, worker_binary
from test_worker_openai import client, metric

# A long shared system prompt: several full KV blocks (16 tokens each).
SYSTEM = "You are a careful assistant for a public library. " * 12


@pytest.fixture(scope="module")
def uncached(smollm2, key_dir):
    w = serve(smollm2, key_dir, "--no-prefix-cache")
    try:
        yield w
    finally:
        w.stop()


def ask(worker, question: str, **extra):
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    params = {"max_tokens": 12, "temperature": 0, **extra}
    return client(worker).chat.completions.create(model="smollm2", messages=messages, **params)


def test_shared_system_prompt_is_served_from_the_prefix_cache(worker, uncached):
    first = ask(worker, "Where are the atlases?")
    second = ask(worker, "When does the library open?")
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached > 0, second.usage
    assert cached % 16 == 0 and cached < second.usage.prompt_tokens
    assert first.usage.prompt_tokens_details.cached_tokens <= cached
    # The cache changes where the keys and values come from, not the answer.
    again = ask(uncached, "When does the library open?")
    assert again.usage.prompt_tokens_details.cached_tokens == 0
    assert again.choices[0].message.content == second.choices[0].message.content
    assert metric(worker, "vllm:prefix_cache_hits_total") > 0
    assert metric(worker, "vllm:prefix_cache_queries_total") >= metric(worker, "vllm:prefix_cache_hits_total")


def test_cache_salt_shares_blocks_only_between_requests_with_the_same_salt(worker):
    salted = {"extra_body": {"cache_salt": "salt-of-tenant-a-0123456789"}}
    first = ask(worker, "Which floor has maps?", **salted)
    assert first.usage.prompt_tokens_details.cached_tokens == 0, "no block was ever computed with this salt"
    same = ask(worker, "Which floor has maps?", **salted)
    assert same.usage.prompt_tokens_details.cached_tokens > 0
    other = ask(worker, "Which floor has maps?", extra_body={"cache_salt": "salt-of-tenant-b-0123456789"})
    assert other.usage.prompt_tokens_details.cached_tokens == 0, "another salt reads nothing of the first's"
    assert other.choices[0].message.content == first.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as e:
        ask(worker, "Which floor has maps?", extra_body={"cache_salt": ""})
    assert e.value.body["param"] == "cache_salt"


def health(worker) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(worker.base_url + "/health", timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_a_step_past_the_step_timeout_fails_health_until_it_ends(smollm2, key_dir):
    # Every real step takes longer than 1 ms: a stand-in for a step that hangs.
    w = serve(smollm2, key_dir, "--step-timeout", "1ms")
    try:
        assert health(w)[0] == 200, "idle: no step runs"
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            answer = pool.submit(ask, w, "Tell me about the reading room.", max_tokens=64,
                                 logit_bias={"2": -100})
            seen = set()
            while not answer.done():
                status, body = health(w)
                if status == 503:
                    seen.add(body["error"]["code"])
                    assert "stuck" in body["error"]["message"]
            assert answer.result().usage.completion_tokens == 64
        assert seen == {"engine_stalled"}
        assert health(w)[0] == 200, "the step ended"
        assert any("past its timeout" in line for line in w.logs)
        deadline = time.monotonic() + 5  # the watchdog looks every 10 ms here
        while metric(w, "kandle_engine_stalled") != 0:
            assert time.monotonic() < deadline, "the gauge stayed up"
            time.sleep(0.05)
    finally:
        w.stop()


def test_n_choices_prefill_the_prompt_once(uncached):
    before = metric(uncached, "kandle_prefill_tokens_total")
    r = ask(uncached, "Recommend a book.", n=4, temperature=1.0, seed=3)
    prefilled = metric(uncached, "kandle_prefill_tokens_total") - before
    prompt = r.usage.prompt_tokens
    assert len(r.choices) == 4
    # The first choice computes the prompt; the others share its full blocks
    # and compute only the partial last block.
    assert prompt <= prefilled < prompt + 3 * 16, (prompt, prefilled)


def test_cache_config_is_published(worker):
    with urllib.request.urlopen(worker.base_url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    line = next(l for l in text.splitlines() if l.startswith("vllm:cache_config_info{"))
    assert 'block_size="16"' in line and "num_gpu_blocks=" in line


def test_concurrent_streams_share_forward_passes(worker):
    """Eight requests at once are decoded together: some step carries several."""
    before = metric(worker, "kandle_step_sequences_sum")
    steps_before = metric(worker, "kandle_step_sequences_count")
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: ask(worker, f"Question {i}: name a color.", max_tokens=8), range(8)))
    assert all(a.choices[0].finish_reason in ("stop", "length") for a in answers)
    sequences = metric(worker, "kandle_step_sequences_sum") - before
    steps = metric(worker, "kandle_step_sequences_count") - steps_before
    assert sequences / steps > 1.5, (sequences, steps)


def test_prompt_larger_than_the_kv_cache_is_400(smollm2, key_dir):
    w = serve(smollm2, key_dir, "--kv-cache-memory", "3Mi")
    try:
        with pytest.raises(openai.BadRequestError) as e:
            client(w).chat.completions.create(
                model="smollm2", messages=[{"role": "user", "content": "word " * 200}], max_tokens=4
            )
        assert e.value.code == "context_length_exceeded"
        assert "KV cache" in e.value.message
        small = client(w).chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=4)
        assert small.choices[0].finish_reason in ("stop", "length")
        # Usage by blocks returns to zero once requests are done.
        deadline = time.monotonic() + 5
        while metric(w, "vllm:kv_cache_usage_perc") != 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        w.stop()


def test_a_gpu_this_build_cannot_open_is_a_clear_start_up_error(smollm2):
    # This build has no CUDA (`auto` takes the CPU); asking for a GPU fails
    # at start-up, before serving, and says why; a device that is not one is a
    # usage error.
    for device, why in (("cuda", "built without CUDA"), ("cuda:1", "built without CUDA"),
                        ("gpu", "expected auto, cpu, cuda or cuda:N")):
        run = subprocess.run([str(worker_binary()), "serve", "--model", str(smollm2), "--no-auth", "--port", "0",
                              "--device", device], capture_output=True, text=True, timeout=120)
        assert run.returncode != 0, run
        assert why in run.stderr + run.stdout, run


def test_ready_reports_the_kernels_and_threads(smollm2, key_dir):
    w = serve(smollm2, key_dir, "--threads", "1")
    try:
        with urllib.request.urlopen(w.base_url + "/ready", timeout=5) as r:
            ready = json.load(r)
    finally:
        w.stop()
    # A Q4_1 GGUF runs on kandle's CPU kernels at the best level this CPU has.
    assert ready["compute"]["kernels"] in {"scalar", "avx2", "avx512", "avx-vnni", "avx512-vnni"}, ready
    assert ready["compute"]["threads"] == 1
    assert ready["compute"]["device"] == "cpu", ready
    assert ready["model"]["quantization"] == "Q4_1"
    # SmolLM2's GGUF carries its template.
    assert ready["chat_template"] == "model", ready


def test_kernels_can_be_held_to_a_level_the_cpu_runs(smollm2, key_dir):
    # Scalar: every CPU runs it.
    w = serve(smollm2, key_dir, "--kernels", "scalar", "--threads", "1")
    try:
        with urllib.request.urlopen(w.base_url + "/ready", timeout=5) as r:
            assert json.load(r)["compute"]["kernels"] == "scalar"
        held = client(w).chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=2)
    finally:
        w.stop()
    assert held.usage.completion_tokens >= 1
    # A level this CPU lacks is refused at start, naming what it runs.
    flags = pathlib.Path("/proc/cpuinfo").read_text()
    lacking = next((isa for isa, flag in (("avx512-vnni", "avx512_vnni"), ("avx-vnni", "avx_vnni"),
                                          ("avx512", "avx512bw"), ("avx2", "avx2")) if f" {flag}" not in flags), None)
    if lacking is None:
        pytest.skip("this CPU runs every level")
    run = subprocess.run([str(worker_binary()), "serve", "--model", str(smollm2), "--no-auth", "--port", "0",
                          "--kernels", lacking], capture_output=True, text=True, timeout=120)
    assert run.returncode != 0, run
    assert f"does not run the {lacking} kernels" in run.stderr + run.stdout, run

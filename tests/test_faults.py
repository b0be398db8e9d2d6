"""Faults against the real binaries: oversized bodies, signals with streams in
flight, a key rotated under load, a full queue, and clients that leave.

Every test starts the workers and routers it needs (the session `worker` is
left alone); the worker SIGKILL mid-stream test is in test_router.py."""

from __future__ import annotations

import http.client
import json
import shutil
import signal
import socket
import time
import urllib.error
import urllib.request

import openai
import pytest

from conftest import Router, serve
from test_router import NO_EOS, client, metric, write_routes

KEY = "sk-faults"
HELLO = [{"role": "user", "content": "Name three colors."}]
BIG = 64 * 1024 * 1024
CHAT_OK = 'kandle_requests_total{path="/v1/chat/completions",status="200"}'


def wait_for(predicate, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def secret_dir(path, key: str):
    """A directory laid out like a mounted Kubernetes Secret: the key file is a
    link through `..data`, itself a link to a timestamped directory."""
    path.mkdir()
    rotate(path, key, "..v1")
    (path / "api-key").symlink_to("..data/api-key")
    return path


def rotate(path, key: str, version: str) -> None:
    """Swaps the Secret's `..data` link to a new version atomically, as the kubelet does."""
    (path / version).mkdir()
    (path / version / "api-key").write_text(key)
    old = (path / "..data").resolve() if (path / "..data").exists() else None
    (path / "..tmp").symlink_to(version)
    (path / "..tmp").replace(path / "..data")
    if old is not None:
        shutil.rmtree(old)


def running(service) -> float:
    return metric(service, "vllm:num_requests_running")


def long_stream(service, key=KEY, max_tokens=2000):
    """A stream that generates `max_tokens` tokens, after its first chunk."""
    stream = client(service, key).chat.completions.create(
        model="smollm2", messages=HELLO, max_tokens=max_tokens, stream=True, logit_bias=NO_EOS,
        stream_options={"include_usage": True},
    )
    it = iter(stream)
    next(it)
    return stream, it


def finish(it) -> tuple[str | None, int | None]:
    """Reads a stream to `[DONE]`: its finish_reason and completion tokens."""
    reason, tokens = None, None
    for chunk in it:
        if chunk.choices:
            reason = chunk.choices[0].finish_reason or reason
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return reason, tokens


def accepts(service, key: str) -> bool:
    try:
        client(service, key).models.list()
        return True
    except openai.AuthenticationError:
        return False


def post_raw(service, path: str, body, key: str = KEY, chunked: bool = False):
    """POSTs with http.client, so a connection reset surfaces as an exception."""
    host, port = service.address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request(
            "POST", path, body=body, encode_chunked=chunked,
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        r = conn.getresponse()
        return r.status, r.getheader("Connection"), json.loads(r.read())
    finally:
        conn.close()


def big_chunks():
    piece = b"x" * (1024 * 1024)
    for _ in range(BIG // len(piece)):
        yield piece


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return secret_dir(tmp_path_factory.mktemp("faults") / "keys", KEY)


@pytest.fixture(scope="module")
def plain(smollm2, keys):
    """A worker with the default limits."""
    w = worker(smollm2, keys)
    try:
        yield w
    finally:
        w.stop()


@pytest.fixture(scope="module")
def narrow(smollm2, keys):
    """A worker that runs one sequence and queues one more."""
    w = worker(smollm2, keys, "--max-batch-size", "1", "--max-waiting", "1")
    try:
        yield w
    finally:
        w.stop()


def worker(smollm2, keys, *extra: str):
    """A ready worker on one compute thread: the spin barriers of a wider pool
    slow down badly on a machine whose cores other processes share."""
    return serve(smollm2, keys, "--threads", "1", *extra)


def router_for(tmp_path, *workers) -> Router:
    routes = tmp_path / "routes.yaml"
    write_routes(routes, [("smollm2", [], [w.base_url for w in workers])])
    return Router(["--routes", str(routes), "--host", "127.0.0.1", "--port", "0"]).wait_ready()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_64_mib_body_is_read_then_refused_with_413(plain, chunked):
    body = big_chunks() if chunked else b"x" * BIG
    status, connection, error = post_raw(plain, "/v1/chat/completions", body, chunked=chunked)
    assert status == 413 and connection == "close"
    assert error["error"]["code"] == "request_too_large" and error["error"]["type"] == "invalid_request_error"


def test_64_mib_body_with_a_wrong_key_is_401_not_a_reset(plain):
    status, connection, error = post_raw(plain, "/v1/chat/completions", b"x" * BIG, key="sk-wrong")
    assert status == 401 and connection == "close"
    assert error["error"]["code"] == "invalid_api_key"


def test_router_answers_a_64_mib_body_with_413(plain, tmp_path):
    router = router_for(tmp_path, plain)
    try:
        status, _, error = post_raw(router, "/v1/chat/completions", b"x" * BIG)
        assert status == 413 and error["error"]["code"]
    finally:
        router.stop()


def test_full_queue_is_429_with_retry_after_then_served_once_it_drains(narrow):
    first, _ = long_stream(narrow)
    wait_for(lambda: running(narrow) == 1, "the first stream never ran")
    queued, queued_it = long_stream(narrow, max_tokens=4)
    with pytest.raises(openai.RateLimitError) as refused:
        client(narrow, KEY).chat.completions.create(model="smollm2", messages=HELLO, max_tokens=2)
    assert int(refused.value.response.headers["retry-after"]) >= 1
    assert refused.value.body["code"] == "server_overloaded"
    first.close()
    assert finish(queued_it) == ("length", 4)
    r = client(narrow, KEY).chat.completions.create(model="smollm2", messages=HELLO, max_tokens=2)
    assert r.choices[0].finish_reason == "length"


def test_client_leaving_a_non_streaming_request_frees_its_slot(narrow):
    wait_for(lambda: running(narrow) == 0, "the worker was busy before the test")
    body = json.dumps({"model": "smollm2", "messages": HELLO, "max_tokens": 2000, "logit_bias": NO_EOS}).encode()
    host, port = narrow.address.rsplit(":", 1)
    with socket.create_connection((host, int(port))) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: kandle\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        wait_for(lambda: running(narrow) == 1, "the request never ran")
    wait_for(lambda: running(narrow) == 0, "the slot stayed taken after the client left")
    # The only slot is free again: a new request is served at once.
    r = client(narrow, KEY).with_options(timeout=20).chat.completions.create(
        model="smollm2", messages=HELLO, max_tokens=2
    )
    assert r.choices[0].finish_reason == "length"


def test_rotated_key_lets_running_streams_finish_and_new_ones_need_it(smollm2, tmp_path):
    keys = secret_dir(tmp_path / "keys", "sk-old")
    w = worker(smollm2, keys)
    try:
        streams = [long_stream(w, "sk-old", max_tokens=48) for _ in range(8)]
        wait_for(lambda: running(w) == 8, "the eight streams never ran together")
        rotate(keys, "sk-new", "..v2")
        wait_for(lambda: accepts(w, "sk-new"), "the new key was never accepted")
        assert running(w) == 8, "a stream ended before the rotation applied: the test needs longer ones"
        with pytest.raises(openai.AuthenticationError):
            client(w, "sk-old").chat.completions.create(model="smollm2", messages=HELLO, max_tokens=2)
        assert [finish(it) for _, it in streams] == [("length", 48)] * 8
        r = client(w, "sk-new").chat.completions.create(model="smollm2", messages=HELLO, max_tokens=2)
        assert r.choices[0].finish_reason == "length"
    finally:
        w.stop()


def test_worker_sigterm_finishes_its_streams_while_new_requests_go_elsewhere(smollm2, keys, plain, tmp_path):
    leaving = worker(smollm2, keys)
    router = router_for(tmp_path, leaving, plain)
    try:
        # The balancer puts one stream on each worker.
        streams = [long_stream(router, max_tokens=120) for _ in range(2)]
        wait_for(lambda: running(leaving) == 1 and running(plain) == 1, "the streams did not run one per worker")
        served_before = metric(plain, CHAT_OK)
        leaving.proc.send_signal(signal.SIGTERM)
        # At once: not ready, and a request sent to it straight is refused with
        # a 503 a router retries elsewhere (the listener stays open meanwhile).
        wait_for(lambda: status_of(leaving, "/ready") == 503, "/ready stayed 200 after SIGTERM", timeout=5)
        status, _, body = post_raw(leaving, "/v1/chat/completions", json.dumps({"model": "smollm2", "messages": HELLO}))
        assert (status, body["error"]["code"]) == (503, "shutting_down")
        for _ in range(3):
            r = client(router, KEY).chat.completions.create(model="smollm2", messages=HELLO, max_tokens=2)
            assert r.choices[0].finish_reason == "length"
        assert leaving.proc.poll() is None, "the stream ended before the new requests: the test needs a longer one"
        assert [finish(it) for _, it in streams] == [("length", 120)] * 2
        assert leaving.proc.wait(timeout=15) == 0
        leaving.join_logs()
        assert any("taken ones finish" in line for line in leaving.logs)
        assert metric(plain, CHAT_OK) == served_before + 3, "a new request went to the leaving worker"
    finally:
        router.stop()
        leaving.stop()


def test_router_sigterm_drains_its_streams(plain, tmp_path):
    router = router_for(tmp_path, plain)
    try:
        stream, it = long_stream(router, max_tokens=60)
        router.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: status_of(router, "/ready") == 503, "/ready stayed 200 after SIGTERM", timeout=5)
        status, _, body = post_raw(router, "/v1/chat/completions", json.dumps({"model": "smollm2", "messages": HELLO}))
        assert (status, body["error"]["code"]) == (503, "shutting_down")
        assert router.proc.poll() is None, "the router left before its stream ended"
        assert finish(it) == ("length", 60)
        assert router.proc.wait(timeout=15) == 0
        host, port = router.address.rsplit(":", 1)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((host, int(port)), timeout=1).close()
    finally:
        router.stop()


def status_of(service, path: str) -> int:
    """The HTTP status of GET `path` (0 when the connection fails)."""
    try:
        with urllib.request.urlopen(service.base_url + path, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, ConnectionError):
        return 0

"""Fixtures that start the real kandle-worker binary and talk to it over HTTP."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 120


def worker_binary() -> pathlib.Path:
    path = os.environ.get("KANDLE_WORKER_BIN")
    if path:
        return pathlib.Path(path)
    return ROOT / "target" / "debug" / "kandle-worker"


def smollm2_path() -> pathlib.Path:
    path = os.environ.get("KANDLE_TEST_GGUF")
    if path:
        return pathlib.Path(path)
    out = subprocess.run(
        [str(ROOT / "scripts" / "fetch-smollm2.sh")], check=True, capture_output=True, text=True
    )
    return pathlib.Path(out.stdout.strip())


class Worker:
    """A running kandle-worker process; its log lines are kept for assertions."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None):
        self.args = args
        self.logs: list[str] = []
        self.address: str | None = None
        self._listening = threading.Event()
        self.proc = subprocess.Popen(
            [str(worker_binary()), "--log-format", "json", *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self._reader = threading.Thread(target=self._read_logs, daemon=True)
        self._reader.start()

    def join_logs(self, timeout: float = 10) -> None:
        """Waits until the exited process's log has been read to the end."""
        self._reader.join(timeout)

    def _read_logs(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.logs.append(line)
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            address = record.get("fields", {}).get("address")
            if address and self.address is None:
                self.address = address
                self._listening.set()

    @property
    def base_url(self) -> str:
        return f"http://{self.address}"

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> "Worker":
        deadline = time.monotonic() + timeout
        if not self._listening.wait(timeout):
            raise RuntimeError("worker never listened:\n" + "".join(self.logs))
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("worker exited:\n" + "".join(self.logs))
            try:
                with urllib.request.urlopen(self.base_url + "/ready", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.1)
        raise RuntimeError("worker not ready in time:\n" + "".join(self.logs))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="session")
def smollm2() -> pathlib.Path:
    return smollm2_path()


@pytest.fixture(scope="session")
def key_dir(tmp_path_factory) -> pathlib.Path:
    d = tmp_path_factory.mktemp("keys")
    (d / "primary").write_text("sk-test-primary\n")
    return d


@pytest.fixture(scope="session")
def worker(smollm2, key_dir):
    w = Worker(
        [
            "serve",
            "--model", str(smollm2),
            "--served-model-name", "smollm2",
            "--alias", "gpt-4o-mini",
            "--host", "127.0.0.1",
            "--port", "0",
            "--api-keys-dir", str(key_dir),
            "--max-body-bytes", "65536",
            "--max-context", "2048",
        ]
    )
    try:
        yield w.wait_ready()
    finally:
        w.stop()

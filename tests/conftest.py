"""Fixtures that start the real kandle-worker binary and talk to it over HTTP."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Where cargo puts the binaries (scripts/test.sh keeps them outside the clone).
TARGET = pathlib.Path(os.environ.get("CARGO_TARGET_DIR") or ROOT / "target")
START_TIMEOUT_S = 120


def worker_binary() -> pathlib.Path:
    path = os.environ.get("KANDLE_WORKER_BIN")
    if path:
        return pathlib.Path(path)
    return TARGET / "debug" / "kandle-worker"


def operator_binary() -> pathlib.Path:
    path = os.environ.get("KANDLE_OPERATOR_BIN")
    if path:
        return pathlib.Path(path)
    return TARGET / "debug" / "kandle-operator"


def use_binaries(bin_dir: str | None) -> pathlib.Path:
    """For scripts: run the binaries in `bin_dir`, or build release ones and run
    those; returns their directory."""
    path = pathlib.Path(bin_dir) if bin_dir else ROOT / "target" / "release"
    if not bin_dir:
        subprocess.run(["cargo", "build", "--release", "--locked", "-p", "kandle-worker", "-p", "kandle-operator"],
                       cwd=ROOT, check=True, env={k: v for k, v in os.environ.items() if k != "CARGO_TARGET_DIR"})
    os.environ["KANDLE_WORKER_BIN"] = str(path / "kandle-worker")
    os.environ["KANDLE_OPERATOR_BIN"] = str(path / "kandle-operator")
    return path


def fetched_model(env: str, script: str) -> pathlib.Path:
    """The model file `env` names, else the one `scripts/<script>` fetches (it prints the path)."""
    path = os.environ.get(env)
    if path:
        return pathlib.Path(path)
    out = subprocess.run([str(ROOT / "scripts" / script)], check=True, capture_output=True, text=True)
    return pathlib.Path(out.stdout.strip())


def smollm2_path() -> pathlib.Path:
    return fetched_model("KANDLE_TEST_GGUF", "fetch-smollm2.sh")


def gemma3_path() -> pathlib.Path:
    """Gemma 3 270M Q4_K_M (KANDLE_TEST_GEMMA3, else scripts/fetch-gemma3.sh)."""
    return fetched_model("KANDLE_TEST_GEMMA3", "fetch-gemma3.sh")


def start_redis(directory: pathlib.Path) -> tuple[subprocess.Popen, str]:
    """A throwaway redis-server (or valkey-server) on a free local port, keeping
    nothing on disk; returns the process and its URL."""
    binary = shutil.which("redis-server") or shutil.which("valkey-server")
    if not binary:
        raise RuntimeError("redis-server is not installed (scripts/test.sh installs Debian's)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(directory)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"redis://127.0.0.1:{port}"
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("redis-server did not start") from None
            time.sleep(0.05)


class Service:
    """A running kandle process that logs JSON and reports its listening address;
    its log lines are kept for assertions."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None):
        self.argv = argv
        self.logs: list[str] = []
        self.address: str | None = None
        self._listening = threading.Event()
        self.proc = subprocess.Popen(
            argv,
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

    def access_lines(self, target: str, request_id: str) -> list[dict]:
        """The fields of the access-log lines (log target `target`) of one request."""
        found = []
        for line in self.logs:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("target") == target and record.get("fields", {}).get("request_id") == request_id:
                found.append(record["fields"])
        return found

    @property
    def base_url(self) -> str:
        return f"http://{self.address}"

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> "Service":
        deadline = time.monotonic() + timeout
        if not self._listening.wait(timeout):
            raise RuntimeError("never listened:\n" + "".join(self.logs))
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("exited:\n" + "".join(self.logs))
            try:
                with urllib.request.urlopen(self.base_url + "/ready", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.1)
        raise RuntimeError("not ready in time:\n" + "".join(self.logs))

    def kill(self) -> None:
        """Stops the process at once, as a crash would."""
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Worker(Service):
    """kandle-worker with the given arguments."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None):
        super().__init__([str(worker_binary()), "--log-format", "json", *args], env)


class Router(Service):
    """kandle-operator router with the given arguments."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None):
        super().__init__([str(operator_binary()), "router", *args], env)


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


@pytest.fixture(scope="module")
def module_worker(smollm2, key_dir):
    """A worker of the requesting module's own: its prefix cache does not reach
    other modules' tests (the session `worker` serves those)."""
    w = serve(smollm2, key_dir)
    try:
        yield w
    finally:
        w.stop()


def serve(smollm2, key_dir, *extra: str) -> Worker:
    """A ready worker serving SmolLM2 as `smollm2` with the test key, and `extra` flags."""
    return Worker(
        ["serve", "--model", str(smollm2), "--served-model-name", "smollm2", "--host", "127.0.0.1", "--port", "0",
         "--api-keys-dir", str(key_dir), "--max-context", "2048", *extra]
    ).wait_ready()

"""The official openai npm package (tests/node, installed by scripts/test.sh)
against the worker and through the router: one call of each API."""

from __future__ import annotations

import subprocess

import pytest

from conftest import ROOT
from test_worker_openai import KEY

NODE = ROOT / "tests" / "node"



@pytest.fixture(scope="module")
def worker(module_worker):
    """This module's own worker: its prefix cache does not reach other modules' tests."""
    return module_worker

def run_check(base_url: str, key: str, model: str) -> None:
    assert (NODE / "node_modules" / "openai").is_dir(), "npm ci --prefix tests/node (scripts/test.sh does)"
    out = subprocess.run(["node", str(NODE / "sdk_check.mjs"), base_url + "/v1", key, model],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout + out.stderr


def test_node_sdk_against_the_worker(worker):
    run_check(worker.base_url, KEY, "smollm2")

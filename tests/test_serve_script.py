"""scripts/serve.sh, the README's first command: its defaults give way to the
flags a user adds (it once passed --port itself, so `--port 9000` failed)."""

from __future__ import annotations

import json
import urllib.request

from conftest import ROOT, Service, worker_binary


def test_flags_override_the_scripts_defaults(smollm2, tmp_path):
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "k").write_text("sk-script-test\n")
    service = Service(
        ["bash", str(ROOT / "scripts" / "serve.sh"), "--port", "0", "--served-model-name", "from-flag"],
        env={"KANDLE_WORKER_BIN": str(worker_binary()), "KANDLE_LOG_FORMAT": "json", "KANDLE_API_KEYS_DIR": str(keys)},
    )
    try:
        service.wait_ready()
        assert not service.base_url.endswith(":8080")
        request = urllib.request.Request(
            service.base_url + "/v1/models", headers={"Authorization": "Bearer sk-script-test"}
        )
        with urllib.request.urlopen(request, timeout=10) as r:
            ids = {m["id"] for m in json.load(r)["data"]}
        assert "from-flag" in ids and "smollm2" not in ids, ids
        assert "gpt-4o-mini" in ids, "the script's alias default stays"
    finally:
        service.stop()

"""Renders charts/kandle offline with Helm's own engine (PyPI helm-python-sdk).

As a script: `python3 tests/helm_render.py [VALUES_JSON]` prints the rendered
manifests as one JSON object (template path -> manifest text); the Rust chart
test uses it to parse every manifest into its k8s-openapi type.
"""

from __future__ import annotations

import json
import pathlib
import sys

import helm_python as helm

CHART = pathlib.Path(__file__).resolve().parent.parent / "charts" / "kandle"

# Values that switch on every optional part of the chart.
NON_DEFAULT = {
    "image": {"repository": "registry.example.com/kandle", "tag": "1.2.3", "pullPolicy": "Always"},
    "imagePullSecrets": [{"name": "regcred"}],
    "workerImage": {"repository": "registry.example.com/kandle-worker", "cudaTag": "1.2.3-gpu"},
    "watchNamespace": "models",
    "logLevel": "debug",
    "controller": {"replicas": 3, "nodeSelector": {"pool": "system"},
                   "tolerations": [{"key": "system", "operator": "Exists", "effect": "NoSchedule"}]},
    "gateway": {"inferencePools": False, "endpointPicker": {"name": "shared-epp", "port": 9100, "failureMode": "FailOpen"}},
    "router": {"replicas": 4, "prefixRouting": False, "maxBodyBytes": 1048576,
               "service": {"type": "LoadBalancer", "port": 8443, "annotations": {"example.com/lb": "internal"}},
               "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
                   {"weight": 100, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                                                       "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "kandle-router"}}}}]}}},
    "serviceMonitor": {"enabled": True, "interval": "15s", "labels": {"release": "prometheus"}},
}


def render(values: dict | None = None, release: str = "kandle") -> dict[str, str]:
    chart = helm.Chart.load(CHART)
    return chart.render(values or {}, name=release, namespace="kandle-system", is_install=True)


if __name__ == "__main__":
    given = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    print(json.dumps(render(NON_DEFAULT if given == "non-default" else given)))

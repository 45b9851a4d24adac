"""deploy/kubernetes: valid against the Kubernetes schemas, consistent, and accepted by policyd.

Two shapes, each a directory `kubectl apply -f` takes whole: sidecar/ (policyd in
docker-mailserver's pod) and standalone/ (a Deployment of its own); monitoring/ holds the
Prometheus Operator's resources for each. The built-in kinds are validated with
kubernetes-validate's bundled OpenAPI schemas, strictly (an unknown field is an error, where
the API server would drop it without a word). The PodMonitor and the ServiceMonitor are custom
resources without a bundled schema: they are checked against the parts of the Prometheus
Operator's CRDs that they use.
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

from policyd import __version__
from tests.deploy.helpers import DEPLOY, REPO, Daemon, ask, run, wait_until, yaml_documents

HERE = DEPLOY / "kubernetes"
POLICYD = [sys.executable, "-m", "policyd"]
BASE_ENV = {"PATH": os.environ["PATH"], "LANG": "C.UTF-8"}
DMS_CONFIG = "/tmp/docker-mailserver"  # where docker-mailserver reads its config directory


def documents(directory: str) -> list[dict[str, Any]]:
    return [
        document
        for path in sorted((HERE / directory).glob("*.yaml"))
        for document in yaml_documents(path)
    ]


def by_kind(directory: str) -> dict[str, dict[str, Any]]:
    """Every manifest of a directory by kind; each kind appears once."""
    found: dict[str, dict[str, Any]] = {}
    for resource in documents(directory):
        assert resource["kind"] not in found, f"{directory}: a second {resource['kind']}"
        found[resource["kind"]] = resource
    return found


APPLIED = ("sidecar", "standalone")  # the directories the README has kubectl apply -f
RESOURCES = by_kind("standalone")
MONITORING = by_kind("monitoring")
SIDECAR = documents("sidecar")
GUIDE = (HERE / "README.md").read_text()
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


# From monitoring.coreos.com_podmonitors.yaml (v1), the same way: the CRD requires only the
# selector; the endpoints are required here too, since a PodMonitor without them scrapes nothing.
POD_MONITOR: dict[str, Any] = copy.deepcopy(SERVICE_MONITOR)
POD_MONITOR["properties"]["kind"] = {"const": "PodMonitor"}
_pod_spec = POD_MONITOR["properties"]["spec"]
_pod_spec["required"] = ["podMetricsEndpoints", "selector"]
_pod_spec["properties"]["podMetricsEndpoints"] = _pod_spec["properties"].pop("endpoints")


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(
    "resource",
    [r for directory in APPLIED for r in documents(directory)],
    ids=lambda r: f"{r['kind']}/{r['metadata']['name']}",
)
def test_manifest_follows_the_kubernetes_schema(resource: dict[str, Any], version: str) -> None:
    """Also: every kind in the directories `kubectl apply -f` takes is built in (a schema is
    bundled for it), so applying them needs no CRD."""
    kubernetes_validate.validate(resource, version, strict=True)


def test_strict_validation_catches_a_misspelt_field() -> None:
    deployment = copy.deepcopy(RESOURCES["Deployment"])
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)


def test_the_operators_resources_are_apart_from_what_kubectl_apply_takes() -> None:
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate(MONITORING["PodMonitor"], VERSIONS[-1], strict=True)
    assert set(MONITORING) == {"PodMonitor", "ServiceMonitor"}
    for directory in APPLIED:
        kinds = {resource["apiVersion"] for resource in documents(directory)}
        assert not any(kind.startswith("monitoring.coreos.com/") for kind in kinds), directory


@pytest.mark.parametrize(
    ("kind", "schema", "endpoints"),
    [
        ("ServiceMonitor", "SERVICE_MONITOR", "endpoints"),
        ("PodMonitor", "POD_MONITOR", "podMetricsEndpoints"),
    ],
)
def test_monitors_follow_the_crd(kind: str, schema: str, endpoints: str) -> None:
    crd = globals()[schema]
    jsonschema.validate(MONITORING[kind], crd)
    misspelt = copy.deepcopy(MONITORING[kind])
    misspelt["spec"][endpoints][0]["intervall"] = "30s"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(misspelt, crd)


def pod() -> dict[str, Any]:
    template: dict[str, Any] = RESOURCES["Deployment"]["spec"]["template"]
    return template


def container() -> dict[str, Any]:
    (only,) = pod()["spec"]["containers"]
    result: dict[str, Any] = only
    return result


def environment() -> dict[str, str]:
    return {variable["name"]: variable["value"] for variable in container()["env"]}


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) == {"matchLabels"}, selector
    return bool(selector["matchLabels"].items() <= labels.items())


def test_selectors_find_the_pods_and_the_service() -> None:
    labels = pod()["metadata"]["labels"]
    assert selects(RESOURCES["Deployment"]["spec"]["selector"], labels)
    assert selects(RESOURCES["PodDisruptionBudget"]["spec"]["selector"], labels)
    assert RESOURCES["Service"]["spec"]["selector"].items() <= labels.items()
    service_labels = RESOURCES["Service"]["metadata"]["labels"]
    assert selects(MONITORING["ServiceMonitor"]["spec"]["selector"], service_labels)
    assert {r["metadata"]["namespace"] for r in RESOURCES.values()} == {"mail"}


def test_ports_and_probes_name_the_containers_ports() -> None:
    ports = {port["name"]: port["containerPort"] for port in container()["ports"]}
    exposed = re.search(r"^EXPOSE (.+)$", (REPO / "Dockerfile").read_text(), re.M)
    assert exposed and sorted(ports.values()) == sorted(map(int, exposed[1].split()))
    service_ports = {port["name"]: port for port in RESOURCES["Service"]["spec"]["ports"]}
    assert {port["targetPort"] for port in service_ports.values()} <= ports.keys()
    (endpoint,) = MONITORING["ServiceMonitor"]["spec"]["endpoints"]
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


# The sidecar: policyd in docker-mailserver's pod.


def sidecar_pod() -> dict[str, Any]:
    (deployment,) = [r for r in SIDECAR if r["kind"] == "Deployment"]
    spec: dict[str, Any] = deployment["spec"]["template"]
    return spec


def sidecar_containers() -> tuple[dict[str, Any], dict[str, Any]]:
    containers = {c["name"]: c for c in sidecar_pod()["spec"]["containers"]}
    assert set(containers) == {"mailserver", "policyd"}
    return containers["mailserver"], containers["policyd"]


def sidecar_environment() -> dict[str, str]:
    return {variable["name"]: variable["value"] for variable in sidecar_containers()[1]["env"]}


def test_the_sidecar_reads_the_mail_servers_config_volume_read_only() -> None:
    mailserver, policyd = sidecar_containers()
    config = next(m for m in mailserver["volumeMounts"] if m["mountPath"] == DMS_CONFIG)
    assert not config.get("readOnly", False)
    (mount,) = [m for m in policyd["volumeMounts"] if m["name"] == config["name"]]
    assert mount["readOnly"] is True
    assert sidecar_environment()["POLICYD_MAPS"] == f"dms:{mount['mountPath']}"
    volumes = {v["name"]: v for v in sidecar_pod()["spec"]["volumes"]}
    claims = {r["metadata"]["name"]: r for r in SIDECAR if r["kind"] == "PersistentVolumeClaim"}
    claim = claims[volumes[config["name"]]["persistentVolumeClaim"]["claimName"]]
    # The volume that no separate Deployment could mount: the reason for this shape.
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    (deployment,) = [r for r in SIDECAR if r["kind"] == "Deployment"]
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    # A writable /tmp for big maps, though the root filesystem is read-only.
    tmp = next(m for m in policyd["volumeMounts"] if m["mountPath"] == "/tmp")
    assert "emptyDir" in volumes[tmp["name"]]


def test_postfix_asks_the_sidecar_on_loopback_inside_the_pod() -> None:
    listen = sidecar_environment()["POLICYD_LISTEN"]
    assert listen == "inet:127.0.0.1:10040"
    line = (HERE / "sidecar" / "postfix-main.cf").read_text()
    assert f"check_policy_service {{ {listen}, " in line
    assert "postfix-main.cf' < deploy/kubernetes/sidecar/postfix-main.cf" in GUIDE


def test_the_sidecar_cannot_make_the_mail_server_unready() -> None:
    """A pod is ready when all its containers are; policyd loading must not take port 25
    out of the Service. Alive is all that is asked of it."""
    _, policyd = sidecar_containers()
    assert "readinessProbe" not in policyd and "startupProbe" not in policyd
    ports = {port["name"]: port["containerPort"] for port in policyd["ports"]}
    assert policyd["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "policyd-metrics"}
    metrics = sidecar_environment()["POLICYD_METRICS_LISTEN"]
    # The kubelet and Prometheus connect to the pod's address, not to its loopback.
    assert metrics == f"inet:0.0.0.0:{ports['policyd-metrics']}"
    monitor = MONITORING["PodMonitor"]
    assert selects(monitor["spec"]["selector"], sidecar_pod()["metadata"]["labels"])
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] in ports


def test_the_sidecar_is_locked_down_like_the_image() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    uid = re.search(r"^ARG UID=(\d+)$", dockerfile, re.M)
    assert uid
    assert sidecar_pod()["spec"]["enableServiceLinks"] is False
    security = sidecar_containers()[1]["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == int(uid[1])
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}


def test_policyd_accepts_the_sidecars_settings(tmp_path: Path) -> None:
    env = {**BASE_ENV, **sidecar_environment(), "POLICYD_MAPS": f"dms:{REPO / 'examples/dms'}"}
    result = run([*POLICYD, "validate"], env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "mode: permit" in result.stdout  # the dry run first, as the README says


def test_the_images_are_tagged_with_policyds_version() -> None:
    images = [c["image"] for c in container_list()]
    assert images and all(image == f"policyd:{__version__}" for image in images), images


def container_list() -> list[dict[str, Any]]:
    """Every policyd container of both shapes."""
    return [sidecar_containers()[1], container()]


def test_a_service_link_that_is_not_policyds_own_stops_policyd(tmp_path: Path) -> None:
    """Why enableServiceLinks is off in both shapes (README.md)."""
    write_configmap(tmp_path)
    env = {**BASE_ENV, **environment(), "POLICYD_MAPS": f"dms:{tmp_path}"}
    links = {"POLICYD_SERVICE_HOST": "10.96.0.12", "POLICYD_PORT": "tcp://10.96.0.12:10040"}
    assert run([*POLICYD, "validate"], env={**env, **links}).returncode == 0
    other = run([*POLICYD, "validate"], env={**env, "POLICYD_METRICS_SERVICE_HOST": "10.96.0.13"})
    assert other.returncode == 78
    assert "POLICYD_METRICS_SERVICE_HOST: unknown setting" in other.stderr
    assert "POLICYD_METRICS_SERVICE_HOST" in GUIDE and "exit with status 78" in GUIDE

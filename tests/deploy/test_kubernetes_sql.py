"""deploy/kubernetes/sql: policyd with its ownership in PostgreSQL, the password in a Secret.

Its manifests are validated with the other shapes (test_kubernetes.py, APPLIED). Here: it is
standalone/ with a database (the same Service and PodDisruptionBudget), the Secret and its
mount fit the map's password_file, and it runs for real: policyd with the Deployment's
settings, the ConfigMap's map file and the Secret's password file answers from a real
PostgreSQL holding postfixadmin's tables.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from tests.deploy import test_kubernetes as kubernetes
from tests.deploy.helpers import REPO, run
from tests.deploy.test_kubernetes import RESOURCES as STANDALONE
from tests.deploy.test_kubernetes import by_kind, selects
from tests.servers.pgsql import PgServer

RESOURCES = by_kind("sql")
POLICYD = [sys.executable, "-m", "policyd"]
BASE_ENV = {"PATH": os.environ["PATH"], "LANG": "C.UTF-8"}


def pod() -> dict[str, Any]:
    return kubernetes.pod(RESOURCES)


def container() -> dict[str, Any]:
    return kubernetes.container(RESOURCES)


def environment() -> dict[str, str]:
    return kubernetes.environment(RESOURCES)


def mounted(volume_kind: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The one volume of this kind (configMap, secret) and where it is mounted."""
    (volume,) = [v for v in pod()["spec"]["volumes"] if volume_kind in v]
    (mount,) = [m for m in container()["volumeMounts"] if m["name"] == volume["name"]]
    return volume, mount


def map_file() -> tuple[str, str]:
    """The map's path in the container, and its text from the ConfigMap."""
    [spec] = json.loads(environment()["POLICYD_MAPS"])
    volume, mount = mounted("configMap")
    assert volume["configMap"]["name"] == RESOURCES["ConfigMap"]["metadata"]["name"]
    directory, _, key = spec["path"].rpartition("/")
    assert directory == mount["mountPath"], "the map is not where the ConfigMap is mounted"
    return spec["path"], RESOURCES["ConfigMap"]["data"][key]


def test_it_is_the_standalone_shape_with_a_database() -> None:
    """The same Service and PodDisruptionBudget as standalone/ (Postfix's line, the
    monitoring and the guide hold for both), selecting these pods."""
    assert RESOURCES["Service"] == STANDALONE["Service"]
    assert RESOURCES["PodDisruptionBudget"] == STANDALONE["PodDisruptionBudget"]
    assert RESOURCES["Deployment"]["metadata"] == STANDALONE["Deployment"]["metadata"]
    labels = pod()["metadata"]["labels"]
    assert selects(RESOURCES["Deployment"]["spec"]["selector"], labels)
    assert RESOURCES["Service"]["spec"]["selector"].items() <= labels.items()
    assert selects(RESOURCES["PodDisruptionBudget"]["spec"]["selector"], labels)
    ports = {port["name"] for port in container()["ports"]}
    assert {port["targetPort"] for port in RESOURCES["Service"]["spec"]["ports"]} <= ports
    assert {r["metadata"]["namespace"] for r in RESOURCES.values()} == {"mail"}
    minimum = RESOURCES["PodDisruptionBudget"]["spec"]["minAvailable"]
    assert RESOURCES["Deployment"]["spec"]["replicas"] > minimum
    assert container()["image"] == kubernetes.container()["image"]


def test_the_password_comes_from_the_secret_readable_by_policyd_alone() -> None:
    volume, mount = mounted("secret")
    secret = RESOURCES["Secret"]
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    assert mount["readOnly"] is True
    _, cf = map_file()
    password_file = re.search(r"^password_file = (\S+)$", cf, re.M)
    assert password_file, "the map must read its password from the Secret"
    directory, _, key = password_file[1].rpartition("/")
    assert directory == mount["mountPath"] and key in secret["stringData"]
    assert not re.search(r"^password\s*=", cf, re.M), "no password in the ConfigMap"
    assert not any("PASSWORD" in name for name in environment())
    # The kubelet gives the Secret's files the pod's fsGroup: the image's group, mode 0440.
    gid = re.search(r"^ARG GID=(\d+)$", (REPO / "Dockerfile").read_text(), re.M)
    assert gid and pod()["spec"]["securityContext"]["fsGroup"] == int(gid[1])
    assert volume["secret"]["defaultMode"] == 0o440
    security = container()["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert pod()["spec"]["enableServiceLinks"] is False


def test_policyd_answers_with_the_deployments_settings_configmap_and_secret(
    pgsql_server: PgServer, tmp_path: Path
) -> None:
    """The manifests' own files, pointed at the test database: only the host and the places
    of the mounts change."""
    path, cf = map_file()
    _, secret_mount = mounted("secret")
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "password").write_text(pgsql_server.password + "\n")
    host = re.search(r"^hosts = (\S+)$", cf, re.M)
    assert host
    local = cf.replace(host[0], f"hosts = 127.0.0.1:{pgsql_server.port}").replace(
        secret_mount["mountPath"], str(secret)
    )
    (tmp_path / "map.cf").write_text(local)
    env = {**BASE_ENV, **environment()}
    env["POLICYD_MAPS"] = env["POLICYD_MAPS"].replace(path, str(tmp_path / "map.cf"))
    checked = run([*POLICYD, "check", "dave@other.test", "nobody@other.test"], env=env)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "verdict: permit" in checked.stdout
    refused = run([*POLICYD, "check", "dave@other.test", "alice@example.com"], env=env)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    validated = run([*POLICYD, "validate"], env=env)
    assert validated.returncode == 0, validated.stdout + validated.stderr
    assert f"map pgsql:{tmp_path / 'map.cf'}: connected" in validated.stdout

"""deploy/docker-mailserver: the compose file, the postfix-main.cf line and Prometheus's config.

There is no Docker engine in CI. The compose file is validated against the Compose
Specification's schema (bundled in check-jsonschema), and docker-mailserver's override of
postfix-main.cf is replayed with the real postconf.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.helpers import DEPLOY, REPO, require_tool, run

HERE = DEPLOY / "docker-mailserver"
COMPOSE = HERE / "compose.yaml"
DMS_CONFIG = "/tmp/docker-mailserver"  # where docker-mailserver mounts its config directory
POLICY_LINE = re.compile(r"^mua_sender_restrictions = check_policy_service \{[^}]*\}.*$", re.M)

# The parts of docker-mailserver's main.cf and master.cf that decide submission's sender checks
# (target/postfix/main.cf and master.cf; what SPOOF_PROTECTION=1 leaves in place).
DMS_SENDER_RESTRICTIONS = (
    "permit_sasl_authenticated, permit_mynetworks, reject_unknown_sender_domain"
)
DMS_MAIN_CF = f"""\
myhostname = mail.example.com
smtpd_sender_restrictions = $dms_smtpd_sender_restrictions
dms_smtpd_sender_restrictions = {DMS_SENDER_RESTRICTIONS}
mua_sender_restrictions = reject_authenticated_sender_login_mismatch, $dms_smtpd_sender_restrictions
"""
DMS_MASTER_CF = """\
submission inet n - n - - smtpd
  -o smtpd_sasl_auth_enable=yes
  -o smtpd_sender_restrictions=$mua_sender_restrictions
"""


def services() -> dict[str, Any]:
    found: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())["services"]
    return found


def write_main_cf(path: Path, text: str) -> None:
    """Postfix waits for a main.cf modified this very second to settle; date it back, as
    docker-mailserver does (_adjust_mtime_for_postfix_maincf)."""
    path.write_text(text)
    stamp = time.time() - 10
    os.utime(path, (stamp, stamp))


def image_port(variable: str) -> str:
    """The port the Dockerfile's ENV gives ``variable`` (inet:0.0.0.0:PORT)."""
    found = re.search(rf"{variable}=inet:0\.0\.0\.0:(\d+)", (REPO / "Dockerfile").read_text())
    assert found, f"{variable} is not set in the Dockerfile"
    return found[1]


def test_compose_file_follows_the_compose_specification(tmp_path: Path) -> None:
    checker = require_tool("check-jsonschema")
    schema = ["--builtin-schema", "vendor.compose-spec"]
    # The schema must catch a mistake, or it checks nothing: a misspelt service key.
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("    read_only: true", "    readonly: true"))
    assert run([checker, *schema, broken]).returncode != 0
    result = run([checker, *schema, COMPOSE])
    assert result.returncode == 0, result.stdout + result.stderr


def test_policyd_reads_the_mail_servers_config_directory_read_only() -> None:
    mailserver, policyd = services()["mailserver"], services()["policyd"]
    config = next(v for v in mailserver["volumes"] if v.split(":")[1].rstrip("/") == DMS_CONFIG)
    host_directory = config.split(":")[0]
    assert f"{host_directory}:{DMS_CONFIG}/:ro" in policyd["volumes"]
    # The image's default maps are that directory; the compose file must not point elsewhere.
    assert not any(e.startswith("POLICYD_MAPS=") for e in policyd["environment"])
    assert "ports" not in policyd, "the policy protocol has no authentication: do not publish it"
    # Shipped as a dry run: step 1 of the README.
    assert "POLICYD_MODE=permit" in policyd["environment"]
    assert (HERE / policyd["build"] / "Dockerfile").is_file()
    # A read-only container still needs /tmp: big maps reach the daemon through a file there.
    assert policyd["read_only"] is True and "/tmp" in policyd["tmpfs"]


def test_files_the_compose_file_mounts_exist() -> None:
    for name, service in services().items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith(".") and "docker-data" not in source:
                assert (HERE / source).is_file(), f"{name}: {source} does not exist"


def test_postfix_main_cf_overrides_docker_mailserver(tmp_path: Path) -> None:
    """docker-mailserver appends postfix-main.cf to main.cf and rewrites it with postconf -n."""
    postconf = require_tool("postconf")
    main_cf = tmp_path / "main.cf"
    write_main_cf(main_cf, DMS_MAIN_CF + (HERE / "postfix-main.cf").read_text())
    (tmp_path / "master.cf").write_text(DMS_MASTER_CF)
    rewritten = run([postconf, "-c", tmp_path, "-n"])
    assert rewritten.returncode == 0, rewritten.stderr
    write_main_cf(main_cf, rewritten.stdout)

    expanded = run([postconf, "-c", tmp_path, "-x", "-h", "mua_sender_restrictions"])
    assert expanded.returncode == 0, expanded.stderr
    restrictions = expanded.stdout.strip()
    policy = f"inet:policyd:{image_port('POLICYD_LISTEN')}"
    assert restrictions.startswith(f"check_policy_service {{ {policy}, timeout=10s, "), restrictions
    assert "default_action=DEFER_IF_PERMIT }" in restrictions
    assert "reject_authenticated_sender_login_mismatch" not in restrictions
    assert restrictions.endswith(f"}}, {DMS_SENDER_RESTRICTIONS}")
    assert "policyd" in services(), "the host name in postfix-main.cf is the compose service"


def test_the_documented_line_is_the_shipped_line() -> None:
    shipped = POLICY_LINE.findall((HERE / "postfix-main.cf").read_text())
    assert len(shipped) == 1
    for document in (HERE / "README.md", REPO / "README.md"):
        for line in POLICY_LINE.findall(document.read_text()):
            assert line == shipped[0], f"{document.relative_to(REPO)} differs from postfix-main.cf"


def test_prometheus_scrapes_policyd_over_the_compose_network(tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    config = yaml.safe_load((HERE / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["static_configs"] == [
        {"targets": [f"policyd:{image_port('POLICYD_METRICS_LISTEN')}"]}
    ]
    # Laid out as compose.yaml mounts them: both files in /etc/prometheus.
    mounts = {v.split(":")[1]: HERE / v.split(":")[0] for v in services()["prometheus"]["volumes"]}
    for target in ("/etc/prometheus/prometheus.yml", "/etc/prometheus/alerts.yml"):
        shutil.copy(mounts[target], tmp_path / Path(target).name)
    result = run([promtool, "check", "config", tmp_path / "prometheus.yml"])
    assert result.returncode == 0, result.stdout + result.stderr

"""deploy/docker-mailserver: the compose file, the postfix-main.cf line and Prometheus's config.

There is no Docker engine in CI. The compose file is validated against the Compose
Specification's schema (bundled in check-jsonschema), and docker-mailserver's override of
postfix-main.cf is replayed with the real postconf.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from policyd.codec import PolicyRequest
from policyd.config import Settings
from policyd.engine import Decision
from policyd.logs import Formatter
from policyd.model import Mode
from policyd.service import Service
from tests.deploy.helpers import DEPLOY, REPO, require_tool, run, yaml_documents

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


def sidecar_listen() -> str:
    """Where policyd listens in docker-mailserver's pod (deploy/kubernetes/sidecar/)."""
    manifest = DEPLOY / "kubernetes" / "sidecar" / "mailserver.yaml"
    (deployment,) = [d for d in yaml_documents(manifest) if d["kind"] == "Deployment"]
    (policyd,) = [
        c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "policyd"
    ]
    return next(e["value"] for e in policyd["env"] if e["name"] == "POLICYD_LISTEN")


@pytest.mark.parametrize(
    ("override", "policy"),
    [
        # compose: the policyd service's name on the compose network, the image's port.
        (HERE / "postfix-main.cf", lambda: f"inet:policyd:{image_port('POLICYD_LISTEN')}"),
        # Kubernetes: the sidecar in the same pod, on loopback.
        (DEPLOY / "kubernetes" / "sidecar" / "postfix-main.cf", sidecar_listen),
    ],
    ids=["compose", "kubernetes-sidecar"],
)
def test_postfix_main_cf_overrides_docker_mailserver(
    override: Path, policy: Callable[[], str], tmp_path: Path
) -> None:
    """docker-mailserver appends postfix-main.cf to main.cf and rewrites it with postconf -n."""
    postconf = require_tool("postconf")
    main_cf = tmp_path / "main.cf"
    write_main_cf(main_cf, DMS_MAIN_CF + override.read_text())
    (tmp_path / "master.cf").write_text(DMS_MASTER_CF)
    rewritten = run([postconf, "-c", tmp_path, "-n"])
    assert rewritten.returncode == 0, rewritten.stderr
    write_main_cf(main_cf, rewritten.stdout)

    expanded = run([postconf, "-c", tmp_path, "-x", "-h", "mua_sender_restrictions"])
    assert expanded.returncode == 0, expanded.stderr
    restrictions = expanded.stdout.strip()
    assert restrictions.startswith(f"check_policy_service {{ {policy()}, timeout=10s, "), (
        restrictions
    )
    assert "default_action=DEFER_IF_PERMIT }" in restrictions
    assert "reject_authenticated_sender_login_mismatch" not in restrictions
    assert restrictions.endswith(f"}}, {DMS_SENDER_RESTRICTIONS}")


def test_the_policy_host_is_the_compose_service() -> None:
    assert "inet:policyd:" in (HERE / "postfix-main.cf").read_text()
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


# The guide, run: what it shows policyd printing is what policyd prints.

GUIDE = (HERE / "README.md").read_text()
# What docker-mailserver's `setup` writes: ADDRESS|{SCHEME}HASH and ALIAS TARGET lines.
HASH = "{SHA512-CRYPT}$6$NotArealSalt$notarealhash"


def config_directory(path: Path, accounts: Sequence[str], aliases: Sequence[str] = ()) -> Path:
    path.mkdir()
    (path / "postfix-accounts.cf").write_text("".join(f"{a}|{HASH}\n" for a in accounts))
    if aliases:
        (path / "postfix-virtual.cf").write_text("".join(f"{a}\n" for a in aliases))
    return path


def in_the_container(config: Path, command: str, **environment: str) -> tuple[int, str]:
    """``docker compose exec policyd COMMAND``: the image's and compose's POLICYD_* variables,
    with ``config`` where the config directory is mounted. Exit status and output, with the
    mount point for ``config``."""
    image = dict(re.findall(r"(POLICYD_\w+)=(\S+)", (REPO / "Dockerfile").read_text()))
    compose = dict(e.split("=", 1) for e in services()["policyd"]["environment"])
    env = {"PATH": os.environ["PATH"], **image, **compose, **environment}
    env["POLICYD_MAPS"] = env["POLICYD_MAPS"].replace(DMS_CONFIG, str(config))
    words = shlex.split(command.removeprefix("docker compose exec policyd "))
    assert words[0] == "policyd", command
    result = run([sys.executable, "-m", *words], env=env)
    return result.returncode, (result.stdout + result.stderr).replace(str(config), DMS_CONFIG)


def test_a_fresh_server_with_its_first_account(tmp_path: Path) -> None:
    step = re.search(r"setup email add (\S+)", GUIDE)
    shown = re.search(r"^ *(docker compose exec policyd policyd validate)\n *# (.*)$", GUIDE, re.M)
    assert step and shown
    config = config_directory(tmp_path / "config", [step[1]])
    code, output = in_the_container(config, shown[1])
    assert code == 0 and f"{shown[2]}\n" in output, output
    # And before it: no map file at all, exit 78, the restarts the guide warns about.
    (tmp_path / "empty").mkdir()
    code, output = in_the_container(tmp_path / "empty", shown[1])
    assert code == 78 and "none of postfix-accounts.cf" in output, output
    assert "policyd exits with status 78" in GUIDE


def test_the_dry_run_and_enforcing_print_what_the_guide_shows(tmp_path: Path) -> None:
    alias = re.search(r"`setup alias add (\S+) (\S+)`\), and bob sent as it", GUIDE)
    check = re.search(
        r"^(docker compose exec policyd policyd check \S+ \S+)\n```\n\n```\n(.*?)```",
        GUIDE,
        re.M | re.S,
    )
    assert alias and check
    login = shlex.split(check[1])[-2]
    config = config_directory(
        tmp_path / "config", ["admin@example.com", alias[2], login], [f"{alias[1]} {alias[2]}"]
    )
    code, output = in_the_container(config, check[1])
    assert (code, output) == (0, check[2])  # mode permit: it would refuse, and answers DUNNO

    # Step 2: enforcing, the same question exits 1.
    enforce = re.search(
        r"^(docker compose exec policyd policyd check .*?) +# exits (\d+): reject$", GUIDE, re.M
    )
    assert enforce and enforce[1] == check[1]
    code, output = in_the_container(config, enforce[1], POLICYD_MODE="authenticated")
    assert code == int(enforce[2]) and "verdict: reject" in output
    refused = re.search(r"^(553 5\.7\.1 <\S+>: Sender address rejected: .*)$", GUIDE, re.M)
    assert refused and f"postfix: {refused[1]}\n" in output


def test_the_dry_runs_log_line_is_the_daemons(tmp_path: Path) -> None:
    """`docker compose logs policyd`: compose's prefix, then the decision line, with the time
    and Postfix's instance left out as `...`."""
    shown = re.search(r"^policyd-1  \| (time=\.\.\. .*msg=decision.*)$", GUIDE, re.M)
    assert shown
    fields = dict(re.findall(r"(\w+)=(\S+)", shown[1]))
    config = config_directory(
        tmp_path / "config",
        ["alice@example.com", fields["login"]],
        [f"{fields['sender']} alice@example.com"],
    )
    settings = Settings(maps=[f"dms:{config}"], mode=Mode.PERMIT)
    request = PolicyRequest(sender=fields["sender"], sasl_username=fields["login"], instance="x")

    async def decide() -> Decision:
        async with Service.running(settings) as service:
            return await service.answer(request)

    line = Formatter("logfmt").decision(time.time(), request, asyncio.run(decide()))
    masked = re.sub(r"^time=\S+", "time=...", line).replace(" instance=x ", " instance=... ")
    assert masked == shown[1]

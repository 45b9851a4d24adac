"""deploy/systemd: the unit passes systemd-analyze, and its settings are policyd settings.

CI does not boot systemd, so the unit is checked offline: `systemd-analyze verify` (with
ExecStart pointed at an installed policyd, since verify insists the binary exists) and
`systemd-analyze security --offline`, whose exposure score must stay low.
"""

from __future__ import annotations

import grp
import os
import shutil
import sys
from pathlib import Path

import pytest

from tests.conftest import require
from tests.deploy.helpers import BIN, DEPLOY, require_tool, run

HERE = DEPLOY / "systemd"
UNIT = HERE / "policyd.service"
INSTALLED = "/opt/policyd/bin/policyd"
# systemd-analyze security's exposure level, times ten: 20 is "2.0 OK". The unit scores 1.5.
EXPOSURE_THRESHOLD = 20


def installed_policyd() -> str:
    """A policyd console script on this machine, to stand in for /opt/policyd/bin/policyd."""
    path = BIN / "policyd" if (BIN / "policyd").is_file() else shutil.which("policyd")
    require(path is not None, "no installed policyd command (pip install -e .)")
    return str(path)


@pytest.fixture
def unit(tmp_path: Path) -> Path:
    """The unit as shipped, but for ExecStart's path."""
    text = UNIT.read_text()
    assert f"ExecStart={INSTALLED} serve\n" in text
    copy = tmp_path / "policyd.service"
    copy.write_text(text.replace(f"ExecStart={INSTALLED} ", f"ExecStart={installed_policyd()} "))
    return copy


def service_section() -> list[tuple[str, str]]:
    """[Service] as (key, value) pairs in order; keys may repeat."""
    pairs = []
    section = ""
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and line and not line.startswith("#"):
            key, _, value = line.partition("=")
            pairs.append((key, value))
    return pairs


def test_systemd_analyze_verify_is_silent(unit: Path) -> None:
    analyze = require_tool("systemd-analyze")
    # verify exits 0 on unknown keys and unparsable values; it only prints them.
    broken = unit.parent / "broken" / "policyd.service"
    broken.parent.mkdir()
    broken.write_text(unit.read_text().replace("ProtectHome=yes", "ProtectHome=yess"))
    assert "yess" in run([analyze, "verify", broken]).stderr
    result = run([analyze, "verify", unit])
    assert result.returncode == 0 and not result.stdout + result.stderr, result.stderr


def test_sandboxing_keeps_a_low_exposure_score(unit: Path) -> None:
    analyze = require_tool("systemd-analyze")
    result = run(
        [analyze, "security", "--offline=true", f"--threshold={EXPOSURE_THRESHOLD}", unit.name],
        cwd=unit.parent,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr


def test_the_unit_and_the_default_file_hold_policyd_settings(tmp_path: Path) -> None:
    """Every POLICYD_* the unit and /etc/default/policyd set is a setting policyd accepts."""
    env = {"PATH": os.environ["PATH"]}
    for key, value in service_section():
        if key == "Environment":
            name, _, setting = value.partition("=")
            env[name] = setting
    for line in (HERE / "policyd.default").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, setting = line.partition("=")
            env[name] = setting
    assert env["POLICYD_LISTEN"] == "unix:/run/policyd/policyd.sock"
    # Only the group must exist for validate; the map is swapped for the example.
    env["POLICYD_MAPS"] = f"dms:{Path(__file__).parents[2] / 'examples' / 'dms'}"
    try:
        grp.getgrnam(env["POLICYD_SOCKET_GROUP"])
    except KeyError:  # a machine without Postfix has no group postfix
        env["POLICYD_SOCKET_GROUP"] = str(os.getgid())
    result = run([sys.executable, "-m", "policyd", "validate"], env=env)
    assert result.returncode == 0, result.stdout + result.stderr


def test_reload_configuration_error_and_socket() -> None:
    settings = dict(service_section())
    assert settings["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert settings["RestartPreventExitStatus"] == "78"
    assert settings["RuntimeDirectory"] == "policyd"
    assert settings["DynamicUser"] == "yes"
    assert settings["SupplementaryGroups"] == "postfix"
    assert settings["EnvironmentFile"] == "-/etc/default/policyd"

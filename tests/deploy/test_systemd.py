"""deploy/systemd: the unit passes systemd-analyze, its settings are policyd settings, and the
guide's Postfix lines reach policyd from Debian's chrooted smtpd.

CI does not boot systemd, so the unit (alone, and with the queue-socket.conf drop-in) is
checked offline: `systemd-analyze verify` (with ExecStart pointed at an installed policyd,
since verify insists the binary exists) and `systemd-analyze security --offline`, whose
exposure score must stay low. Debian's master.cf is the one its postfix package ships.
"""

from __future__ import annotations

import grp
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

from policyd.cli import EXIT_CONFIG, EXIT_USAGE
from tests.conftest import require
from tests.deploy.helpers import BIN, DEPLOY, require_tool, run

HERE = DEPLOY / "systemd"
UNIT = HERE / "policyd.service"
DROP_IN = HERE / "queue-socket.conf"
INSTALLED = "/opt/policyd/bin/policyd"
# systemd-analyze security's exposure level, times ten: 20 is "2.0 OK". The unit scores 1.5.
EXPOSURE_THRESHOLD = 20


def installed_policyd() -> str:
    """A policyd console script on this machine, to stand in for /opt/policyd/bin/policyd."""
    path = BIN / "policyd" if (BIN / "policyd").is_file() else shutil.which("policyd")
    require(path is not None, "no installed policyd command (pip install -e .)")
    return str(path)


@pytest.fixture(params=["unit", "unit+queue-socket.conf"])
def unit(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """The unit as shipped, but for ExecStart's path; alone, and with the drop-in beside it
    (systemd-analyze reads NAME.service.d/ next to the unit)."""
    text = UNIT.read_text()
    assert f"ExecStart={INSTALLED} serve\n" in text
    copy = tmp_path / "policyd.service"
    copy.write_text(text.replace(f"ExecStart={INSTALLED} ", f"ExecStart={installed_policyd()} "))
    if "queue-socket.conf" in request.param:
        drop_ins = tmp_path / "policyd.service.d"
        drop_ins.mkdir()
        shutil.copy(DROP_IN, drop_ins / DROP_IN.name)
    return copy


def section(path: Path, name: str = "[Service]") -> list[tuple[str, str]]:
    """A section of a unit file as (key, value) pairs in order; keys may repeat."""
    pairs = []
    current = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("["):
            current = line
        elif current == name and line and not line.startswith("#"):
            key, _, value = line.partition("=")
            pairs.append((key, value))
    return pairs


def environment(*files: Path) -> dict[str, str]:
    """The POLICYD_* variables of the unit's Environment= lines (and a drop-in's), overridden by
    /etc/default/policyd, as systemd applies them."""
    env: dict[str, str] = {}
    for path in files:
        for key, value in section(path):
            if key == "Environment":
                name, _, setting = value.partition("=")
                env[name] = setting
    for line in (HERE / "policyd.default").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, setting = line.partition("=")
            env[name] = setting
    return env


def test_systemd_analyze_verify_is_silent(unit: Path) -> None:
    analyze = require_tool("systemd-analyze")
    # verify exits 0 on unknown keys and unparsable values; it only prints them.
    broken = unit.parent / "broken"
    shutil.copytree(unit.parent, broken, ignore=shutil.ignore_patterns("broken"))
    for path in broken.rglob("*"):
        if path.is_file():
            path.write_text(
                path.read_text().replace("Paths=", "Pathz=").replace("Home=yes", "Home=yess")
            )
    assert "yess" in run([analyze, "verify", broken / unit.name]).stderr
    if (unit.parent / "policyd.service.d").is_dir():
        assert "ReadWritePathz" in run([analyze, "verify", broken / unit.name]).stderr
    result = run([analyze, "verify", unit])
    assert result.returncode == 0 and not result.stdout + result.stderr, result.stderr


def test_sandboxing_keeps_a_low_exposure_score(unit: Path) -> None:
    analyze = require_tool("systemd-analyze")
    result = run(
        [analyze, "security", "--offline=true", f"--threshold={EXPOSURE_THRESHOLD}", unit.name],
        cwd=unit.parent,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr


@pytest.mark.parametrize("files", [[UNIT], [UNIT, DROP_IN]], ids=["unit", "unit+queue-socket.conf"])
def test_the_unit_and_the_default_file_hold_policyd_settings(files: list[Path]) -> None:
    """Every POLICYD_* the unit, the drop-in and /etc/default/policyd set is a setting policyd
    accepts."""
    env = {"PATH": os.environ["PATH"], **environment(*files)}
    # The map is swapped for the example, and the socket group for ours on a machine without
    # Postfix (no group postfix).
    env["POLICYD_MAPS"] = f"dms:{Path(__file__).parents[2] / 'examples' / 'dms'}"
    if "POLICYD_SOCKET_GROUP" in env:
        try:
            grp.getgrnam(env["POLICYD_SOCKET_GROUP"])
        except KeyError:
            env["POLICYD_SOCKET_GROUP"] = str(os.getgid())
    result = run([sys.executable, "-m", "policyd", "validate"], env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"listen: {env['POLICYD_LISTEN']}\n" in result.stdout


def test_reload_exit_codes_and_user() -> None:
    settings = dict(section(UNIT))
    assert settings["ExecReload"] == "/bin/kill -HUP $MAINPID"
    # The errors a restart cannot fix (README "Exit codes").
    assert settings["RestartPreventExitStatus"] == f"{EXIT_USAGE} {EXIT_CONFIG}"
    assert settings["DynamicUser"] == "yes"
    assert settings["SupplementaryGroups"] == "postfix"
    assert settings["EnvironmentFile"] == "-/etc/default/policyd"


MASTER_CF = Path("/usr/share/postfix/master.cf.dist")  # Debian's postfix package ships it


def chroot_sees(endpoint: str, queue_directory: str) -> bool:
    """Whether a smtpd chrooted in the queue directory can reach a Postfix endpoint."""
    kind, _, where = endpoint.partition(":")
    if kind == "inet":
        return True
    # A relative unix: path is relative to the queue directory, the chroot's root.
    return not where.startswith("/") or where.startswith(queue_directory.rstrip("/") + "/")


def test_the_guides_postfix_lines_work_with_debians_chrooted_smtpd(tmp_path: Path) -> None:
    """Debian's master.cf chroots smtpd; the guide's Postfix lines must reach policyd there."""
    postconf = require_tool("postconf")
    require(MASTER_CF.is_file(), f"{MASTER_CF} (Debian's postfix package)")
    (tmp_path / "main.cf").write_text("")
    shutil.copy(MASTER_CF, tmp_path / "master.cf")
    chroot = run([postconf, "-c", tmp_path, "-F", "smtp/inet/chroot"])
    assert chroot.stdout.strip() == "smtp/inet/chroot = y", chroot.stdout + chroot.stderr
    # The submission services a Debian admin uncomments are chrooted too.
    text = MASTER_CF.read_text()
    for service in ("submission", "submissions"):
        assert re.search(rf"^#{service} +inet +n +- +y ", text, re.M), service
    queue = run([postconf, "-c", tmp_path, "-h", "queue_directory"]).stdout.strip()
    assert queue

    guide = (HERE / "README.md").read_text()
    default, other = re.findall(r"check_policy_service \{ (\S+), timeout=10s", guide)
    # The default: where the unit has policyd listen.
    assert default == environment(UNIT)["POLICYD_LISTEN"]
    # The other: the drop-in's socket, inside the queue directory, named relative to it.
    socket = environment(UNIT, DROP_IN)["POLICYD_LISTEN"].removeprefix("unix:")
    assert socket.startswith(queue + "/")
    assert other == "unix:" + socket.removeprefix(queue + "/")
    assert chroot_sees(default, queue) and chroot_sees(other, queue)
    assert not chroot_sees("unix:/run/policyd/policyd.sock", queue)  # what the unit used to do

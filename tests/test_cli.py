"""The policyd command: check, validate and serve, as an admin runs them."""

from __future__ import annotations

import argparse
import asyncio
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from policyd.cli import (
    EXIT_CONFIG,
    EXIT_REJECT,
    EXIT_SOFTWARE,
    EXIT_USAGE,
    FLAG_SETTINGS,
    build_parser,
    flag_names,
    guarded,
    main,
    postfix_reply,
)
from policyd.stores import backends
from tests.conftest import DATA, require
from tests.helpers import ask_unix

DMS = f"dms:{DATA / 'dms'}"


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_check_reject_shows_the_reply_and_who_owns_the_sender(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run(
        capsys, "check", "--map", DMS, "user2@otherdomain.tld", "alias1@localhost.localdomain"
    )
    assert code == EXIT_REJECT
    assert "verdict: reject" in out
    assert "action:  553 5.7.1 not owned by user user2@otherdomain.tld" in out
    assert (
        "postfix: 553 5.7.1 <alias1@localhost.localdomain>: Sender address rejected: "
        "not owned by user user2@otherdomain.tld"
    ) in out
    assert f"user1@localhost.localdomain ({DATA / 'dms' / 'postfix-virtual.cf'}:2)" in out


def test_check_permit_names_the_file_and_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys, "check", "--map", DMS, "user1@localhost.localdomain", "test42@localhost.localdomain"
    )
    assert code == 0
    assert "verdict: permit" in out
    assert f"rule:    {DATA / 'dms' / 'postfix-regexp.cf'}:2" in out


def test_check_null_sender_and_no_login(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "check", "--map", DMS, "user1@localhost.localdomain", "")[0] == 0
    code, out, _ = run(
        capsys, "check", "--map", DMS, "--mode", "sender", "", "user1@localhost.localdomain"
    )
    assert code == EXIT_REJECT
    assert "Sender address rejected: not logged in" in out


def test_check_in_permit_mode_exits_zero_but_says_what_it_would_do(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run(
        capsys, "check", "--map", DMS, "--mode", "permit", "added@localhost.localdomain", "x@y"
    )
    assert code == 0
    assert "verdict: reject" in out
    assert "would answer 553 5.7.1 not owned by user added@localhost.localdomain" in out


def test_validate_counts_entries(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "validate", "--map", DMS)
    assert code == 0
    assert f"map dms:{DATA / 'dms'}: 22 entries" in out


def test_validate_reports_every_problem_with_file_and_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    bad = tmp_path / "logins"
    bad.write_text("a@x a@x\nbroken\n\nalso-broken\n")
    code, out, err = run(
        capsys,
        "validate",
        "--map",
        DMS,
        "--map",
        f"texthash:{bad}",
        "--map",
        f"pcre:{tmp_path / 'no'}",
    )
    assert code == EXIT_CONFIG
    assert f"map texthash:{bad}: FAILED" in out
    assert f"{bad}:2: expected format: key whitespace value" in err
    assert f"{bad}:4: expected format: key whitespace value" in err
    assert f"{tmp_path / 'no'}: cannot read: No such file or directory" in err
    assert "Traceback" not in err


def test_validate_warns_about_duplicates(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    table = tmp_path / "logins"
    table.write_text("a@x a@x\na@x b@x\n")
    code, _, err = run(capsys, "validate", "--map", f"texthash:{table}")
    assert code == 0
    assert f'warning: {table}:2: duplicate entry "a@x": line 1 wins' in err


def test_config_error_is_one_line_and_exit_78(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config = tmp_path / "policyd.toml"
    config.write_text('maps = ["dms:/x"]\nmode = "strict"\n')
    code, _, err = run(capsys, "validate", "--config", str(config))
    assert code == EXIT_CONFIG
    modes = "'authenticated', 'sender', 'known', 'unauthenticated' or 'permit'"
    assert err == f"policyd: {config}:2: mode: Input should be {modes}\n"


def test_errors_name_the_flags_as_typed(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(
        capsys,
        "validate",
        "--map",
        DMS,
        "--map",
        "dsm:/srv/mail",
        "--exempt-network",
        "10.0.0.0/8",
        "--exempt-network",
        "192.0.2.0/33",
        "--scope-port",
        "70000",
    )
    assert code == EXIT_CONFIG
    assert err.splitlines() == [
        f"policyd: --map dsm:/srv/mail: unknown map type 'dsm' (known: {', '.join(backends())})",
        "policyd: --scope-port 70000: port 70000 is out of range (0 to 65535)",
        "policyd: --exempt-network 192.0.2.0/33: value is not a valid IPv4 or IPv6 network",
    ]


def test_every_setting_flag_is_named_by_its_own_spelling() -> None:
    names = flag_names(build_parser())
    assert set(names) == set(FLAG_SETTINGS)
    assert names["maps"] == "--map"
    assert names["exempt_networks"] == "--exempt-network"
    assert names["metrics_listen"] == "--metrics-listen"


def test_every_flag_has_a_help_line() -> None:
    parser = build_parser()
    parsers = {"policyd": parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            parsers |= {f"policyd {name}": sub for name, sub in action.choices.items()}
    assert set(parsers) == {
        "policyd",
        "policyd serve",
        "policyd check",
        "policyd validate",
        "policyd senders",
        "policyd audit",
    }
    for name, sub in parsers.items():
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help, f"{name} {'/'.join(action.option_strings) or action.dest}: no help"


def test_a_usage_error_exits_64(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["check", "--maps", DMS, "a@x", "b@x"], ["nosuch"], ["check", "--map", DMS]):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == EXIT_USAGE
        assert re.search(r"^policyd( check)?: error: ", capsys.readouterr().err, re.M)


def test_an_unexpected_error_is_a_bug_with_its_traceback_and_exit_70(
    capsys: pytest.CaptureFixture[str],
) -> None:
    def broken() -> int:
        raise KeyError("a bug")

    assert guarded(broken) == EXIT_SOFTWARE
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "KeyError: 'a bug'" in err
    assert err.endswith("policyd: internal error (a bug): please report the traceback above\n")


def serve_failing(*args: str) -> subprocess.CompletedProcess[str]:
    """``policyd serve`` that must fail to start: its exit status and its whole log."""
    return subprocess.run(
        [sys.executable, "-m", "policyd", "serve", "--map", DMS, *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("POLICYD_")},
    )


def test_a_socket_in_a_missing_directory_names_the_directory(tmp_path: Path) -> None:
    socket_path = tmp_path / "not-created" / "policyd.sock"
    result = serve_failing("--listen", f"unix:{socket_path}", "--metrics-listen", "none")
    assert result.returncode == EXIT_CONFIG
    assert result.stderr == (
        f"policyd: listen: unix:{socket_path}: the directory {socket_path.parent} does not"
        " exist; create it, or listen elsewhere\n"
    )


def test_a_metrics_port_in_use_names_metrics_listen_and_nothing_says_listening() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = serve_failing("--listen", "127.0.0.1:0", "--metrics-listen", f"127.0.0.1:{port}")
    assert result.returncode == EXIT_CONFIG
    assert f"policyd: metrics_listen: inet:127.0.0.1:{port}: " in result.stderr
    assert "in use" in result.stderr
    assert "listening" not in result.stderr and "Traceback" not in result.stderr


def test_serve_refuses_a_broken_map(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, "serve", "--listen", "inet:127.0.0.1:0", "--map", f"dms:{tmp_path}")
    assert code == EXIT_CONFIG
    assert f"policyd: {tmp_path}: none of postfix-accounts.cf" in err


@pytest.mark.parametrize(
    ("action", "expected"),
    [
        (
            "553 5.7.1 not owned by user b",
            "553 5.7.1 <s@x>: Sender address rejected: not owned by user b",
        ),
        (
            "451 4.3.0 Temporary lookup failure",
            "451 4.3.0 <s@x>: Sender address rejected: Temporary lookup failure",
        ),
        ("REJECT", "554 5.7.1 <s@x>: Sender address rejected: Access denied"),
        ("DEFER_IF_PERMIT try later", "450 4.7.1 <s@x>: Sender address rejected: try later"),
        ("550 go away", "550 5.7.1 <s@x>: Sender address rejected: go away"),
    ],
)
def test_postfix_reply(action: str, expected: str) -> None:
    assert postfix_reply(action, "s@x") == expected


async def read_until(stream: asyncio.StreamReader, text: bytes) -> None:
    """Read log lines until one contains ``text``; fail if the daemon's output ends first."""
    seen = []
    while text not in (line := await asyncio.wait_for(stream.readline(), 10)):
        assert line, f"policyd exited before logging {text!r}: {b''.join(seen)!r}"
        seen.append(line)


USER1 = "user1@localhost.localdomain"


async def test_serve_reloads_on_sighup_and_stops_on_sigterm(tmp_path: Path) -> None:
    dms = tmp_path / "dms"
    shutil.copytree(DATA / "dms", dms)
    socket_path = tmp_path / "policy.sock"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "policyd",
        "serve",
        "--listen",
        f"unix:{socket_path}",
        "--map",
        f"dms:{dms}",
        env={**os.environ, "POLICYD_RELOAD_INTERVAL": "0", "POLICYD_METRICS_LISTEN": "none"},
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stderr is not None
        await read_until(process.stderr, b"msg=ready")
        reply = await ask_unix(socket_path, "new@localhost.localdomain", USER1)
        assert reply == b"action=553 5.7.1 not owned by user user1@localhost.localdomain\n\n"
        with (dms / "postfix-virtual.cf").open("a") as virtual:
            virtual.write("new@localhost.localdomain user1@localhost.localdomain\n")
        process.send_signal(signal.SIGHUP)
        await read_until(process.stderr, b"reloaded")
        reply = await ask_unix(socket_path, "new@localhost.localdomain", USER1)
        assert reply == b"action=OK\n\n"
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 10) == 0
        assert not socket_path.exists()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


# A policyd whose every decision waits forever, to test shutdown with a request in flight:
# the daemon `policyd serve` runs, built with a store that never answers.
HANGING = """
import asyncio, logging, sys
from policyd import cli
from policyd.daemon import Daemon
from policyd.engine import Policy
from policyd.logs import Logging
from policyd.service import Service
from policyd.stores.base import Store, StoreContext

class Hanging(Store):
    @classmethod
    def from_options(cls, options, context):
        raise NotImplementedError

    def lookup(self, keys):
        return self.hang()

    async def hang(self):
        logging.getLogger("test").info("deciding")
        await asyncio.Event().wait()

settings = cli._settings(cli.build_parser().parse_args(sys.argv[1:]))
logs = Logging(settings.log_level, settings.log_format)
service = Service(Policy.from_settings(settings), [Hanging("hanging", StoreContext())])
try:
    sys.exit(asyncio.run(Daemon(settings, service=service).run()))
finally:
    logs.stop()
"""


async def start_hanging(tmp_path: Path, *args: str) -> asyncio.subprocess.Process:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        HANGING,
        "serve",
        "--listen",
        f"unix:{tmp_path / 'p.sock'}",
        "--map",
        DMS,
        *args,
        env={**os.environ, "POLICYD_METRICS_LISTEN": "none"},
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    await read_until(process.stderr, b"msg=ready")
    return process


async def request_in_flight(
    tmp_path: Path, process: asyncio.subprocess.Process
) -> asyncio.StreamWriter:
    """A request policyd has started (and will never finish) deciding."""
    _, writer = await asyncio.open_unix_connection(str(tmp_path / "p.sock"))
    writer.write(b"sender=a@x\nsasl_username=b@x\n\n")
    await writer.drain()
    assert process.stderr is not None
    await read_until(process.stderr, b"msg=deciding")
    return writer


async def test_sigterm_waits_for_requests_in_flight_at_most_shutdown_timeout(
    tmp_path: Path,
) -> None:
    process = await start_hanging(tmp_path, "--config", str(shutdown_config(tmp_path, 0.5)))
    writer = await request_in_flight(tmp_path, process)
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(process.wait(), 10) == 0
    assert 0.5 <= time.monotonic() - started < 5
    writer.close()


async def test_second_sigterm_exits_at_once(tmp_path: Path) -> None:
    process = await start_hanging(tmp_path, "--config", str(shutdown_config(tmp_path, 600)))
    assert process.stderr is not None
    writer = await request_in_flight(tmp_path, process)
    process.send_signal(signal.SIGTERM)
    await read_until(process.stderr, b"shutting down")
    process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(process.wait(), 10) == 1
    writer.close()


def shutdown_config(tmp_path: Path, seconds: float) -> Path:
    config = tmp_path / "policyd.toml"
    config.write_text(f"shutdown_timeout = {seconds}\n")
    return config


def test_serve_refuses_an_empty_map_unless_allowed(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    empty = tmp_path / "logins"
    empty.write_text("# no entries\n")
    code, _, err = run(
        capsys, "serve", "--listen", "inet:127.0.0.1:0", "--map", f"texthash:{empty}"
    )
    assert code == EXIT_CONFIG
    assert "no entries: refusing an empty map, which would reject every sender" in err


def world_readable_copy() -> Path:
    """The test maps in a directory user nobody can read (pytest's tmp dir is root-only)."""
    readable = Path(tempfile.mkdtemp(prefix="policyd-user-"))
    readable.chmod(0o755)
    shutil.copytree(DATA / "dms", readable / "dms")
    return readable


def uids(pid: int) -> list[str]:
    """Real, effective, saved and filesystem uid of a process."""
    status = Path(f"/proc/{pid}/status").read_text()
    return next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]


async def test_root_drops_to_the_configured_user() -> None:
    require(os.geteuid() == 0, "dropping privileges needs root")
    readable = world_readable_copy()
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "policyd",
            "serve",
            "--listen",
            "inet:127.0.0.1:0",
            "--map",
            f"dms:{readable / 'dms'}",
            env={**os.environ, "POLICYD_METRICS_LISTEN": "none", "POLICYD_USER": "nobody"},
            stderr=asyncio.subprocess.PIPE,
        )
        assert process.stderr is not None
        await read_until(process.stderr, b"msg=ready")
        assert uids(process.pid) == [str(pwd.getpwnam("nobody").pw_uid)] * 4
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 10) == 0
    finally:
        shutil.rmtree(readable)


def test_validate_warns_about_bare_keys_when_postfix_local_domains_are_not_set(
    capsys: pytest.CaptureFixture[str],
) -> None:
    table = f"texthash:{DATA / 'postfix' / 'sender_login.texthash'}"
    _, _, err = run(capsys, "validate", "--map", table)
    assert "bare local-part keys are found only for $myorigin and mydestination" in err
    assert f"{table} (1)" in err
    _, _, err = run(capsys, "validate", "--map", table, "--config", str(myorigin_config()))
    assert "bare local-part keys" not in err


def myorigin_config() -> Path:
    config = Path(tempfile.mkdtemp(prefix="policyd-")) / "policyd.toml"
    config.write_text('myhostname = "mail.example.com"\n')
    return config

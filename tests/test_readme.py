"""The README's `policyd check` examples print what the README says they print."""

from __future__ import annotations

import asyncio
import calendar
import os
import re
import shlex
import socket
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from policyd import stores
from policyd.cli import (
    EXIT_CODES,
    EXIT_CONFIG,
    EXIT_OK,
    EXIT_REJECT,
    EXIT_TEMPFAIL,
    EXIT_USAGE,
    build_parser,
    main,
)
from policyd.codec import PolicyRequest
from policyd.config import Settings
from policyd.engine import Decision
from policyd.logs import Formatter
from policyd.service import Service
from tests.deploy.helpers import Daemon, wait_until

REPO = Path(__file__).parent.parent
README = (REPO / "README.md").read_text()

# A "policyd check ..." line followed by one or more "# reason: ..." comment lines.
EXAMPLE = re.compile(r"^(policyd check [^\n]*)\n# (reason: [^\n]*)$", re.MULTILINE)


def examples() -> list[tuple[str, str]]:
    found = EXAMPLE.findall(README)
    assert len(found) >= 3, "the README's check examples went missing"
    return found


@pytest.mark.parametrize(("command", "reason"), examples())
def test_readme_check_example(
    command: str, reason: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(Path(__file__).parent.parent)  # the examples use paths relative to the repo
    main(shlex.split(command)[1:])
    assert f"{reason}\n" in capsys.readouterr().out


# A one-line ```sh block and the plain ``` block right after it: a command and its output.
COMMAND_AND_OUTPUT = re.compile(r"^```sh\n([^\n]+)\n```\n\n```\n(.*?)^```$", re.M | re.S)


def command_blocks(text: str = README) -> dict[str, str]:
    """Each README command that is shown with its output, and that output."""
    return {command: output for command, output in COMMAND_AND_OUTPUT.findall(text)}


def run_main(
    command: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> tuple[int, str]:
    """Run a README `[VAR=value ...] policyd ...` line in-process: exit status, and what it
    printed (stdout and stderr)."""
    words = shlex.split(command)
    while "=" in words[0]:
        name, _, value = words.pop(0).partition("=")
        monkeypatch.setenv(name, value)
    assert words[0] == "policyd", command
    code = main(words[1:])
    out, err = capsys.readouterr()
    return code, out + err


@pytest.mark.parametrize(
    "command",
    [c for c in command_blocks() if c.startswith("policyd ") and "examples/" in c],
)
def test_readme_command_prints_the_output_shown(
    command: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """validate, check and senders on the shipped examples, exactly as the README shows them."""
    monkeypatch.chdir(REPO)
    for name in [name for name in os.environ if name.startswith("POLICYD_")]:
        monkeypatch.delenv(name)
    _, output = run_main(command, capsys, monkeypatch)
    assert output == command_blocks()[command]


def test_the_readme_shows_validate_check_and_senders_with_their_output() -> None:
    shown = [c for c in command_blocks() if c.startswith("policyd ") and "examples/" in c]
    assert [c.split()[1] for c in shown] == ["validate", "check", "senders"], shown


def test_the_configuration_error_example(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = section("Configuration reference")
    settings = re.search(r"With this `policyd.toml`:\n\n```toml\n(.*?)```", reference, re.S)
    assert settings, "the example's policyd.toml went missing"
    (tmp_path / "policyd.toml").write_text(settings[1])
    monkeypatch.chdir(tmp_path)
    [(command, output)] = command_blocks(reference).items()
    code, printed = run_main(command, capsys, monkeypatch)
    assert (code, printed) == (EXIT_CONFIG, output)
    assert "exits with status 78" in reference


def documented(text: str) -> set[str]:
    """The names in the first column of the tables in ``text``."""
    first_cells = re.findall(r"^\| ([^|]+) \|", text, re.MULTILINE)
    return {name for cell in first_cells for name in re.findall(r"`([a-z0-9_]+)`", cell)}


def test_every_setting_is_in_the_configuration_reference() -> None:
    reference = README.split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
    settings = reference.split("### Map options", 1)[0]
    assert documented(settings) == set(Settings.model_fields)


def test_every_option_of_a_network_map_is_in_the_configuration_reference() -> None:
    """The options a map type adds beside its type and its file (``TYPE:LOCATION``)."""
    options = set()
    for _, store in stores.backends().values():
        options |= set(store.Options.model_fields) - {"type", store.location}
    assert options, "no map type has options: this table would be empty"
    assert documented(section("Map options")) == options


def section(title: str) -> str:
    """The text of the README section (## or ###) with this title, up to the next one (a
    line starting "# " is a comment in a code block)."""
    match = re.search(rf"^##+ {re.escape(title)}\n(.*?)(?=^##+ |\Z)", README, re.M | re.S)
    assert match, f"the README has no section {title!r}"
    return match[1]


def exported_families() -> set[str]:
    """Each metric of a live exposition, named as Prometheus shows it (counters with
    _total, the info metric with _info), with a map loaded and nothing asked yet."""

    async def families() -> set[str]:
        settings = Settings(maps=[f"dms:{REPO / 'examples' / 'dms'}"], reload_interval=0)
        async with Service.running(settings) as service:
            registry = service.metrics.exposition(service.statuses)
            suffix = {"counter": "_total", "info": "_info"}
            return {f"{m.name}{suffix.get(m.type, '')}" for m in registry.collect() if m.samples}

    return asyncio.run(families())


def test_the_metrics_table_lists_every_exported_metric() -> None:
    table = section("Observability").split("| metric |", 1)[1].split("\n\n", 1)[0]
    documented = {
        name
        for cell in re.findall(r"^\| ([^|]+) \|", table, re.M)
        for name in re.findall(r"`([a-z_]+)`", cell)
    }
    assert documented == exported_families()


# The troubleshooting example's docker-mailserver config directory: alias@example.com is
# alice's, on line 7 of postfix-virtual.cf, as the README's output says.
TROUBLESHOOTING_DMS = {
    "postfix-accounts.cf": "alice@example.com|{SHA512-CRYPT}$6$x$y\n"
    "bob@example.com|{SHA512-CRYPT}$6$x$y\n",
    "postfix-virtual.cf": "# ALIAS TARGET[,TARGET...]\n"
    "info@example.com alice@example.com\n"
    "sales@example.com alice@example.com,bob@example.com\n"
    "\n"
    "# older addresses\n"
    "contact@example.com info@example.com\n"
    "alias@example.com alice@example.com\n",
}
DMS_MOUNT = "/tmp/docker-mailserver"  # where the image and the compose file put the config


def troubleshooting() -> tuple[list[str], str, str]:
    """The Troubleshooting section's commands, its check output, and its decision log line."""
    text = section('Troubleshooting "Sender address rejected: not owned by user"')
    blocks = re.findall(r"^```(\w*)\n(.*?)^```$", text, re.M | re.S)
    commands = [line.split("  #")[0].strip() for line in blocks[0][1].splitlines()]
    assert blocks[0][0] == "sh" and blocks[1][0] == blocks[2][0] == ""
    return commands, blocks[1][1], blocks[2][1].strip()


def logged(line: str, settings: Settings, request: PolicyRequest) -> str:
    """The decision log line for ``request`` decided with ``settings``, as if logged at the
    time ``line`` shows."""

    async def decide() -> Decision:
        async with Service.running(settings) as service:
            return await service.answer(request)

    decision = asyncio.run(decide())
    stamp = re.match(r"time=(\S+)", line)
    assert stamp, line
    shown = calendar.timegm(time.strptime(stamp[1][:19], "%Y-%m-%dT%H:%M:%S"))
    created = shown + int(stamp[1][20:23]) / 1000 + 0.0005
    return Formatter("logfmt").decision(created, request, decision)


def test_troubleshooting_runs_check_where_each_deployment_runs_policyd() -> None:
    commands, _, _ = troubleshooting()
    compose, kubectl, systemd = commands
    assert not any("--config" in command for command in commands)
    # docker compose exec SERVICE: the compose file's policyd service.
    services = yaml.safe_load((REPO / "deploy/docker-mailserver/compose.yaml").read_text())
    assert compose.startswith("docker compose exec policyd policyd check ")
    assert "policyd" in services["services"]
    # kubectl -n NAMESPACE exec deploy/NAME -c CONTAINER: the sidecar's Deployment.
    found = re.match(r"kubectl -n (\S+) exec deploy/(\S+) -c (\S+) -- policyd check ", kubectl)
    assert found, kubectl
    namespace, name, container = found.groups()
    deployments = [
        document
        for path in sorted((REPO / "deploy/kubernetes/sidecar").glob("*.yaml"))
        for document in yaml.safe_load_all(path.read_text())
        if document and document["kind"] == "Deployment"
    ]
    (deployment,) = [d for d in deployments if d["metadata"]["name"] == name]
    assert deployment["metadata"]["namespace"] == namespace
    assert container in [c["name"] for c in deployment["spec"]["template"]["spec"]["containers"]]
    # systemd: the unit's environment file, and the policyd it starts.
    unit = (REPO / "deploy/systemd/policyd.service").read_text()
    environment_file = re.search(r"^EnvironmentFile=-?(\S+)$", unit, re.M)
    executable = re.search(r"^ExecStart=(\S+) serve$", unit, re.M)
    assert environment_file and executable
    assert systemd.startswith(f"set -a; . {environment_file[1]}; set +a; {executable[1]} check ")
    # The same question everywhere.
    assert len({command.split(" check ", 1)[1] for command in commands}) == 1


def test_troubleshooting_output_and_log_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    commands, output, log_line = troubleshooting()
    for name, text in TROUBLESHOOTING_DMS.items():
        (tmp_path / name).write_text(text)
    for name in [name for name in os.environ if name.startswith("POLICYD_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("POLICYD_MAPS", f"dms:{tmp_path}")  # what the image sets, here
    inside = commands[0].removeprefix("docker compose exec policyd ")
    code, printed = run_main(inside, capsys, monkeypatch)
    assert code == EXIT_REJECT
    assert printed.replace(str(tmp_path), DMS_MOUNT) == output

    # The daemon's log line for the same refusal, at the time the README shows.
    login, sender = shlex.split(inside)[-2:]
    instance = re.search(r" instance=(\S+)", log_line)
    assert instance
    request = PolicyRequest(sender=sender, sasl_username=login, instance=instance[1])
    settings = Settings(maps=[f"dms:{tmp_path}"])
    assert logged(log_line, settings, request) == log_line


def test_the_quick_start_answers_logs_and_is_ready_as_shown(tmp_path: Path) -> None:
    """The quick start's daemon, on ports the kernel picks: the reply to its request, the
    decision log line (Observability) and /readyz are what the README shows."""
    quick_start = section("Quick start")
    serve = re.search(r"&& (policyd serve [^\n]*)\n", quick_start)
    payload = re.search(r"^printf '([^']*)' \| nc -q1 \S+ \d+\n# (action=.*)$", quick_start, re.M)
    readyz = re.search(r"^curl -s \S+/readyz\n((?:# .*\n)+)", section("Observability"), re.M)
    log_line = re.search(
        r"^time=\S+ (level=info logger=policyd.decision .*)$", section("Observability"), re.M
    )
    assert serve and payload and readyz and log_line
    command = [sys.executable, "-m", "policyd", *shlex.split(serve[1])[1:]]
    ports = ["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"]
    env = {"PATH": os.environ["PATH"], "LANG": "C.UTF-8"}
    daemon = Daemon([*command, *ports], env, tmp_path / "policyd.log", cwd=REPO)
    try:
        request = payload[1].encode().decode("unicode_escape").encode()
        host, _, port = daemon.endpoint.removeprefix("inet:").rpartition(":")
        with socket.create_connection((host, int(port)), timeout=10) as connection:
            connection.sendall(request)
            reply = b""
            while not reply.endswith(b"\n\n"):
                chunk = connection.recv(4096)
                assert chunk, reply
                reply += chunk
        assert reply.decode() == payload[2] + "\n\n"
        with urllib.request.urlopen(f"http://{daemon.http}/readyz", timeout=5) as ready:
            body = ready.read().decode()
        assert body == "".join(line.removeprefix("# ") + "\n" for line in readyz[1].splitlines())
        decisions = wait_until(
            lambda: re.findall(r"^time=\S+ (.*msg=decision.*)$", daemon.log.read_text(), re.M),
            "the decision log line",
        )
        assert decisions == [log_line[1]]
    except BaseException:
        daemon.kill()
        raise
    daemon.stop()


def exit_code_table() -> dict[int, str]:
    """The README's exit codes, by code, without the Markdown."""
    table = section("Exit codes")
    rows = re.findall(r"^\| (\d+) \| (.*) \|$", table, re.M)
    return {int(code): meaning.replace("`", "") for code, meaning in rows}


def test_the_exit_code_table_is_the_one_policyd_uses() -> None:
    """The same words `policyd --help` prints."""
    assert exit_code_table() == EXIT_CODES
    shown = build_parser().format_help()
    for code, meaning in exit_code_table().items():
        assert f"  {code:<3} {meaning}\n" in shown, code


CHECK = ["check", "--config", "examples/policyd.toml"]
# A command for each exit code the table gives `check` and `validate`; serve's 1 (a second
# SIGTERM) is tests/test_cli.py::test_second_sigterm_exits_at_once, and 70 (a bug)
# ::test_an_unexpected_error_is_a_bug_with_its_traceback_and_exit_70.
EXITS = [
    (EXIT_OK, [*CHECK, "user1@localhost.localdomain", "alias1@localhost.localdomain"]),
    (EXIT_OK, [*CHECK, "user1@localhost.localdomain", ""]),  # the null sender: not checked
    (EXIT_REJECT, [*CHECK, "added@localhost.localdomain", "user2@localhost.localdomain"]),
    (EXIT_USAGE, [*CHECK, "only-a-login@localhost.localdomain"]),
    (EXIT_TEMPFAIL, ["check", "--map", "pcre:{backtracking}", "b@x", f"{'a' * 40}@x"]),
    (EXIT_CONFIG, ["validate", "--map", "dms:{empty}"]),
    (EXIT_CONFIG, [*CHECK, "--listen", "127.0.0.1:100400", "a@x", "b@x"]),
]


@pytest.mark.parametrize(("code", "argv"), EXITS)
def test_each_exit_code(
    code: int,
    argv: list[str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert code in exit_code_table()
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("POLICYD_PATTERN_TIME_LIMIT", "0.01")
    backtracking = tmp_path / "senders.pcre"
    backtracking.write_text("/^(a+)+$/ nobody@x\n")  # exponential on a@x, cut off: a 4xx
    (tmp_path / "empty").mkdir()
    words = [w.format(backtracking=backtracking, empty=tmp_path / "empty") for w in argv]
    try:
        exited: object = main(words)
    except SystemExit as usage:
        exited = usage.code
    assert exited == code, capsys.readouterr()


def test_is_it_working_names_the_exit_codes_of_check() -> None:
    sentence = re.search(r"It exits (.*?) \(see Exit codes\)", section("Is it working?"), re.S)
    assert sentence, "the sentence on check's exit codes went missing"
    named = {int(code) for code in re.findall(r"\b(\d+) (?:when|on)\b", sentence[1])}
    for_check = {code for code, meaning in exit_code_table().items() if "check" in meaning}
    assert named == for_check | {EXIT_CONFIG}

"""`policyd check` and `policyd serve` give the same answer for every row of the decision
tables, from the same settings file: check as the CLI runs it, serve as the daemon answers a
request on its socket."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from policyd import cli
from policyd.config import load_settings
from policyd.daemon import Daemon
from tests.conftest import DATA
from tests.decision_tables import read_rule_table, read_table, setting_values

MAPS = {
    "dms": [f"dms:{DATA / 'dms'}"],
    "postfix": [
        f"texthash:{DATA / 'postfix' / 'sender_login.texthash'}",
        f"pcre:{DATA / 'postfix' / 'sender_login.pcre'}",
    ],
}

# (login, sender, server_port, policy_context, client_address); "" where unset.
Question = tuple[str, str, str, str, str]


def toml(values: dict[str, Any]) -> str:
    def value(item: Any) -> str:
        if isinstance(item, bool):
            return "true" if item else "false"
        if isinstance(item, list):
            return "[" + ", ".join(value(part) for part in item) + "]"
        return json.dumps(str(item))  # a JSON string is a TOML basic string

    return "".join(f"{name} = {value(item)}\n" for name, item in values.items())


def groups() -> dict[str, tuple[dict[str, Any], list[Question]]]:
    """Every distinct settings file of the two tables, with the questions asked under it."""
    found: dict[str, tuple[dict[str, Any], list[Question]]] = {}

    def add(values: dict[str, Any], question: Question) -> None:
        text = toml(values)
        found.setdefault(text, (values, []))[1].append(question)

    for row in read_table():
        login = "" if row.login == "-" else row.login
        sender = "" if row.sender == "<>" else row.sender
        add({"maps": MAPS[row.maps], "mode": row.mode}, (login, sender, "", "", ""))
    for rule in read_rule_table():
        unset = {"-": ""}
        add(
            setting_values(rule.options),
            (
                unset.get(rule.login, rule.login),
                rule.sender,
                unset.get(rule.port, rule.port),
                unset.get(rule.context, rule.context),
                unset.get(rule.client, rule.client),
            ),
        )
    return found


GROUPS = groups()


def request(question: Question) -> bytes:
    login, sender, port, context, client = question
    lines = [
        "request=smtpd_access_policy",
        "protocol_state=RCPT",
        f"sender={sender}",
        f"sasl_username={login}",
        f"server_port={port}",
        f"policy_context={context}",
        f"client_address={client}",
    ]
    return ("\n".join(lines) + "\n\n").encode()


async def served(config: Path, questions: Iterable[Question], socket_path: Path) -> list[str]:
    """The actions the daemon sends for each question, asked on one connection."""
    settings = load_settings(
        config, environ={"POLICYD_LISTEN": f"unix:{socket_path}", "POLICYD_METRICS_LISTEN": "none"}
    )
    daemon = Daemon(settings)
    ready = asyncio.Event()
    running = asyncio.create_task(daemon.run(ready=ready.set))
    await asyncio.wait_for(ready.wait(), 10)
    reader, writer = await asyncio.open_unix_connection(str(socket_path))
    actions = []
    for question in questions:
        writer.write(request(question))
        reply = await asyncio.wait_for(reader.readuntil(b"\n\n"), 5)
        actions.append(reply.decode().removeprefix("action=").rstrip("\n"))
    writer.close()
    daemon.stop()
    assert await asyncio.wait_for(running, 10) == 0
    return actions


def checked(config: Path, question: Question, capsys: pytest.CaptureFixture[str]) -> str:
    login, sender, port, context, client = question
    args = ["check", "--config", str(config), login, sender]
    args += ["--server-port", port, "--policy-context", context, "--client-address", client]
    capsys.readouterr()
    cli.main(args)
    out = capsys.readouterr().out
    return next(line for line in out.splitlines() if line.startswith("action:"))[
        len("action:") :
    ].strip()


@pytest.mark.parametrize("settings_file", sorted(GROUPS), ids=lambda text: " ".join(text.split()))
def test_check_and_serve_answer_every_row_alike(
    settings_file: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "policyd.toml"
    config.write_text(settings_file)
    questions = GROUPS[settings_file][1]
    daemon_actions = asyncio.run(served(config, questions, tmp_path / "policy.sock"))
    check_actions = [checked(config, question, capsys) for question in questions]
    assert check_actions == daemon_actions


def test_the_groups_cover_every_row() -> None:
    asked = sum(len(questions) for _, questions in GROUPS.values())
    assert asked == len(read_table()) + len(read_rule_table())

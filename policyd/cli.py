"""The `policyd` command: serve, check and validate. Thin: each calls what the daemon uses.

Exit codes: 0 success (check: permitted or not checked), 1 check: rejected, 75 check: temporary
failure, validate: a directory or database that cannot be reached now, 78 configuration or
map error (systemd's RestartPreventExitStatus can use it).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from policyd import __version__, stores
from policyd.codec import PolicyRequest
from policyd.config import ConfigError, Settings, load_settings
from policyd.daemon import Daemon
from policyd.engine import Decision, Verdict
from policyd.logs import Logging
from policyd.model import LoadError, Mode
from policyd.service import Service
from policyd.sockets import ListenError

EXIT_REJECT = 1
EXIT_TEMPFAIL = 75
EXIT_CONFIG = 78

log = logging.getLogger("policyd")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="policyd",
        description="Postfix policy daemon: may this SASL login use this envelope sender?",
    )
    parser.add_argument("--version", action="version", version=f"policyd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, help="TOML settings file (or POLICYD_CONFIG)")
    common.add_argument(
        "--listen",
        action="append",
        metavar="ENDPOINT",
        help="inet:HOST:PORT or unix:PATH; repeat for several (default inet:127.0.0.1:10040)",
    )
    common.add_argument(
        "--map",
        dest="maps",
        action="append",
        metavar="TYPE:LOCATION",
        help=f"{stores.map_types_help()}; repeat, searched in order",
    )
    common.add_argument("--mode", choices=[mode.value for mode in Mode])
    rules = common.add_argument_group("ownership rules (README: Ownership rules)")
    rules.add_argument("--plus-addresses", action="store_const", const=True)
    rules.add_argument("--catch-all", action="store_const", const=True)
    rules.add_argument("--nested-aliases", action="store_const", const=True)
    rules.add_argument("--ignore-external-targets", action="store_const", const=True)
    rules.add_argument("--grants", type=Path, metavar="FILE", help="send-only grants file")
    rules.add_argument("--deny", type=Path, metavar="FILE", help="deny file")
    rules.add_argument("--alias-logins", choices=["allow", "account", "refuse"])
    rules.add_argument("--scope-port", dest="scope_ports", action="append", metavar="PORT")
    rules.add_argument("--scope-context", dest="scope_contexts", action="append", metavar="NAME")
    rules.add_argument("--exempt-network", dest="exempt_networks", action="append", metavar="CIDR")

    commands.add_parser("serve", parents=[common], help="run the policy daemon")
    check = commands.add_parser(
        "check", parents=[common], help="decide one LOGIN/SENDER pair and explain why"
    )
    check.add_argument(
        "login", metavar="LOGIN", help='SASL login; "" for an unauthenticated client'
    )
    check.add_argument("sender", metavar="SENDER", help='envelope sender; "" for the null sender')
    request = check.add_argument_group("request attributes, as Postfix would send them")
    request.add_argument("--server-port", default="", metavar="PORT")
    request.add_argument("--policy-context", default="", metavar="NAME")
    request.add_argument("--client-address", default="", metavar="IP")
    commands.add_parser("validate", parents=[common], help="load the settings and maps, report")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = _settings(args)
    except ConfigError as error:
        for problem in error.problems:
            print(f"policyd: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    logs = Logging(settings.log_level, settings.log_format)
    command = {"serve": serve, "check": check, "validate": validate}[args.command]
    try:
        return command(settings, args, logs)
    finally:
        logs.stop()


# Command-line flags that are settings (the rest are commands and request attributes).
FLAG_SETTINGS = (
    "listen",
    "maps",
    "mode",
    "plus_addresses",
    "catch_all",
    "nested_aliases",
    "ignore_external_targets",
    "grants",
    "deny",
    "alias_logins",
    "scope_ports",
    "scope_contexts",
    "exempt_networks",
)


def _settings(args: argparse.Namespace) -> Settings:
    flags: dict[str, Any] = {name: getattr(args, name) for name in FLAG_SETTINGS}
    return load_settings(args.config, flags=flags)


def _print_load_error(error: LoadError) -> None:
    for problem in error.problems:
        print(f"policyd: {problem}", file=sys.stderr)


# serve


def serve(settings: Settings, args: argparse.Namespace, logs: Logging) -> int:
    try:
        return asyncio.run(Daemon(settings, decision_log=logs.log_decision).run())
    except LoadError as error:
        _print_load_error(error)
        return EXIT_CONFIG
    except ListenError as error:
        print(f"policyd: {error}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as error:  # e.g. the socket group cannot be set
        print(f"policyd: listen: {error.strerror or error}", file=sys.stderr)
        return EXIT_CONFIG


# check


def check(settings: Settings, args: argparse.Namespace, logs: Logging) -> int:
    request = PolicyRequest(
        sender=args.sender,
        sasl_username=args.login,
        protocol_state="RCPT",
        server_port=args.server_port,
        policy_context=args.policy_context,
        client_address=args.client_address,
    )
    # check prints the decision itself; the daemon's decision log would only repeat it.
    logging.getLogger("policyd.decision").setLevel(logging.WARNING)
    try:
        decision = asyncio.run(_decide_once(settings, request))
    except LoadError as error:
        _print_load_error(error)
        return EXIT_CONFIG
    print(f"verdict: {decision.verdict}")
    print(f"action:  {decision.action}")
    print(f"postfix: {postfix_reply(decision.action, args.sender)}")
    print(f"reason:  {decision.reason}: {decision.explanation}")
    if decision.rule is not None:
        print(f"rule:    {decision.rule}")
    if decision.verdict is Verdict.REJECT and decision.action != "DUNNO":
        return EXIT_REJECT
    if decision.verdict is Verdict.TEMPFAIL and decision.action != "DUNNO":
        return EXIT_TEMPFAIL
    return 0


async def _decide_once(settings: Settings, request: PolicyRequest) -> Decision:
    async with Service.running(settings.model_copy(update={"reload_interval": 0})) as service:
        return await service.answer(request)


_CODED = re.compile(r"([45])(\d\d)(?:\s+(\d\.\d{1,3}\.\d{1,3}))?(?:\s+(.*))?", re.DOTALL)
_KEYWORD = re.compile(r"(\S+)(?:\s+(.*))?", re.DOTALL)


def postfix_reply(action: str, sender: str) -> str:
    """What Postfix makes of ``action`` in smtpd_sender_restrictions (smtpd_check.c).

    Postfix wraps the text as ``<SENDER>: Sender address rejected: TEXT`` and supplies a
    default enhanced status code when the action has none.
    """
    coded = _CODED.fullmatch(action)
    keyword = _KEYWORD.fullmatch(action)
    if coded:
        code = coded.group(1) + coded.group(2)
        dsn = coded.group(3) or f"{coded.group(1)}.7.1"
        text = coded.group(4) or "Access denied"
    elif keyword and keyword.group(1).upper() in ("REJECT", "DEFER", "DEFER_IF_PERMIT"):
        code, dsn = ("554", "5.7.1") if keyword.group(1).upper() == "REJECT" else ("450", "4.7.1")
        text = keyword.group(2) or "Access denied"
    elif action.upper() == "OK":
        return "sender permitted; the rest of smtpd_sender_restrictions is skipped"
    else:
        return "no verdict; Postfix goes on with the next restriction"
    return f"{code} {dsn} <{sender}>: Sender address rejected: {text}"


# validate


def validate(settings: Settings, args: argparse.Namespace, logs: Logging) -> int:
    """Start the service as serve does, without listening, and report on every map."""
    print(f"mode: {settings.mode}")
    print(f"listen: {', '.join(str(endpoint) for endpoint in settings.listen)}")
    try:
        service = Service.from_settings(settings.model_copy(update={"reload_interval": 0}))
    except LoadError as error:
        _print_load_error(error)
        return EXIT_CONFIG
    try:
        asyncio.run(service.start())
    except LoadError as error:
        failure: LoadError | None = error
    else:
        failure = None
        asyncio.run(service.close())
    unready = False
    for status in service.statuses():
        is_rules = service.rule_files is not None and status is service.rule_files.status
        if not status.ready:
            # A LoadError's problems follow on stderr, each with its line; else say why here.
            why = f": {status.last_error}" if status.last_error and failure is None else ""
            print(f"{status.name if is_rules else 'map ' + status.name}: FAILED{why}")
            unready = True
        elif service.rule_files is not None and is_rules:
            rules = service.rule_files.rules
            grants = sum(len(items) for items in rules.grants.values())
            print(
                f"{status.name}: {grants} grants, {len(rules.sender_denies)} denied"
                f" senders, {len(rules.login_denies)} denied logins"
            )
        else:
            print(f"map {status.name}: {status.description or f'{status.entries} entries'}")
        for warning in status.warnings:
            print(f"policyd: warning: {warning}", file=sys.stderr)
    if failure is not None:
        _print_load_error(failure)
        return EXIT_CONFIG
    # A network store whose server cannot be reached now: serve would start, not ready.
    return EXIT_TEMPFAIL if unready else 0

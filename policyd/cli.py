"""The `policyd` command: serve, check, validate, senders and audit. Thin: each calls what the
daemon uses.

Exit codes (README "Exit codes"): 0 success (check: permitted or not checked), 1 check:
rejected, 64 usage error (an unknown flag, a missing argument), 70 internal error (a bug: a
traceback is printed), 75 check, senders: temporary failure, validate: a directory
or database that cannot be reached now, 78 configuration or map error. They are
sysexits.h's, so systemd's RestartPreventExitStatus can name the ones a restart cannot fix.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import sys
import traceback
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from policyd import __version__, audit, senders, stores
from policyd.audit import Severity
from policyd.codec import PolicyRequest
from policyd.config import ConfigError, Settings, load_settings
from policyd.daemon import Daemon
from policyd.engine import Decision, Verdict
from policyd.logs import Logging
from policyd.model import LoadError, Mode, StoreUnavailable
from policyd.service import Service
from policyd.sockets import ListenError
from policyd.stores.network import NetworkStore

EXIT_OK = 0
EXIT_REJECT = 1
EXIT_USAGE = 64  # EX_USAGE
EXIT_SOFTWARE = 70  # EX_SOFTWARE
EXIT_FINDINGS = EXIT_REJECT  # audit: a finding at or above --fail-on
EXIT_TEMPFAIL = 75  # EX_TEMPFAIL
EXIT_CONFIG = 78  # EX_CONFIG

# What each exit code means, as the README's "Exit codes" table says it.
EXIT_CODES = {
    EXIT_OK: "success; check: the sender is permitted, or not checked",
    EXIT_REJECT: (
        "check: the sender is rejected; audit: a finding at or above --fail-on;"
        " serve: a second SIGTERM cut the shutdown short"
    ),
    EXIT_USAGE: "usage error: an unknown command or flag, a missing or extra argument",
    EXIT_SOFTWARE: "internal error (a bug): the traceback is printed",
    EXIT_TEMPFAIL: "check, senders: temporary failure (a map could not answer);"
    " validate: a map's server could not be reached",
    EXIT_CONFIG: "configuration error: settings, maps, rules files or listen addresses",
}

log = logging.getLogger("policyd")

T = TypeVar("T")


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error exits with EXIT_USAGE (argparse's own is 2)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="policyd",
        description="Postfix policy daemon: may this SASL login use this envelope sender?",
        epilog="exit codes:\n"
        + "".join(f"  {code:<3} {what}\n" for code, what in EXIT_CODES.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"policyd {__version__}")
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=ArgumentParser
    )

    common = ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, help="TOML settings file (or POLICYD_CONFIG)")
    common.add_argument(
        "--listen",
        action="append",
        metavar="ENDPOINT",
        help="inet:HOST:PORT, HOST:PORT or unix:PATH; repeat for several"
        " (default inet:127.0.0.1:10040)",
    )
    common.add_argument(
        "--metrics-listen",
        metavar="ENDPOINT",
        help="where /metrics, /healthz and /readyz are served, or none"
        " (default inet:127.0.0.1:10041)",
    )
    common.add_argument(
        "--map",
        dest="maps",
        action="append",
        metavar="TYPE:LOCATION",
        help=f"{stores.map_types_help()}; repeat, searched in order",
    )
    common.add_argument(
        "--mode",
        choices=[mode.value for mode in Mode],
        help="the Postfix restriction to reproduce (default authenticated;"
        " permit: a dry run that only logs)",
    )
    rules = common.add_argument_group("ownership rules (README: Ownership rules)")
    rules.add_argument(
        "--plus-addresses",
        action="store_const",
        const=True,
        help="user+tag@ is owned by whoever may use user@",
    )
    rules.add_argument(
        "--catch-all",
        action="store_const",
        const=True,
        help="the owner of @domain may use its addresses that have no entry of their own",
    )
    rules.add_argument(
        "--nested-aliases",
        action="store_const",
        const=True,
        help="follow alias chains (alias -> alias -> account)",
    )
    rules.add_argument(
        "--ignore-external-targets",
        action="store_const",
        const=True,
        help="only accounts own aliases (needs a dms map)",
    )
    rules.add_argument("--grants", type=Path, metavar="FILE", help="send-only grants file")
    rules.add_argument("--deny", type=Path, metavar="FILE", help="denied senders and logins")
    rules.add_argument(
        "--alias-logins",
        choices=["allow", "account", "refuse"],
        help="what a login that is an alias may do (needs a dms map; default allow)",
    )
    rules.add_argument(
        "--scope-port",
        dest="scope_ports",
        action="append",
        metavar="PORT",
        help="only check requests to this server_port; repeat for several",
    )
    rules.add_argument(
        "--scope-context",
        dest="scope_contexts",
        action="append",
        metavar="NAME",
        help="only check requests with this policy_context; repeat for several",
    )
    rules.add_argument(
        "--exempt-network",
        dest="exempt_networks",
        action="append",
        metavar="CIDR",
        help="never check clients in this network; repeat for several",
    )

    commands.add_parser("serve", parents=[common], help="run the policy daemon")
    check = commands.add_parser(
        "check", parents=[common], help="decide one LOGIN/SENDER pair and explain why"
    )
    check.add_argument(
        "login", metavar="LOGIN", help='SASL login; "" for an unauthenticated client'
    )
    check.add_argument("sender", metavar="SENDER", help='envelope sender; "" for the null sender')
    request = check.add_argument_group("request attributes, as Postfix would send them")
    request.add_argument(
        "--server-port", default="", metavar="PORT", help="the port the client connected to"
    )
    request.add_argument(
        "--policy-context", default="", metavar="NAME", help="check_policy_service's policy_context"
    )
    request.add_argument(
        "--client-address", default="", metavar="IP", help="the SMTP client's address"
    )
    commands.add_parser("validate", parents=[common], help="load the settings and maps, report")
    senders = commands.add_parser(
        "senders", parents=[common], help="list every sender LOGIN may use, and why"
    )
    senders.add_argument("login", metavar="LOGIN", help="SASL login")
    senders.add_argument("--json", action="store_true", help="the stable JSON shape (README)")
    audit = commands.add_parser(
        "audit", parents=[common], help="review the maps and rules: wide rules, dead rules, ..."
    )
    audit.add_argument("--json", action="store_true", help="findings as JSON")
    audit.add_argument(
        "--fail-on",
        choices=[str(severity) for severity in Severity],
        metavar="SEVERITY",
        help="exit 1 if a finding is at least this severe: info, warning or error",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return guarded(lambda: _run(args, flag_names(parser)))


def guarded(command: Callable[[], int]) -> int:
    """Run ``command``; an exception nobody expected is a bug: its traceback, and exit 70."""
    try:
        return command()
    except Exception:
        traceback.print_exc()
        print("policyd: internal error (a bug): please report the traceback above", file=sys.stderr)
        return EXIT_SOFTWARE


def _run(args: argparse.Namespace, names: dict[str, str]) -> int:
    try:
        settings = _settings(args, names)
    except ConfigError as error:
        for problem in error.problems:
            print(f"policyd: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    logs = Logging(settings.log_level, settings.log_format)
    command = {
        "serve": serve,
        "check": check,
        "validate": validate,
        "senders": senders_command,
        "audit": audit_command,
    }[args.command]
    try:
        return command(settings, args, logs)
    finally:
        logs.stop()


# Command-line flags that are settings (the rest are commands and request attributes).
FLAG_SETTINGS = (
    "listen",
    "metrics_listen",
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


def flag_names(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each setting's flag as the user types it: maps is --map, exempt_networks
    --exempt-network."""
    found: dict[str, str] = {}
    for action in _actions(parser):
        if action.dest in FLAG_SETTINGS and action.option_strings:
            found.setdefault(action.dest, action.option_strings[0])
    return found


def _actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """Every action of the parser and of its subcommands' parsers."""
    found = list(parser._actions)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                found += _actions(sub)
    return found


def _settings(args: argparse.Namespace, names: dict[str, str] | None = None) -> Settings:
    flags: dict[str, Any] = {name: getattr(args, name) for name in FLAG_SETTINGS}
    return load_settings(args.config, flags=flags, flag_names=names)


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
    if decision.key is not None:
        print(f"lookup key: {decision.key}")
    if decision.rule is not None:
        print(f"rule:    {decision.rule}")
    if decision.verdict is Verdict.REJECT and decision.action != "DUNNO":
        return EXIT_REJECT
    if decision.verdict is Verdict.TEMPFAIL and decision.action != "DUNNO":
        return EXIT_TEMPFAIL
    return 0


async def _once(settings: Settings, work: Callable[[Service], Awaitable[T]]) -> T:
    """``work`` done with a started service that watches no files, closed after it."""
    async with Service.running(settings.model_copy(update={"reload_interval": 0})) as service:
        return await work(service)


async def _decide_once(settings: Settings, request: PolicyRequest) -> Decision:
    return await _once(settings, lambda service: service.answer(request))


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
    failure = asyncio.run(_start_and_close(service))
    network = {store.status.name for store in service.stores if isinstance(store, NetworkStore)}
    unreachable = False
    for status in service.statuses():
        is_rules = service.rule_files is not None and status is service.rule_files.status
        if not status.ready:
            # A server that cannot be reached is not a settings error: serve would start
            # and answer 4xx until it can.
            why = f": {status.last_error}" if status.name in network and status.last_error else ""
            unreachable |= status.name in network
            print(f"{status.name if is_rules else 'map ' + status.name}: FAILED{why}")
            continue
        if status.name in network:
            described = f", {status.description}" if status.description else ""
            detail = f"; {status.detail}" if status.detail else ""
            print(f"map {status.name}: connected{described}{detail}")
        elif service.rule_files is not None and is_rules:
            rules = service.rule_files.rules
            grants = sum(len(items) for items in rules.grants.values())
            print(
                f"{status.name}: {grants} grants, {len(rules.sender_denies)} denied"
                f" senders, {len(rules.login_denies)} denied logins"
            )
        else:
            print(f"map {status.name}: {status.counted}")
        for warning in status.warnings:
            print(f"policyd: warning: {warning}", file=sys.stderr)
    bare = [status for status in service.statuses() if status.bare_keys]
    if bare and not settings.names_postfix_host():
        names = ", ".join(f"{status.name} ({status.bare_keys})" for status in bare)
        print(
            f"policyd: warning: {names}: bare local-part keys are found only for $myorigin and"
            " mydestination, which are this host's defaults now: set myhostname, myorigin and"
            " mydestination as in Postfix's main.cf",
            file=sys.stderr,
        )
    if failure is not None:
        _print_load_error(failure)
        return EXIT_CONFIG
    return EXIT_TEMPFAIL if unreachable else EXIT_OK


async def _start_and_close(service: Service) -> LoadError | None:
    """Start the service as serve does, then close it, in one event loop (a network
    store's connections belong to the loop that opened them)."""
    try:
        await service.start()
    except LoadError as error:
        return error  # start() has closed what it opened
    await service.close()
    return None


# senders


def senders_command(settings: Settings, args: argparse.Namespace, logs: Logging) -> int:
    """List what the login may send as: exit 0, 75 if a store could not answer."""
    try:
        listing = asyncio.run(_list_once(settings, args.login))
    except LoadError as error:
        _print_load_error(error)
        return EXIT_CONFIG
    except StoreUnavailable as error:
        print(f"policyd: senders: {error}", file=sys.stderr)
        return EXIT_TEMPFAIL
    if args.json:
        print(json.dumps(listing.to_json(), indent=2, ensure_ascii=False))
    else:
        print(senders.as_text(listing), end="")
    return 0


async def _list_once(settings: Settings, login: str) -> senders.Listing:
    return await _once(settings, lambda service: senders.list_senders(service, login))


# audit


def audit_command(settings: Settings, args: argparse.Namespace, logs: Logging) -> int:
    """Report the findings; exit 1 if one is at least --fail-on, 78 if the maps do not load."""
    try:
        findings = asyncio.run(_audit_once(settings))
    except LoadError as error:
        _print_load_error(error)
        return EXIT_CONFIG
    if args.json:
        print(json.dumps([finding.to_json() for finding in findings], indent=2))
    else:
        print(audit.as_text(findings), end="")
    if args.fail_on is not None:
        threshold = Severity.parse(args.fail_on)
        if any(finding.severity >= threshold for finding in findings):
            return EXIT_FINDINGS
    return 0


async def _audit_once(settings: Settings) -> list[audit.Finding]:
    async def findings(service: Service) -> list[audit.Finding]:
        return audit.audit(service, settings.audit_max_senders)

    return await _once(settings, findings)

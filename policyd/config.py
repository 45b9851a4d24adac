"""Settings: one pydantic model, filled from a TOML file, POLICYD_* variables and flags.

Later sources win: defaults < TOML file < environment < command-line flags. Every error is
reported as ``where: what`` (a file and line, a variable, a flag, or a setting name), never as
a traceback.
"""

from __future__ import annotations

import difflib
import grp
import json
import os
import pwd
import re
import shlex
import socket
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    IPvAnyAddress,
    IPvAnyNetwork,
    ValidationError,
    field_validator,
    model_validator,
)

from policyd import defaults, stores
from policyd.canonical import PostfixParams, compat_level, expand
from policyd.model import Mode
from policyd.readfile import LineTooLong, read_regular
from policyd.stores.base import StoreOptions

ENV_PREFIX = "POLICYD_"


class ConfigError(Exception):
    """A user error in the configuration: one ``where: what`` line per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Endpoint(Strict):
    """A listening address in Postfix's own notation: ``inet:HOST:PORT`` or ``unix:PATH``."""

    kind: Literal["inet", "unix"]
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"inet:{host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """``inet:HOST:PORT``, ``unix:PATH`` (or Postfix's ``local:PATH``), and ``HOST:PORT``
        as the docs and Postfix's master.cf write an inet address."""
        kind, _, rest = text.partition(":")
        if kind in ("unix", "local") and rest:
            return cls(kind="unix", path=rest)
        address = rest if kind == "inet" else text
        match = _INET.fullmatch(address)
        if match is None:
            raise ValueError(f"{text!r} is not inet:HOST:PORT, HOST:PORT or unix:PATH")
        host = match.group(1) or match.group(3) or ""
        port = int(match.group(2) or match.group(4))
        if port > MAX_PORT:
            raise ValueError(f"{text!r}: port {port} is out of range (0 to {MAX_PORT})")
        return cls(kind="inet", host=host, port=port)


MAX_PORT = 65535
# [IPV6]:PORT, or HOST:PORT with a host that has no colon (a name or an IPv4 address).
_INET = re.compile(r"\[([^\]]+)\]:(\d+)|([^:\[\]/]*):(\d+)")


# The options of one map: the registered backends' Options models, told apart by ``type``.
if TYPE_CHECKING:
    MapOptions = StoreOptions
else:
    MapOptions = Annotated[Union[stores.options_models()], Field(discriminator="type")]  # noqa: UP007


def _port(value: int) -> int:
    if not 0 <= value <= MAX_PORT:
        raise ValueError(f"port {value} is out of range (0 to {MAX_PORT})")
    return value


def _endpoint(value: Any) -> Any:
    return Endpoint.parse(value) if isinstance(value, str) else value


def parse_map(value: Any) -> Any:
    """Accept Postfix-style ``TYPE:LOCATION`` strings as well as tables with a ``type`` key."""
    if isinstance(value, str):
        kind, sep, location = value.partition(":")
        if not sep or not location:
            raise ValueError(f"{value!r} is not TYPE:LOCATION, e.g. dms:/tmp/docker-mailserver")
        backends = stores.backends()
        if kind not in backends:
            raise ValueError(f"unknown map type {kind!r} (known: {', '.join(backends)})")
        return {"type": kind, backends[kind][1].location: location}
    if isinstance(value, dict) and "type" not in value:
        raise ValueError(f"a map table needs type (one of: {', '.join(stores.backends())})")
    if not isinstance(value, dict):
        raise ValueError("not TYPE:LOCATION nor a table with type, e.g. dms:/tmp/docker-mailserver")
    return value


# One list item each, so that an error names the item: maps[1], --map VALUE.
ListenEndpoint = Annotated[Endpoint, BeforeValidator(_endpoint)]
MapSpec = Annotated[MapOptions, BeforeValidator(parse_map)]

InetProtocol = Literal["all", "ipv4", "ipv6"]
_ALL_PROTOCOLS: InetProtocol = "all"  # Postfix's default inet_protocols

_DEFER = re.compile(r"(4\d\d|DEFER|DEFER_IF_PERMIT|DEFER_IF_REJECT)(\s.*)?", re.IGNORECASE)


class Settings(Strict):
    """Every setting. The README's configuration reference documents each one."""

    listen: list[ListenEndpoint] = Field(
        default_factory=lambda: [Endpoint.parse(e) for e in defaults.LISTEN], min_length=1
    )
    maps: list[MapSpec] = Field(default_factory=list, validate_default=True)
    login_addresses: list[MapSpec] = Field(default_factory=list)
    mode: Mode = Mode.AUTHENTICATED
    owned_action: Literal["OK", "DUNNO"] = defaults.OWNED_ACTION
    tempfail_action: str = defaults.TEMPFAIL_ACTION
    recipient_delimiter: str = defaults.RECIPIENT_DELIMITER
    # How Postfix turns the sender into its lookup key: its own main.cf parameters, by the
    # same names, with Postfix's defaults (README "How the sender is looked up").
    myhostname: str | None = None  # None: this host's name
    mydomain: str | None = None  # None: myhostname without its first label
    myorigin: str = "$myhostname"
    mydestination: list[str] | None = None  # None: Postfix's default; local_domains: the old name
    local_domains: list[str] | None = None
    inet_interfaces: list[IPvAnyAddress] = Field(default_factory=list)
    proxy_interfaces: list[IPvAnyAddress] = Field(default_factory=list)
    inet_protocols: list[InetProtocol] = Field(default_factory=lambda: [_ALL_PROTOCOLS])
    compatibility_level: str = defaults.COMPATIBILITY_LEVEL
    append_at_myorigin: bool = True
    append_dot_mydomain: bool | None = None  # None: as compatibility_level says
    swap_bangpath: bool = True
    allow_percent_hack: bool = True
    smtputf8_enable: bool | None = None  # None: as compatibility_level says
    reload_interval: float = Field(default=defaults.RELOAD_INTERVAL, ge=0)
    idle_timeout: float = Field(default=defaults.IDLE_TIMEOUT, gt=0)
    request_timeout: float = Field(default=defaults.REQUEST_TIMEOUT, gt=0)
    max_line_bytes: int = Field(default=defaults.MAX_LINE_BYTES, ge=64)
    max_request_bytes: int = Field(default=defaults.MAX_REQUEST_BYTES, ge=256)
    max_attributes: int = Field(default=defaults.MAX_ATTRIBUTES, ge=8)
    max_connections: int = Field(default=defaults.MAX_CONNECTIONS, ge=1)
    max_connections_per_client: int = Field(default=defaults.MAX_CONNECTIONS_PER_CLIENT, ge=1)
    allowed_clients: list[IPvAnyNetwork] = Field(default_factory=list)
    lookup_timeout: float = Field(default=defaults.LOOKUP_TIMEOUT, gt=0)
    pattern_time_limit: float = Field(default=defaults.PATTERN_TIME_LIMIT, ge=0.01, le=10)
    decision_cache_size: int = Field(default=defaults.DECISION_CACHE_SIZE, ge=0)
    shutdown_timeout: float = Field(default=defaults.SHUTDOWN_TIMEOUT, ge=0)
    allow_empty_maps: bool = False
    user: str | None = None
    group: str | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["logfmt", "json"] = "logfmt"
    log_decisions: Literal["rejects", "all", "none"] = "rejects"
    metrics_listen: Endpoint | None = Field(
        default_factory=lambda: Endpoint.parse(defaults.METRICS_LISTEN)
    )
    socket_mode: str = Field(default=defaults.SOCKET_MODE, pattern=r"^0?[0-7]{3}$")
    socket_group: str | None = None

    # Opt-in ownership rules beyond Postfix's (README "Ownership rules").
    plus_addresses: bool = False
    catch_all: bool = False
    nested_aliases: bool = False
    max_alias_depth: int = Field(default=defaults.MAX_ALIAS_DEPTH, ge=1, le=100)
    ignore_external_targets: bool = False
    grants: Path | None = None
    deny: Path | None = None
    alias_logins: Literal["allow", "account", "refuse"] = "allow"
    scope_ports: list[Annotated[int, AfterValidator(_port)]] = Field(default_factory=list)
    scope_contexts: list[str] = Field(default_factory=list)
    exempt_networks: list[IPvAnyNetwork] = Field(default_factory=list)

    # The reverse direction (README "policyd senders", "The senders API", "policyd audit").
    senders_api: bool = False
    senders_api_token_file: Path | None = None
    senders_api_rate: float = Field(default=defaults.SENDERS_API_RATE, gt=0)
    senders_api_burst: int = Field(default=defaults.SENDERS_API_BURST, ge=1)
    audit_max_senders: int = Field(default=defaults.AUDIT_MAX_SENDERS, ge=1)

    @field_validator("metrics_listen", mode="before")
    @classmethod
    def _metrics_endpoint(cls, value: Any) -> Any:
        if value in ("", "none", None):
            return None  # metrics and health endpoints switched off
        return Endpoint.parse(value) if isinstance(value, str) else value

    @field_validator("maps")
    @classmethod
    def _some_map(cls, value: list[Any]) -> list[Any]:
        if not value:
            raise ValueError(
                "no map configured; give one, e.g. --map dms:/tmp/docker-mailserver,"
                " maps = [...] in the config file, or POLICYD_MAPS"
            )
        return value

    @field_validator("owned_action", mode="before")
    @classmethod
    def _owned_action(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("tempfail_action")
    @classmethod
    def _tempfail(cls, value: str) -> str:
        # A store failure must never become a 5xx (mail bounced) or an OK (mail let through).
        if not _DEFER.fullmatch(value.strip()):
            raise ValueError("must be a temporary reply: 4NN text, DEFER or DEFER_IF_PERMIT")
        return value.strip()

    @field_validator("socket_group", "group")
    @classmethod
    def _group_exists(cls, value: str | None) -> str | None:
        if value is not None and not value.isdigit():
            try:
                grp.getgrnam(value)
            except KeyError:
                raise ValueError(f"no group named {value!r}") from None
        return value

    @field_validator("user")
    @classmethod
    def _user_exists(cls, value: str | None) -> str | None:
        if value is not None and not value.isdigit():
            try:
                pwd.getpwnam(value)
            except KeyError:
                raise ValueError(f"no user named {value!r}") from None
        return value

    @field_validator("compatibility_level")
    @classmethod
    def _compatibility(cls, value: str) -> str:
        compat_level(value)  # ValueError: malformed compatibility level syntax
        return value

    @model_validator(mode="after")
    def _postfix(self) -> Settings:
        if self.mydestination is not None and self.local_domains is not None:
            raise ValueError("local_domains: is the old name of mydestination; set one of them")
        self.postfix_params()  # a ValueError names its setting
        return self

    def names_postfix_host(self) -> bool:
        """True if the settings say which host's Postfix this is (not this host's defaults)."""
        return (
            self.myhostname is not None
            or self.mydestination is not None
            or self.local_domains is not None
            or self.myorigin != "$myhostname"
        )

    def postfix_params(self) -> PostfixParams:
        """Postfix's parameters as these settings give them, $names expanded."""
        myhostname = self.myhostname or socket.getfqdn()
        base = PostfixParams.for_host(
            myhostname, mydomain=self.mydomain, compatibility_level=self.compatibility_level
        )
        names = {"myhostname": myhostname, "mydomain": base.mydomain}
        try:
            myorigin = expand(self.myorigin, names).rstrip(".")
        except ValueError as error:
            raise ValueError(f"myorigin: {error}") from None
        names["myorigin"] = myorigin
        destinations = self.mydestination if self.mydestination is not None else self.local_domains
        if destinations is None:
            mydestination = base.mydestination
        else:
            try:
                items = [expand(item, names) for item in destinations]
            except ValueError as error:
                raise ValueError(f"mydestination: {error}") from None
            mydestination = tuple(word for item in items for word in item.replace(",", " ").split())
        return replace(
            base,
            myorigin=myorigin,
            mydestination=mydestination,
            inet_interfaces=tuple(str(address) for address in self.inet_interfaces),
            proxy_interfaces=tuple(str(address) for address in self.proxy_interfaces),
            inet_protocols=tuple(
                family
                for family in ("ipv4", "ipv6")
                if family in self.inet_protocols or "all" in self.inet_protocols
            ),
            append_at_myorigin=self.append_at_myorigin,
            append_dot_mydomain=(
                base.append_dot_mydomain
                if self.append_dot_mydomain is None
                else self.append_dot_mydomain
            ),
            swap_bangpath=self.swap_bangpath,
            allow_percent_hack=self.allow_percent_hack,
            smtputf8_enable=(
                base.smtputf8_enable if self.smtputf8_enable is None else self.smtputf8_enable
            ),
            recipient_delimiter=self.recipient_delimiter,
        )

    @model_validator(mode="after")
    def _unique_listeners(self) -> Settings:
        seen = [str(endpoint) for endpoint in self.listen]
        if len(seen) != len(set(seen)):
            raise ValueError("listen: the same endpoint is listed twice")
        metrics = self.metrics_listen
        if metrics is not None and metrics.port != 0 and str(metrics) in seen:
            raise ValueError("metrics_listen: the policy service already listens there")
        return self

    @model_validator(mode="after")
    def _senders_api_needs(self) -> Settings:
        if self.senders_api and self.senders_api_token_file is None:
            raise ValueError("senders_api: needs senders_api_token_file, the bearer token's file")
        if self.senders_api and self.metrics_listen is None:
            raise ValueError("senders_api: is served on metrics_listen, which is none")
        return self

    @model_validator(mode="after")
    def _limits_fit(self) -> Settings:
        if self.max_line_bytes > self.max_request_bytes:
            raise ValueError("max_line_bytes: larger than max_request_bytes")
        return self

    @model_validator(mode="after")
    def _accounts_needed(self) -> Settings:
        # Only some maps know which addresses are mailbox accounts (postfix-accounts.cf).
        if any(stores.store_class(spec.type).knows_accounts for spec in self.maps):
            return self
        if self.alias_logins != "allow":
            raise ValueError("alias_logins: needs a dms map, which lists the accounts")
        if self.ignore_external_targets:
            raise ValueError("ignore_external_targets: needs a dms map, which lists the accounts")
        return self


# Settings whose environment value is a list: comma-separated, or a JSON array.
_LIST_SETTINGS = {
    "allowed_clients",
    "listen",
    "maps",
    "login_addresses",
    "local_domains",
    "mydestination",
    "inet_interfaces",
    "proxy_interfaces",
    "inet_protocols",
    "scope_ports",
    "scope_contexts",
    "exempt_networks",
}


# Kubernetes puts these into every pod for a Service named "policyd" (service links): they are
# not settings, and must not stop the daemon from starting.
_SERVICE_LINK = re.compile(
    r"POLICYD_(SERVICE_HOST|SERVICE_PORT(_\w+)?|PORT(_\d+_(TCP|UDP|SCTP)(_PROTO|_PORT|_ADDR)?)?)"
)


def settings_from_environment(environ: Mapping[str, str]) -> dict[str, tuple[Any, str]]:
    """POLICYD_* variables as {setting: (value, variable name)}."""
    found: dict[str, tuple[Any, str]] = {}
    for variable, raw in environ.items():
        if not variable.startswith(ENV_PREFIX) or variable == ENV_PREFIX + "CONFIG":
            continue
        if _SERVICE_LINK.fullmatch(variable):
            continue
        name = variable[len(ENV_PREFIX) :].lower()
        value: Any = raw
        if name in _LIST_SETTINGS:
            text = raw.strip()
            # A JSON array; not "[::1]:10040,...", an IPv6 endpoint at the start of a list.
            if text.startswith("[") and text.endswith("]"):
                try:
                    value = json.loads(text)
                except json.JSONDecodeError as error:
                    raise ConfigError([f"{variable}: not a JSON list: {error.msg}"]) from None
            else:
                value = [item.strip() for item in text.split(",") if item.strip()]
        found[name] = (value, variable)
    return found


@dataclass(frozen=True)
class TomlFile:
    """A settings file: its path, its text (to find the line of a key) and its settings."""

    path: Path
    text: str
    settings: dict[str, Any]

    def line_of(self, location: Sequence[str | int]) -> int | None:
        """The line where the setting at ``location`` (a name, then list indexes and option
        names) is written, or None if it cannot be told. tomllib keeps no positions, so the
        text is searched: the setting's own line, then the last option name after it."""
        roots = _root_keys(self.text)
        name, rest = location[0], location[1:]
        own = [(number, header) for number, key, header in roots if key == name]
        if not own:
            return None
        start, header = own[0]
        lines = self.text.splitlines()
        end = next((number for number, _, _ in roots if number > start), len(lines) + 1)
        if rest and isinstance(rest[0], int):
            if header and rest[0] < len(own):  # [[maps]]: the index-th table of the array
                start = own[rest[0]][0]
                end = next((number for number, _, _ in roots if number > start), len(lines) + 1)
            elif not header:  # maps = [..., {...}]: the line where the index-th item starts
                items = _item_lines(lines, start)
                if rest[0] < len(items):
                    start = items[rest[0]]
                    end = items[rest[0] + 1] + 1 if rest[0] + 1 < len(items) else end
        options = [part for part in rest if isinstance(part, str)]
        if options:
            option = re.compile(rf"(?<![\w.\"'-])[\"']?{re.escape(options[-1])}[\"']?\s*=")
            for number in range(start, min(end, len(lines) + 1)):
                if option.search(lines[number - 1]):
                    return number
        return start


def _item_lines(lines: list[str], start: int) -> list[int]:
    """The line each item of the array assigned on line ``start`` begins on, following
    brackets, braces, strings and comments."""
    items: list[int] = []
    depth = 0
    for number in range(start, len(lines) + 1):
        line = lines[number - 1]
        position = line.index("=") + 1 if number == start and "=" in line else 0
        while position < len(line):
            char = line[position]
            if char == "#":
                break
            if char in "\"'":
                # A string on one line; its end is the next unescaped quote of its kind.
                close = position + 1
                while close < len(line) and line[close] != char:
                    close += 2 if char == '"' and line[close] == "\\" else 1
                if depth == 1:
                    items.append(number)
                position = close + 1
                continue
            if depth == 1 and char not in " \t,]":
                items.append(number)
            if char in "[{":
                depth += 1
            elif char in "]}":
                depth -= 1
                if depth == 0:
                    return items
            elif depth == 1 and char not in " \t,":
                # A bare value (a number, true): skip to the next separator.
                while position + 1 < len(line) and line[position + 1] not in " \t,]#":
                    position += 1
            position += 1
    return items


# A key at the top of a TOML file (`name = ...`, `"name" = ...`, `name.x = ...`) or a table
# header (`[name]`, `[[name]]`).
_ROOT_KEY = re.compile(r"""\s*["']?([A-Za-z0-9_-]+)["']?\s*(?:=|\.)""")
_HEADER = re.compile(r"""\s*\[\[?\s*["']?([A-Za-z0-9_-]+)""")


def _root_keys(text: str) -> list[tuple[int, str, bool]]:
    """(line, name, is a table header) of each top-level setting, in order."""
    found: list[tuple[int, str, bool]] = []
    in_table = False
    depth = 0  # brackets and braces still open: lines inside a value are not keys
    for number, line in enumerate(text.splitlines(), start=1):
        if depth == 0 and (header := _HEADER.match(line)):
            in_table = True
            found.append((number, header.group(1), True))
        elif depth == 0 and not in_table and (key := _ROOT_KEY.match(line)):
            found.append((number, key.group(1), False))
        if not (depth == 0 and header):
            code = _STRING_OR_COMMENT.sub("", line)
            depth = max(0, depth + code.count("[") + code.count("{"))
            depth = max(0, depth - code.count("]") - code.count("}"))
    return found


_STRING_OR_COMMENT = re.compile(r""""(?:[^"\\]|\\.)*"|'[^']*'|#.*""")


def read_toml(path: Path) -> TomlFile:
    """Read and parse a settings file; only a regular file (a FIFO or /dev/urandom named by
    mistake would otherwise block or fill the memory)."""
    try:
        text = read_regular(path).decode("utf-8")
    except OSError as error:
        raise ConfigError([f"{path}: cannot read: {error.strerror or error}"]) from None
    except LineTooLong as error:
        raise ConfigError([f"{path}:{error.line}: {error}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not UTF-8 text"]) from None
    try:
        return TomlFile(path, text, tomllib.loads(text))
    except tomllib.TOMLDecodeError as error:
        message = str(error)
        at = re.search(r"\(at line (\d+), column \d+\)", message)
        if at:
            message = message[: at.start()].strip()
            raise ConfigError([f"{path}:{at.group(1)}: {message}"]) from None
        raise ConfigError([f"{path}: {message}"]) from None


@dataclass(frozen=True)
class _Source:
    """Where a setting's value came from: the file, the variable or the flag to name."""

    file: TomlFile | None = None
    variable: str = ""
    flag: str = ""
    value: Any = None

    def name(self, setting: str, location: Sequence[str | int], message: str) -> str:
        """``policyd.toml:4: maps[0].path``, ``POLICYD_MAPS[0].path``, ``--map dms:/x``
        (the value only when ``message`` does not quote it already)."""
        path = _path(location[1:])
        if self.file is not None:
            line = self.file.line_of(location)
            where = f"{self.file.path}:{line}" if line else f"{self.file.path}"
            return f"{where}: {setting}{path}"
        if self.variable:
            return f"{self.variable}{path}"
        index = location[1] if len(location) > 1 else None
        if isinstance(index, int) and isinstance(self.value, list) and index < len(self.value):
            # The flag as typed, with the value of the one that is wrong among its repeats.
            item = self.value[index]
            if repr(item) in message:
                return f"{self.flag}{_path(location[2:])}"
            return f"{self.flag} {shlex.quote(str(item))}{_path(location[2:])}"
        return f"{self.flag}{path}"


def _path(parts: Sequence[str | int]) -> str:
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in parts)


def load_settings(
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
    flag_names: Mapping[str, str] | None = None,
) -> Settings:
    """Merge the sources and validate; raise ConfigError with ``where: what`` lines.

    ``flags`` are the command line's values by setting name (None: not given), and
    ``flag_names`` how the command line spells each one (``maps``: ``--map``); a setting
    missing there is named ``--name-with-dashes``.
    """
    environ = os.environ if environ is None else environ
    if config_file is None and environ.get(ENV_PREFIX + "CONFIG"):
        config_file = Path(environ[ENV_PREFIX + "CONFIG"])
    values: dict[str, Any] = {}
    sources: dict[str, _Source] = {}
    if config_file is not None:
        document = read_toml(config_file)
        for name, value in document.settings.items():
            values[name], sources[name] = value, _Source(file=document)
    for name, (value, variable) in settings_from_environment(environ).items():
        values[name], sources[name] = value, _Source(variable=variable)
    for name, value in (flags or {}).items():
        if value is not None:
            flag = (flag_names or {}).get(name, "--" + name.replace("_", "-"))
            values[name], sources[name] = value, _Source(flag=flag, value=value)
    try:
        return Settings.model_validate(values)
    except ValidationError as error:
        raise ConfigError([_describe(item, sources) for item in error.errors()]) from None


def _describe(error: Any, sources: dict[str, _Source]) -> str:
    message = error["msg"].removeprefix("Value error, ")
    if not error["loc"]:
        # A rule across settings; its message starts with the setting it is about.
        name, sep, rest = message.partition(": ")
        if sep and name in Settings.model_fields:
            return f"{_where(name, [name], sources, rest)}: {rest}"
        return f"settings: {message}"
    # pydantic's union-member tags (the "dms" of maps[0]) are not part of what the user wrote,
    # but they say which options the map has.
    location: list[str | int] = []
    options: type[BaseModel] = Settings
    for part in error["loc"]:
        if isinstance(part, str) and location and part in stores.backends():
            options = stores.store_class(part).Options
        else:
            location.append(part)
    if error["type"] == "missing" and len(location) > 1:
        where = _where(str(location[0]), location[:-1], sources, message)
        return f"{where}: {location[-1]} is required"
    where = _where(str(location[0]), location, sources, message)
    if error["type"] == "extra_forbidden":
        known = [name for name in options.model_fields if name != "type"]
        source = sources.get(str(location[0]))
        if len(location) == 1 and source is not None and source.variable:
            known = [ENV_PREFIX + name.upper() for name in known]
            return f"{where}: unknown setting{_did_you_mean(source.variable, known)}"
        return f"{where}: unknown setting{_did_you_mean(str(location[-1]), known)}"
    return f"{where}: {message}"


def _where(
    name: str, location: Sequence[str | int], sources: dict[str, _Source], message: str
) -> str:
    source = sources.get(name)
    if source is None:
        return f"{name}{_path(location[1:])}"
    return source.name(name, location, message)


def _did_you_mean(word: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""

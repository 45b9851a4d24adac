"""Settings: one pydantic model, filled from a TOML file, POLICYD_* variables and flags.

Later sources win: defaults < TOML file < environment < command-line flags. Every error is
reported as ``where: what`` (a file and line, a variable, a flag, or a setting name), never as
a traceback.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
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
        kind, _, rest = text.partition(":")
        if kind in ("unix", "local") and rest:
            return cls(kind="unix", path=rest)
        if kind == "inet":
            match = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:\[\]]*):(\d+)", rest)
            if match:
                host = match.group(1) or match.group(3) or ""
                port = int(match.group(2) or match.group(4))
                if port <= 65535:
                    return cls(kind="inet", host=host, port=port)
        raise ValueError(f"{text!r} is not inet:HOST:PORT or unix:PATH")


# The options of one map: the registered backends' Options models, told apart by ``type``.
if TYPE_CHECKING:
    MapOptions = StoreOptions
else:
    MapOptions = Annotated[Union[stores.options_models()], Field(discriminator="type")]  # noqa: UP007


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
    return value


_DEFER = re.compile(r"(4\d\d|DEFER|DEFER_IF_PERMIT|DEFER_IF_REJECT)(\s.*)?", re.IGNORECASE)


class Settings(Strict):
    """Every setting. The README's configuration reference documents each one."""

    listen: list[Endpoint] = Field(
        default_factory=lambda: [Endpoint.parse(e) for e in defaults.LISTEN], min_length=1
    )
    maps: list[MapOptions] = Field(default_factory=list, validate_default=True)
    login_addresses: list[MapOptions] = Field(default_factory=list)
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
    scope_ports: list[Annotated[int, Field(ge=0, le=65535)]] = Field(default_factory=list)
    scope_contexts: list[str] = Field(default_factory=list)
    exempt_networks: list[IPvAnyNetwork] = Field(default_factory=list)

    # The reverse direction (README "policyd senders", "The senders API", "policyd audit").
    senders_api: bool = False
    senders_api_token_file: Path | None = None
    senders_api_rate: float = Field(default=defaults.SENDERS_API_RATE, gt=0)
    senders_api_burst: int = Field(default=defaults.SENDERS_API_BURST, ge=1)
    audit_max_senders: int = Field(default=defaults.AUDIT_MAX_SENDERS, ge=1)

    @field_validator("listen", mode="before")
    @classmethod
    def _endpoints(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [Endpoint.parse(item) if isinstance(item, str) else item for item in value]
        return value

    @field_validator("metrics_listen", mode="before")
    @classmethod
    def _metrics_endpoint(cls, value: Any) -> Any:
        if value in ("", "none", None):
            return None  # metrics and health endpoints switched off
        return Endpoint.parse(value) if isinstance(value, str) else value

    @field_validator("maps", "login_addresses", mode="before")
    @classmethod
    def _maps(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [parse_map(item) for item in value]
        return value

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
            if text.startswith("["):
                try:
                    value = json.loads(text)
                except json.JSONDecodeError as error:
                    raise ConfigError([f"{variable}: not a JSON list: {error.msg}"]) from None
            else:
                value = [item.strip() for item in text.split(",") if item.strip()]
        found[name] = (value, variable)
    return found


def read_toml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError([f"{path}: cannot read: {error.strerror}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not UTF-8 text"]) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        message = str(error)
        at = re.search(r"\(at line (\d+), column \d+\)", message)
        if at:
            message = message[: at.start()].strip()
            raise ConfigError([f"{path}:{at.group(1)}: {message}"]) from None
        raise ConfigError([f"{path}: {message}"]) from None


def load_settings(
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Settings:
    """Merge the sources and validate; raise ConfigError with ``where: what`` lines."""
    environ = os.environ if environ is None else environ
    if config_file is None and environ.get(ENV_PREFIX + "CONFIG"):
        config_file = Path(environ[ENV_PREFIX + "CONFIG"])
    values: dict[str, Any] = {}
    where: dict[str, str] = {}
    if config_file is not None:
        for name, value in read_toml(config_file).items():
            values[name], where[name] = value, f"{config_file}: {name}"
    for name, (value, variable) in settings_from_environment(environ).items():
        values[name], where[name] = value, variable
    for name, value in (flags or {}).items():
        if value is not None:
            values[name], where[name] = value, "--" + name.replace("_", "-")
    try:
        return Settings.model_validate(values)
    except ValidationError as error:
        raise ConfigError([_describe(item, where) for item in error.errors()]) from None


def _describe(error: Any, where: dict[str, str]) -> str:
    location = [str(part) for part in error["loc"]]
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        origin = where.get(location[0], location[0])
        return f"{origin}: unknown setting"
    if not location:
        # A rule across settings; its message starts with the setting it is about.
        name, sep, rest = message.partition(": ")
        if sep and name in Settings.model_fields:
            return f"{where.get(name, name)}: {rest}"
        return f"settings: {message}"
    origin = where.get(location[0], location[0])
    # Drop pydantic's union-member tags (e.g. "dms") from the path; keep list indexes.
    detail = [part for part in location[1:] if part not in stores.backends()]
    suffix = "".join(f"[{part}]" if part.isdigit() else f".{part}" for part in detail)
    return f"{origin}{suffix}: {message}"

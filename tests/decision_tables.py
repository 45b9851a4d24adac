"""The decision tables, tests/data/decisions.tsv and rules.tsv, read into rows."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from typing import Any

from policyd.config import Settings
from tests.conftest import DATA


@dataclass(frozen=True)
class Row:
    case: str
    maps: str
    mode: str
    login: str
    sender: str
    verdict: str
    action: str
    reason: str


def read_table() -> list[Row]:
    with (DATA / "decisions.tsv").open(newline="") as handle:
        lines = [line for line in handle if line.strip() and not line.startswith("#")]
    return [Row(*fields) for fields in csv.reader(lines, delimiter="\t")]


@dataclass(frozen=True)
class RuleRow:
    case: str
    options: str
    login: str
    sender: str
    port: str
    context: str
    client: str
    verdict: str
    action: str
    reason: str
    rule: str


def read_rule_table() -> list[RuleRow]:
    with (DATA / "rules.tsv").open(newline="") as handle:
        lines = [line for line in handle if line.strip() and not line.startswith("#")]
    return [RuleRow(*fields) for fields in csv.reader(lines, delimiter="\t")]


def settings_for(options: str) -> Settings:
    """Settings from a rules.tsv options cell, e.g. "plus_addresses scope_ports=587,465"."""
    return Settings.model_validate(setting_values(options))


def setting_values(options: str) -> dict[str, Any]:
    """The settings a rules.tsv options cell names, as a TOML file would hold them."""
    values: dict[str, Any] = {"maps": [f"dms:{DATA / 'dms'}"], "reload_interval": 0}
    for option in options.split():
        name, _, value = option.partition("=")
        if name == "grants":
            values[name] = DATA / "rules" / "policyd-senders.cf"
        elif name == "deny":
            values[name] = DATA / "rules" / "policyd-deny.cf"
        elif name in ("scope_ports", "scope_contexts", "exempt_networks"):
            values[name] = value.split(",")
        elif name != "-":
            values[name] = value if value else True
    return values

"""deploy/prometheus and deploy/grafana: valid, and only about metrics policyd really exports."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest
from prometheus_client.exposition import generate_latest

from policyd.codec import PolicyRequest
from policyd.config import Settings
from policyd.service import Service
from tests.conftest import DATA, require_program
from tests.helpers import at_once

DEPLOY = Path(__file__).parent.parent / "deploy"
METRIC = re.compile(r"\b(policyd_[a-z_]+)\b")


async def exported_names() -> set[str]:
    """Every sample name in a live exposition, after requests of every kind."""
    service = Service.from_settings(Settings(maps=[f"dms:{DATA / 'dms'}"], reload_interval=0))
    await service.start()
    at_once(service, PolicyRequest(sender="a@x", sasl_username="b@x"))
    service.metrics.protocol_errors["line_too_long"] += 1
    text = generate_latest(service.metrics.exposition(service.statuses)).decode()
    await service.close()
    return {
        line.split("{")[0].split(" ")[0] for line in text.splitlines() if not line.startswith("#")
    }


async def promtool(*args: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        require_program("promtool"),
        *args,
        cwd=DEPLOY / "prometheus",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await process.communicate()
    assert process.returncode is not None
    return process.returncode, output.decode()


@pytest.mark.parametrize(
    "command",
    [
        ("check", "rules", "alerts.yml"),
        ("test", "rules", "alerts.test.yml"),
        ("check", "config", "prometheus.yml"),
    ],
)
async def test_promtool_accepts_the_prometheus_files(command: tuple[str, ...]) -> None:
    code, output = await promtool(*command)
    assert code == 0, output


def dashboard_expressions() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "policyd-dashboard.json").read_text())
    panels = dashboard["panels"]
    assert {
        "Verdicts",
        "Top reject reasons",
        "Request latency",
        "Connections",
        "Map freshness",
    } <= {panel["title"] for panel in panels}
    expressions = []
    for panel in panels:
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        expressions += [target["expr"] for target in panel["targets"]]
    return expressions


async def test_dashboard_and_alerts_only_name_exported_metrics() -> None:
    exported = await exported_names()
    texts = [*dashboard_expressions(), (DEPLOY / "prometheus" / "alerts.yml").read_text()]
    named = {name for text in texts for name in METRIC.findall(text)}
    assert named, "no policyd metric found in the dashboard or the alerts"
    assert named <= exported, f"not exported by policyd: {sorted(named - exported)}"

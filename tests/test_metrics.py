"""Metrics: what the requests move, and what the exposition looks like."""

from __future__ import annotations

import asyncio
import resource
import time
from pathlib import Path

import pytest
from prometheus_client.exposition import generate_latest

from policyd import __version__
from policyd.codec import PolicyRequest
from policyd.config import Settings
from policyd.engine import REASONS
from policyd.metrics import Histogram
from policyd.service import Service
from tests.conftest import DATA, require_program
from tests.helpers import at_once, settle


@pytest.fixture
async def service() -> Service:
    service = Service.from_settings(Settings(maps=[f"dms:{DATA / 'dms'}"], reload_interval=0))
    await service.start()
    return service


def sample(service: Service, name: str, **labels: str) -> float | None:
    registry = service.metrics.exposition(service.statuses)
    return registry.get_sample_value(name, labels)


async def test_requests_are_counted_by_verdict_and_reason(service: Service) -> None:
    forged = PolicyRequest(
        sender="user2@localhost.localdomain", sasl_username="added@localhost.localdomain"
    )
    owned = PolicyRequest(
        sender="alias1@localhost.localdomain", sasl_username="user1@localhost.localdomain"
    )
    for request in (forged, forged, owned, PolicyRequest()):
        at_once(service, request)
    m = service
    assert sample(m, "policyd_requests_total", verdict="reject", reason="not_owner") == 2
    assert sample(m, "policyd_requests_total", verdict="permit", reason="owner") == 1
    assert sample(m, "policyd_requests_total", verdict="dunno", reason="null_sender") == 1


async def test_store_lookups_and_state(service: Service) -> None:
    at_once(service, PolicyRequest(sender="a@x", sasl_username="b@x"))
    m = service
    store = f"dms:{DATA / 'dms'}"
    assert sample(m, "policyd_store_lookups_total", store=store) == 1
    assert sample(m, "policyd_store_errors_total", store=store) == 0
    assert sample(m, "policyd_store_lookup_duration_seconds_count", store=store) == 1
    assert sample(m, "policyd_store_entries", store=store) == 22
    assert sample(m, "policyd_store_ready", store=store) == 1
    assert sample(m, "policyd_store_reload_failures_total", store=store) == 0
    last = sample(m, "policyd_store_last_reload_timestamp_seconds", store=store)
    assert last is not None and last > 1_700_000_000


async def test_every_known_label_value_has_a_series_before_the_first_event(
    service: Service,
) -> None:
    """rate() and increase() alerts need a series to exist before anything happened."""
    for verdict, reasons in REASONS.items():
        for reason in reasons:
            labels = {"verdict": verdict, "reason": reason}
            assert sample(service, "policyd_requests_total", **labels) == 0, labels
    for kind in ("line_too_long", "request_too_long", "too_many_attributes", "malformed"):
        assert sample(service, "policyd_protocol_errors_total", kind=kind) == 0, kind
    assert sample(service, "policyd_protocol_errors_total", kind="request_timeout") == 0
    for reason in ("too_many", "too_many_from_client", "not_allowed"):
        assert sample(service, "policyd_connections_refused_total", reason=reason) == 0, reason


async def test_process_metrics(service: Service) -> None:
    assert (sample(service, "process_resident_memory_bytes") or 0) > 1_000_000
    assert (sample(service, "process_open_fds") or 0) >= 3
    assert sample(service, "process_max_fds") == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    start = sample(service, "process_start_time_seconds") or 0
    assert time.time() - 24 * 3600 < start <= time.time()  # this process's start, a Unix time
    assert sample(service, "process_cpu_seconds_total") is not None


def test_histogram_buckets_are_cumulative() -> None:
    histogram = Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 5.0):
        histogram.observe(value)
    assert histogram.buckets() == [("0.1", 2), ("1.0", 3), ("+Inf", 4)]
    assert histogram.total == pytest.approx(5.65)


async def test_no_label_carries_a_login_sender_or_address(service: Service) -> None:
    at_once(
        service,
        PolicyRequest(
            sender="secret-sender@example.org",
            sasl_username="secret-login@example.org",
            client_address="192.0.2.99",
        ),
    )
    text = generate_latest(service.metrics.exposition(service.statuses)).decode()
    assert "secret-" not in text
    assert "192.0.2.99" not in text


async def test_build_info(service: Service) -> None:
    text = generate_latest(service.metrics.exposition(service.statuses)).decode()
    assert 'policyd_build_info{python="' in text
    assert f'version="{__version__}"' in text


async def test_promtool_accepts_the_exposition(service: Service) -> None:
    promtool = require_program("promtool")
    at_once(service, PolicyRequest(sender="a@x", sasl_username="b@x"))
    check = await asyncio.create_subprocess_exec(
        promtool,
        "check",
        "metrics",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await check.communicate(
        generate_latest(service.metrics.exposition(service.statuses))
    )
    assert check.returncode == 0, output.decode()


async def test_wide_send_rights_are_gauged_per_store(tmp_path: Path) -> None:
    """An alert can fire when someone adds a rule that gives a login every address, or a
    whole domain; the gauges follow a reload."""
    pcre = tmp_path / "login.pcre"
    pcre.write_text("/^role@example\\.org$/ bob@example.org\n")
    grants = tmp_path / "grants"
    grants.write_text("relay@example.org @example.net\n")
    settings = Settings(
        maps=[f"dms:{DATA / 'dms'}", f"pcre:{pcre}"], grants=grants, reload_interval=0
    )
    service = Service.from_settings(settings)
    await service.start()
    rules = f"rules:{grants}"
    assert sample(service, "policyd_logins_sending_as_anyone", store=f"pcre:{pcre}") == 0
    assert sample(service, "policyd_rules_matching_whole_domain", store=f"pcre:{pcre}") == 0
    # tests/data/dms/postfix-virtual.cf has two catch-alls, @localdomain2.com and @otherdomain.tld
    dms = f"dms:{DATA / 'dms'}"
    assert sample(service, "policyd_rules_matching_whole_domain", store=dms) == 2
    assert sample(service, "policyd_logins_sending_as_anyone", store=rules) == 0
    assert sample(service, "policyd_rules_matching_whole_domain", store=rules) == 1

    pcre.write_text(
        "/^role@example\\.org$/ bob@example.org\n"
        "/@example\\.com$/ ann@example.org\n"
        "/./ relay@example.org, bot@example.org\n"
    )
    grants.write_text("relay@example.org @example.net\nrelay@example.org *\napp@example.org *\n")
    for path in (pcre, grants):
        settle(path)
    assert await service.reload()
    assert sample(service, "policyd_logins_sending_as_anyone", store=f"pcre:{pcre}") == 2
    assert sample(service, "policyd_rules_matching_whole_domain", store=f"pcre:{pcre}") == 2
    assert sample(service, "policyd_logins_sending_as_anyone", store=rules) == 2
    assert sample(service, "policyd_rules_matching_whole_domain", store=rules) == 3
    await service.close()

"""Prometheus metrics: counted in plain Python on the hot path, exported at scrape time.

Every value lives in an ordinary attribute (an int in a dict, a list of bucket counts) that the
event loop updates, and a custom collector turns them into metric families when Prometheus
scrapes. That costs a dict update per request instead of prometheus-client's locked values
(several hundred nanoseconds each), and scrapes run on the same loop, so there are no races.
No label ever carries a login, a sender or an address: labels are verdicts, reason words,
protocol error kinds and configured store names, all bounded.
"""

from __future__ import annotations

import bisect
import platform
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Literal, get_args

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from policyd import __version__
from policyd.codec import ProtocolError
from policyd.engine import REASONS
from policyd.stores.base import StoreStatus

Statuses = Callable[[], Iterable[StoreStatus]]

# Request latency, from a complete request to its reply being written. In-memory decisions
# take tens of microseconds; a network store may take milliseconds.
REQUEST_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0)
LOOKUP_BUCKETS = (0.00001, 0.00005, 0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.25, 1.0)

# Every value the labelled counters can take, exported at 0 from the start: rate() and an
# alert on increase() need a series before the first event. The kinds of the codec's errors,
# and the server's own ("request_timeout"); the reasons server.refusal() gives.
_protocol_errors: list[type[ProtocolError]] = [ProtocolError, *ProtocolError.__subclasses__()]
PROTOCOL_ERROR_KINDS = (
    *dict.fromkeys(error.kind for error in _protocol_errors),
    "request_timeout",
)
RefusalReason = Literal["too_many", "too_many_from_client", "not_allowed"]
REFUSAL_REASONS: tuple[RefusalReason, ...] = get_args(RefusalReason)


class Histogram:
    """Bucket counts and a sum, without locks: only the event loop thread observes."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative (le, count) pairs, as Prometheus wants them."""
        cumulative = 0
        result: list[tuple[str, float]] = []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            cumulative += count
            result.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        return result


class StoreStats:
    """Lookups, errors and lookup latency of one store."""

    def __init__(self) -> None:
        self.lookups = 0
        self.errors = 0
        self.pattern_timeouts = 0
        self.latency = Histogram(LOOKUP_BUCKETS)


class Metrics:
    """Everything policyd counts. The server, service and stores update it; scrapes read it
    through ``exposition()``."""

    def __init__(self) -> None:
        self.requests: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.requests.update(
            dict.fromkeys(((v, r) for v, reasons in REASONS.items() for r in reasons), 0)
        )
        self.latency = Histogram(REQUEST_BUCKETS)
        self.connections_total = 0
        self.connections_refused: defaultdict[str, int] = defaultdict(int)
        self.connections_refused.update(dict.fromkeys(REFUSAL_REASONS, 0))
        self.protocol_errors: defaultdict[str, int] = defaultdict(int)
        self.protocol_errors.update(dict.fromkeys(PROTOCOL_ERROR_KINDS, 0))
        self.stores: dict[str, StoreStats] = {}
        self.started = time.time()

    def exposition(
        self, statuses: Statuses = list, connections: Callable[[], int] = lambda: 0
    ) -> CollectorRegistry:
        """A registry for /metrics: these counts, what ``statuses`` (the stores') and
        ``connections`` (the open policy connections) say at scrape time, and the process's
        memory, descriptors, CPU time and start time (prometheus-client's process_* metrics,
        read from /proc at scrape time)."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(self, statuses, connections))
        ProcessCollector(registry=registry)
        return registry

    def store(self, name: str) -> StoreStats:
        """The stats of the store called ``name``, created on first use."""
        stats = self.stores.get(name)
        if stats is None:
            stats = self.stores[name] = StoreStats()
        return stats


class _Collector(Collector):
    def __init__(
        self, metrics: Metrics, statuses: Statuses, connections: Callable[[], int]
    ) -> None:
        self.metrics = metrics
        self.statuses = statuses
        self.connections = connections

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        info = InfoMetricFamily("policyd_build", "policyd version and Python it runs on")
        info.add_metric([], {"version": __version__, "python": platform.python_version()})
        yield info
        start = GaugeMetricFamily(
            "policyd_start_time_seconds", "Unix time the daemon started", value=m.started
        )
        yield start

        yield _counter(
            "policyd_requests",
            "Policy requests answered, by verdict and by the reason word of the decision",
            ["verdict", "reason"],
            [([verdict, reason], count) for (verdict, reason), count in sorted(m.requests.items())],
        )
        yield _histogram(
            "policyd_request_duration_seconds",
            "Time from a complete request to its reply",
            [],
            [([], m.latency)],
        )

        yield GaugeMetricFamily(
            "policyd_connections_active", "Open policy connections", value=self.connections()
        )
        yield CounterMetricFamily(
            "policyd_connections", "Policy connections accepted", value=m.connections_total
        )
        yield _counter(
            "policyd_connections_refused",
            "Connections closed at once: over max_connections, or not in allowed_clients",
            ["reason"],
            [([reason], count) for reason, count in sorted(m.connections_refused.items())],
        )
        yield _counter(
            "policyd_protocol_errors",
            "Connections dropped for breaking the policy protocol, by kind",
            ["kind"],
            [([kind], count) for kind, count in sorted(m.protocol_errors.items())],
        )

        yield from self._stores()

    def _stores(self) -> Iterator[Metric]:
        m = self.metrics
        lookups = CounterMetricFamily(
            "policyd_store_lookups", "Lookups asked of each store", labels=["store"]
        )
        errors = CounterMetricFamily(
            "policyd_store_errors", "Lookups a store could not answer", labels=["store"]
        )
        timeouts = CounterMetricFamily(
            "policyd_pattern_timeouts",
            "Pattern matches cut off by pattern_time_limit (answered with a temporary failure)",
            labels=["store"],
        )
        for name, stats in sorted(m.stores.items()):
            lookups.add_metric([name], stats.lookups)
            errors.add_metric([name], stats.errors)
            timeouts.add_metric([name], stats.pattern_timeouts)
        yield lookups
        yield errors
        yield timeouts
        yield _histogram(
            "policyd_store_lookup_duration_seconds",
            "Time one store lookup took",
            ["store"],
            [([name], stats.latency) for name, stats in sorted(m.stores.items())],
        )

        entries = GaugeMetricFamily(
            "policyd_store_entries", "Entries in each loaded map or rules file", labels=["store"]
        )
        ready = GaugeMetricFamily(
            "policyd_store_ready",
            "1 if the store has loaded data it can answer from",
            labels=["store"],
        )
        reloaded = GaugeMetricFamily(
            "policyd_store_last_reload_timestamp_seconds",
            "Unix time of the last successful load of each store's files",
            labels=["store"],
        )
        failures = CounterMetricFamily(
            "policyd_store_reload_failures",
            "Reloads that failed (the last good data stayed in use)",
            labels=["store"],
        )
        warned = GaugeMetricFamily(
            "policyd_store_warnings",
            "Problems in the data in use that do not stop it loading (a duplicate key, ...)",
            labels=["store"],
        )
        stale = CounterMetricFamily(
            "policyd_store_stale_answers",
            "Answers a network store gave from memory because its server failed (stale_ttl)",
            labels=["store"],
        )
        anyone = GaugeMetricFamily(
            "policyd_logins_sending_as_anyone",
            "Logins a store lets send as any address: a grant of *, a pattern matching all",
            labels=["store"],
        )
        domains = GaugeMetricFamily(
            "policyd_rules_matching_whole_domain",
            "Keys and rules that answer every address at a domain (@domain keys, catch-alls,"
            " grants of @domain, patterns), or every address",
            labels=["store"],
        )
        for status in self.statuses():
            anyone.add_metric([status.name], status.anyone)
            domains.add_metric([status.name], status.domain_rules)
            entries.add_metric([status.name], status.entries)
            ready.add_metric([status.name], 1 if status.ready else 0)
            if status.last_load is not None:
                reloaded.add_metric([status.name], status.last_load)
            failures.add_metric([status.name], status.load_failures)
            stale.add_metric([status.name], status.stale_answers)
            warned.add_metric([status.name], len(status.warnings))
        yield entries
        yield ready
        yield reloaded
        yield failures
        yield stale
        yield warned
        yield anyone
        yield domains


def _counter(
    name: str, documentation: str, labels: list[str], series: list[tuple[list[str], float]]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=labels)
    for values, count in series:
        family.add_metric(values, count)
    return family


def _histogram(
    name: str, documentation: str, labels: list[str], series: list[tuple[list[str], Histogram]]
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=labels)
    for values, histogram in series:
        family.add_metric(values, histogram.buckets(), sum_value=histogram.total)
    return family

"""policyd's own cost per request, without sockets or a load generator.

Feeds the requests of the benchmark's workload straight into one connection's
``data_received`` (a transport that discards replies), after one pass that warms the
remembered decisions and checks every reply, and prints the best of several passes in
microseconds per request. What the live benchmark adds on top is the event loop and the
socket calls, which the floor pays too.

    python bench/hotpath.py --data /tmp/policyd-bench/dms-1m
    python bench/hotpath.py --data /tmp/policyd-bench/dms-1m --log-decisions none
    python bench/hotpath.py --data /tmp/policyd-bench/dms-1m --setting decision_cache_size=0
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import TextIO

from load import make_workload

from policyd.config import Settings
from policyd.logs import Logging
from policyd.server import PolicyConnection, PolicyServer
from policyd.service import Service


class DiscardingTransport(asyncio.Transport):
    """Just enough of a transport for PolicyConnection: replies go nowhere, or to ``kept``."""

    def __init__(self) -> None:
        super().__init__()
        self.kept: list[bytes] | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.kept is not None:
            self.kept.append(bytes(data))

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 10025) if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def is_reading(self) -> bool:
        return True  # nothing is ever left unanswered, so the connection never pauses

    def is_closing(self) -> bool:
        return False  # the client never goes away

    def get_write_buffer_size(self) -> int:
        return 0


async def measure(
    data: Path,
    log_decisions: str,
    passes: int,
    log: TextIO,
    *,
    extra: dict[str, str],
    size: int,
) -> float:
    workload = make_workload("dms", data, size)
    logging = Logging("info", "logfmt")
    logging.writer.stream = log
    settings = Settings.model_validate(
        {"maps": [f"dms:{data}"], "reload_interval": 0, "log_decisions": log_decisions, **extra}
    )
    service = Service.from_settings(settings, decision_log=logging.log_decision)
    await service.start()
    connection = PolicyConnection(PolicyServer(service, settings))
    transport = DiscardingTransport()
    connection.connection_made(transport)
    transport.kept = []
    for request in workload.requests:  # warm (remembered decisions), and check the replies
        connection.data_received(request)
    if transport.kept != workload.expected:
        raise SystemExit("wrong replies: policyd disagrees with the benchmark's model")
    transport.kept = None
    best = float("inf")
    for _ in range(passes):
        started = time.perf_counter()
        for request in workload.requests:
            connection.data_received(request)
        best = min(best, (time.perf_counter() - started) / len(workload.requests))
    connection.connection_lost(None)
    await service.close()
    logging.stop()
    return best * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--data", type=Path, required=True, help="a bench/gen_data.py directory")
    parser.add_argument("--log-decisions", default="rejects", help="rejects (default), all, none")
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--requests", type=int, default=60_000, help="distinct requests")
    parser.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="another policyd setting, e.g. decision_cache_size=0 (every decision made anew)",
    )
    args = parser.parse_args()
    extra = dict(item.split("=", 1) for item in args.setting)
    with Path(os.devnull).open("w") as devnull:  # the decision log, written but not kept
        microseconds = asyncio.run(
            measure(
                args.data, args.log_decisions, args.passes, devnull, extra=extra, size=args.requests
            )
        )
    print(f"{microseconds:.2f} us per request (best of {args.passes} passes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What the reverse index of `policyd senders` costs for a big map: memory, and reload time.

Loads a docker-mailserver directory the way the daemon does (parsed in a process of its own,
handed over through a file), once without the reverse index and once with it, each in a fresh
process, and reports: the daemon's RSS with the map loaded (at rest, after a collection), the
index's own bytes, the time of the load, the parsing process's peak, and how long one listing
takes for a login of the map.

    python bench/gen_data.py --preset 1m --out /tmp/policyd-bench/dms-1m
    python bench/senders_index.py --data /tmp/policyd-bench/dms-1m --runs 3

With ``--daemon CHECKOUT ...`` it runs `policyd serve` from each checkout instead (this one and,
say, one from before the index), reloads it with SIGHUP ``--runs`` times without load, and
reports its RSS at rest, its peak while reading the new map, the peak of the daemon and its
parsing process together, and how long each reload took:

    python bench/senders_index.py --daemon /path/to/main . --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import json
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from policyd.config import Settings
from policyd.engine import Policy
from policyd.senders import list_senders
from policyd.service import Service
from policyd.stores import parsing
from policyd.stores.base import StoreContext
from policyd.stores.dms import DmsStore, load_dms


def memory_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(field)


def status_kb(pid: int, field: str = "VmRSS") -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def children_of(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def daemon_reloads(checkout: Path, data: Path, runs: int) -> list[dict[str, float]]:
    """`policyd serve` from ``checkout`` on the map, reloaded ``runs`` times by SIGHUP."""
    socket = Path(f"/tmp/policyd-senders-index-{os.getpid()}.sock")
    environment = dict(os.environ, POLICYD_METRICS_LISTEN="none")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "policyd", "serve", f"--listen=unix:{socket}", f"--map=dms:{data}"],
        cwd=checkout,  # python -m runs the checkout's policyd, and so does its parser
        env=environment,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert daemon.stderr is not None
    stderr = daemon.stderr

    def wait_for(pattern: str) -> None:
        for line in stderr:
            if re.search(pattern, line):
                return
        raise RuntimeError("the daemon ended")

    results = []
    try:
        wait_for(r"msg=ready")
        for _ in range(runs):
            rest = status_kb(daemon.pid)
            reloaded = threading.Thread(target=wait_for, args=(r"msg=\"?reloaded",))
            reloaded.start()
            started = time.monotonic()
            daemon.send_signal(signal.SIGHUP)
            main_peak = together = 0
            while reloaded.is_alive():
                main = status_kb(daemon.pid)
                main_peak = max(main_peak, main)
                together = max(together, main + sum(map(status_kb, children_of(daemon.pid))))
                time.sleep(0.01)  # a sampling interval, not a synchronisation
            results.append(
                {
                    "rest_mib": rest / 1024,
                    "main_peak_mib": main_peak / 1024,
                    "together_peak_mib": together / 1024,
                    "reload_s": time.monotonic() - started,
                }
            )
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
    return results


def daemon_report(checkouts: list[Path], data: Path, runs: int) -> str:
    rows = [
        "| checkout | RSS at rest (MiB) | peak reading a new map (MiB) | daemon + parser peak (MiB)"
        " | reload (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    for checkout in checkouts:
        found = daemon_reloads(checkout, data, runs)

        def med(key: str, found: list[dict[str, float]] = found) -> float:
            return statistics.median(run[key] for run in found)

        reloads = ", ".join(f"{run['reload_s']:.1f}" for run in found)
        rows.append(
            f"| {checkout} | {med('rest_mib'):.0f} | {med('main_peak_mib'):.0f}"
            f" | {med('together_peak_mib'):.0f} | {reloads} |"
        )
    return "\n".join(rows)


def measure(data: Path, reverse: bool) -> dict[str, Any]:
    """In this (fresh) process: load the map as the daemon reloads it, then measure."""
    gc.collect()
    before = memory_kb("VmRSS")
    started = time.perf_counter()
    loaded = asyncio.run(
        parsing.build(functools.partial(load_dms, data, False, reverse), f"dms:{data}")
    )
    seconds = time.perf_counter() - started
    gc.collect()
    rss = memory_kb("VmRSS")
    virtual = loaded.snapshot.virtual
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    result: dict[str, Any] = {
        "reverse": reverse,
        "load_s": seconds,
        "rss_before_kb": before,
        "rss_kb": rss,
        "parser_peak_kb": children.ru_maxrss,
        "parser_cpu_s": children.ru_utime + children.ru_stime,
        "virtual_bytes": virtual.nbytes(),
        "accounts_bytes": loaded.snapshot.accounts.nbytes(),
        "index_bytes": virtual.reverse.nbytes() if virtual.reverse is not None else 0,
        "owners": virtual.reverse.owners() if virtual.reverse is not None else 0,
    }
    if not reverse:
        # The index alone, built here as the parsing process builds it (CPU seconds).
        started = time.process_time()
        virtual.indexed()
        result["index_build_cpu_s"] = time.process_time() - started
    if reverse:
        # One listing, for the login that owns the most aliases and for a typical one.
        store = DmsStore(data, StoreContext(reload_interval=0))
        store.load_now()  # a second copy, after the measurement: a store of its own
        service = Service(Policy.from_settings(Settings(maps=[f"dms:{data}"])), [store])
        reverse_index = virtual.reverse
        assert reverse_index is not None
        counts = sorted(reverse_index.counts(), key=lambda item: item[1])
        for name, (login, owned, _) in (
            ("busiest", counts[-1]),
            ("median", counts[len(counts) // 2]),
        ):
            started = time.perf_counter()
            listing = asyncio.run(list_senders(service, login))
            result[f"listing_{name}_s"] = time.perf_counter() - started
            result[f"listing_{name}_aliases"] = owned
            result[f"listing_{name}_exact"] = len(listing.exact)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("/tmp/policyd-bench/dms-1m"))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--child", choices=["with", "without"], help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="write every run's numbers here")
    parser.add_argument("--daemon", type=Path, nargs="+", metavar="CHECKOUT", help="see above")
    options = parser.parse_args()
    if options.daemon:
        print(daemon_report(options.daemon, options.data, options.runs))
        return 0
    if options.child:
        print(json.dumps(measure(options.data, options.child == "with")))
        return 0
    runs: dict[str, list[dict[str, Any]]] = {"without": [], "with": []}
    for _ in range(options.runs):
        for kind in ("without", "with"):  # interleaved: the machine's noise hits both
            output = subprocess.run(
                [sys.executable, __file__, "--data", str(options.data), "--child", kind],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            runs[kind].append(json.loads(output.splitlines()[-1]))
    if options.json:
        options.json.write_text(json.dumps(runs, indent=2))
    print(report(runs))
    return 0


def report(runs: dict[str, list[dict[str, Any]]]) -> str:
    def med(kind: str, key: str) -> float:
        return statistics.median(run[key] for run in runs[kind])

    mib = 1 / 1024
    without_rss, with_rss = med("without", "rss_kb") * mib, med("with", "rss_kb") * mib
    index = med("with", "index_bytes") / 2**20
    load_without, load_with = med("without", "load_s"), med("with", "load_s")
    rows = [
        "| | without the index | with it | change |",
        "|---|---:|---:|---:|",
        f"| RSS with the map loaded (MiB) | {without_rss:.0f} | {with_rss:.0f}"
        f" | +{with_rss - without_rss:.0f} MiB (+{100 * (with_rss / without_rss - 1):.0f} %) |",
        f"| the index's own buffers (MiB) | | {index:.1f} | |",
        f"| the map's buffers (MiB) | {med('without', 'virtual_bytes') / 2**20:.1f} + "
        f"{med('without', 'accounts_bytes') / 2**20:.1f} | | |",
        f"| parsing process peak (MiB) | {med('without', 'parser_peak_kb') * mib:.0f}"
        f" | {med('with', 'parser_peak_kb') * mib:.0f} | |",
        f"| load, parse to snapshot in use (s) | {load_without:.2f} | {load_with:.2f}"
        f" | {load_with - load_without:+.2f} s |",
        f"| the parsing process's CPU time (s) | {med('without', 'parser_cpu_s'):.2f}"
        f" | {med('with', 'parser_cpu_s'):.2f}"
        f" | {med('with', 'parser_cpu_s') - med('without', 'parser_cpu_s'):+.2f} s |",
        f"| building the index alone (CPU s) | | {med('without', 'index_build_cpu_s'):.2f} | |",
    ]
    for name in ("busiest", "median"):
        rows.append(
            f"| `senders` for the {name} login ({int(med('with', f'listing_{name}_aliases'))}"
            f" aliases, {int(med('with', f'listing_{name}_exact'))} listed) (s) | |"
            f" {med('with', f'listing_{name}_s'):.3f} | |"
        )
    runs_note = f"Medians of {len(runs['with'])} runs each, interleaved; owners indexed:"
    return "\n".join([*rows, "", f"{runs_note} {int(med('with', 'owners'))}."])


if __name__ == "__main__":
    sys.exit(main())

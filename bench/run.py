"""Run issue 5's benchmark: policyd against the floor and postfwd2; print rows for BENCHMARKS.md.

Every server is started here, on loopback, and stopped afterwards. For each run and each server
the load generator (bench/loadgen.c, built here with cc; load.py writes its workload) drives it
with N persistent connections for a fixed time and checks every reply. Then it measures
policyd's startup with the 1M map, a full reload of the 1M map while serving, and, with
--profile, where policyd spends its time (py-spy).

    python bench/run.py                 # the full benchmark: about 8 minutes on a quiet machine
    python bench/run.py --smoke         # CI: small data, a few seconds, checks replies only
    python bench/run.py --calibrate     # does the load generator outrun the floor?
    python bench/run.py --profile /tmp/policyd-profile

Exit status: 0 when every reply was correct, 1 otherwise. Timings never fail a run.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import grp
import json
import os
import platform
import pwd
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gen_data
from load import (
    LoadResult,
    LoadRun,
    Workload,
    ask,
    build_loadgen,
    dms_workload,
    equal_workload,
    load_model,
    memory_kb,
    parse_target,
    percentile_ms,
    process_tree,
    pss_kb,
)

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
POSTFWD = shutil.which("postfwd2") or (
    "/usr/sbin/postfwd2" if Path("/usr/sbin/postfwd2").exists() else None
)
LISTENING = re.compile(r"listening on ((?:inet|unix):[^\s\",]+)")
RELOADED = re.compile(r"reloaded (\S+): (\d+) entries")
# policyd settings for every benchmark run, as POLICYD_* variables. The metrics endpoint stays on
# (its cost is part of policyd) but on a port the kernel picks, so runs never collide.
DEFAULT_SETTINGS = ("metrics_listen=inet:127.0.0.1:0",)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# Waiting: always by polling an observable state, with a deadline


def poll(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.005) -> Any:
    """Call ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:g} s")
        time.sleep(interval)


def read_from(path: Path, offset: int) -> str:
    try:
        with path.open("rb") as file:
            file.seek(offset)
            return file.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def free_port() -> int:
    """For servers that cannot be told to use port 0: bind 0, close, start the server at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# Servers


@dataclass
class Server:
    name: str
    target: str  # inet:HOST:PORT or unix:PATH, as the load generator takes it
    pid: int  # the process whose tree is the server
    log: Path
    startup: float  # seconds from exec to the first correct reply
    stop: Callable[[], None]
    process: subprocess.Popen[bytes] | None = None
    children: ChildWatch | None = None

    def pids(self) -> list[int]:
        return process_tree(self.pid)

    def memory(self) -> dict[str, int | None]:
        """Peak RSS of the server's processes together; PSS of the tree.

        policyd parses big maps in a short-lived child process. ``peak_rss_kb`` is the most
        that was resident at once: the main process's VmHWM (exact), or the largest sum of the
        main process's and its children's VmRSS sampled while a child lived, if larger.
        ``peak_rss_bound_kb`` adds the two peaks as if they had happened at the same moment.
        """
        pids = self.pids()
        main = memory_kb(self.pid, "VmHWM")
        watch = self.children
        child = watch.peak_kb() if watch else 0
        together = watch.together_kb if watch else 0
        return {
            "peak_rss_kb": max(main or 0, together) if main is not None else None,
            "peak_rss_bound_kb": (main or 0) + child if main is not None else None,
            "main_peak_rss_kb": main,
            "child_peak_rss_kb": child,
            "rss_kb": memory_kb(self.pid, "VmRSS"),
            "tree_pss_kb": sum(pss_kb(pid) or 0 for pid in pids),
            "processes": len(pids),
        }


class ChildWatch(threading.Thread):
    """Watches the child processes of ``pid`` while they live: each one's peak RSS (VmHWM),
    and the largest total RSS of ``pid`` and its children at one moment.

    A child's VmHWM disappears with it, so it is read every 20 ms; /proc/PID/task/*/children
    keeps this cheap (no scan of /proc).
    """

    def __init__(self, pid: int) -> None:
        super().__init__(name=f"watch children of {pid}", daemon=True)
        self.pid = pid
        self.peaks: dict[int, int] = {}
        self.together_kb = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.02):
            children = _children(self.pid)
            if not children:
                continue
            total = memory_kb(self.pid, "VmRSS") or 0
            for child in children:
                total += memory_kb(child, "VmRSS") or 0
                peak = memory_kb(child, "VmHWM")
                if peak is not None:
                    self.peaks[child] = max(peak, self.peaks.get(child, 0))
            self.together_kb = max(self.together_kb, total)

    def peak_kb(self) -> int:
        """The largest peak of one child (policyd runs one at a time)."""
        return max(self.peaks.values(), default=0)


def _children(pid: int) -> list[int]:
    found = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                found += [
                    int(p) for p in Path(f"/proc/{pid}/task/{task}/children").read_text().split()
                ]
    return found


def _python_server(
    name: str,
    argv: list[str],
    work: Path,
    probe: tuple[bytes, bytes],
    *,
    env: dict[str, str] | None = None,
    timeout: float = 300.0,
) -> Server:
    """Start a Python server that logs "listening on ENDPOINT"; ready once it answers correctly."""
    log_path = work / f"{name}.log"
    log_file = log_path.open("wb")
    started = time.monotonic()
    process = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    log_file.close()
    children = ChildWatch(process.pid)
    children.start()

    def stop() -> None:
        children.stopped.set()
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    try:
        target, startup = _ready(
            name, process, log_path=log_path, probe=probe, started=started, timeout=timeout
        )
    except BaseException:
        stop()  # never leave a half-started server behind
        raise
    return Server(name, target, process.pid, log_path, startup, stop, process, children)


def _ready(
    name: str,
    process: subprocess.Popen[bytes],
    *,
    log_path: Path,
    probe: tuple[bytes, bytes],
    started: float,
    timeout: float,
) -> tuple[str, float]:

    def listening() -> str | None:
        if process.poll() is not None:
            raise RuntimeError(
                f"{name} exited with {process.returncode}:\n{read_from(log_path, 0)}"
            )
        found = LISTENING.search(read_from(log_path, 0))
        return found.group(1) if found else None

    target = poll(listening, timeout, f"{name} listening", interval=0.002)

    def answers() -> bytes | None:
        # The socket may be bound (and logged) before the server accepts: retry until it does.
        try:
            return ask(parse_target(target), probe[0])
        except (ConnectionRefusedError, FileNotFoundError):
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited:\n{read_from(log_path, 0)}") from None
            return None

    reply = poll(answers, timeout, f"{name} answering", interval=0.002)
    if reply != probe[1]:
        raise RuntimeError(f"{name}: probe answered {reply!r}, expected {probe[1]!r}")
    return target, time.monotonic() - started


def _listen(work: Path, name: str, transport: str) -> str:
    return f"unix:{work / (name + '.sock')}" if transport == "unix" else "inet:127.0.0.1:0"


def start_floor(
    work: Path, transport: str, probe: tuple[bytes, bytes], protocol: str = "buffered"
) -> Server:
    argv = [sys.executable, str(BENCH / "floor.py"), "--listen", _listen(work, "floor", transport)]
    argv += ["--protocol", protocol]
    return _python_server("floor", argv, work, (probe[0], b"action=DUNNO\n\n"))


def _variable(setting: str) -> str:
    """``name=value`` -> ``POLICYD_NAME=value``."""
    name, _, value = setting.partition("=")
    return f"POLICYD_{name.upper()}={value}"


def policyd_env(settings: list[str]) -> dict[str, str]:
    """The environment without any POLICYD_* of the caller, plus the benchmark's settings."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("POLICYD_")}
    env["PYTHONPATH"] = str(REPO)  # the checkout under test, installed or not
    for setting in settings:
        name, _, value = _variable(setting).partition("=")
        env[name] = value
    return env


def policyd_argv(data: Path, listen: str) -> list[str]:
    return [sys.executable, "-m", "policyd", "serve", "--listen", listen, "--map", f"dms:{data}"]


def start_policyd(
    work: Path, data: Path, transport: str, settings: list[str], probe: tuple[bytes, bytes]
) -> Server:
    argv = policyd_argv(data, _listen(work, "policyd", transport))
    return _python_server("policyd", argv, work, probe, env=policyd_env(settings))


def start_policyd_settings(
    work: Path, name: str, settings: list[str], probe: tuple[bytes, bytes]
) -> Server:
    """policyd configured by ``settings`` alone (``maps=...`` included), on a TCP port the
    kernel picks."""
    argv = [sys.executable, "-m", "policyd", "serve", "--listen", "inet:127.0.0.1:0"]
    return _python_server(name, argv, work, probe, env=policyd_env(settings))


def start_postfwd(
    work: Path, connections: int, cache: int, transport: str, probe: tuple[bytes, bytes]
) -> Server:
    """postfwd2 in its prefork personality, one child per connection (each holds one for good).

    Logging is off (--perfmon: "no logging at all ... for performance testing"), which favours
    postfwd2: policyd logs every refusal. --cache 0 turns the request cache off.
    """
    if POSTFWD is None:
        raise RuntimeError("postfwd2 is not installed (Debian package postfwd)")
    run = work / f"postfwd-{cache}"
    run.mkdir(exist_ok=True)
    pidfile = run / "master.pid"
    pidfile.unlink(missing_ok=True)
    if transport == "unix":
        listen = ["--proto", "unix", "--port", str(run / "policy.sock")]
        target = f"unix:{run / 'policy.sock'}"
    else:
        port = free_port()
        listen = ["--proto", "tcp", "--interface", "127.0.0.1", "--port", str(port)]
        target = f"inet:127.0.0.1:{port}"
    children = connections + 5  # a child serves one connection at a time, for as long as it lasts
    settings = {
        "--file": str(BENCH / "postfwd.cf"),
        "--pidfile": str(pidfile),
        "--cache_socket": f"unix::{run / 'cache.sock'}",
        # Stay the user we are: no privilege change, so every file here stays usable.
        "--user": pwd.getpwuid(os.getuid()).pw_name,
        "--group": grp.getgrgid(os.getgid()).gr_name,
        # Net::Server::PreFork wants min_spare < max_spare < max_servers.
        "--min_servers": str(children),
        "--max_servers": str(children + 5),
        "--min_spare_servers": "1",
        "--max_spare_servers": str(children + 4),
        "--cache": str(cache),
    }
    argv = [POSTFWD, "--daemon", *listen, *(x for item in settings.items() for x in item)]
    argv.append("--perfmon")
    log_path = work / f"postfwd-{cache}.log"
    started = time.monotonic()
    with log_path.open("wb") as log_file:
        subprocess.run(argv, stdout=log_file, stderr=subprocess.STDOUT, check=True, timeout=60)

    def master() -> int | None:
        text = pidfile.read_text().strip() if pidfile.exists() else ""
        return int(text) if text.isdigit() else None

    pid = poll(master, 30, "postfwd2 pidfile")

    def stop() -> None:
        pids = process_tree(pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)  # the master signals its whole process group
        poll(lambda: not any(_alive(p) for p in pids), 30, "postfwd2 exit", interval=0.02)
        _reap(pids)

    def all_children() -> bool:
        names = [_cmdline(p) for p in process_tree(pid)]
        return sum("policy::child" in n for n in names) >= children

    try:
        poll(all_children, 120, f"postfwd2 with {children} children", interval=0.02)
        reply = ask(parse_target(target), probe[0])
        if reply != probe[1]:
            raise RuntimeError(f"postfwd2: probe answered {reply!r}, expected {probe[1]!r}")
    except BaseException:
        stop()
        raise
    startup = time.monotonic() - started
    return Server(f"postfwd2-cache{cache}", target, pid, log_path, startup, stop)


def become_subreaper() -> None:
    """postfwd2 daemonizes: its processes would be orphans, and zombies if init does not reap.

    As a child subreaper (prctl PR_SET_CHILD_SUBREAPER, Linux) the orphans become our children
    and _reap() collects exactly those.
    """
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def _reap(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    """Running and not a zombie (an exited child nobody has reaped yet holds nothing)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@contextlib.contextmanager
def running(starter: Callable[[], Server]) -> Iterator[Server]:
    server = starter()
    try:
        yield server
    finally:
        server.stop()


# The machine


def cpu_busy() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def other_load(seconds: float = 0.5) -> float:
    """Cores busy over a short interval (nothing of ours runs while this is measured)."""
    busy0, total0 = cpu_busy()
    time.sleep(seconds)
    busy1, total1 = cpu_busy()
    return (busy1 - busy0) / max(1, total1 - total0) * (os.cpu_count() or 1)


def wait_quiet(limit: float, max_wait: float) -> float:
    """The machine may be shared: wait (up to max_wait) until other work uses < limit cores."""
    deadline = time.monotonic() + max_wait
    load = other_load()
    while load > limit and time.monotonic() < deadline:
        load = other_load()
    return load


def machine() -> dict[str, str]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    affinity = len(os.sched_getaffinity(0))
    commit = subprocess.run(
        ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    postfwd = "not installed"
    if POSTFWD:
        postfwd = (
            subprocess.run(
                ["dpkg-query", "-W", "-f", "${Version}", "postfwd"],
                capture_output=True,
                text=True,
                check=False,
            ).stdout.strip()
            or "installed"
        )
    return {
        "cpu": model,
        "cores": f"{os.cpu_count()} ({affinity} usable)",
        "python": platform.python_version(),
        "kernel": platform.release(),
        "postfwd": postfwd,
        "policyd": commit or "unknown",
        "date": time.strftime("%Y-%m-%d"),
    }


# Measurements


@dataclass
class Case:
    name: str
    data: str  # the dataset the server decides with
    start: Callable[[], Server]
    workload: Workload
    results: list[dict[str, Any]] = field(default_factory=list)


def measure(case: Case, options: argparse.Namespace) -> dict[str, Any]:
    """One measured run; repeated (up to --retries times) when other work disturbed it.

    Of the attempts, the least disturbed one counts; a wrong reply in any attempt counts too.
    """
    attempts: list[dict[str, Any]] = []
    for attempt in range(options.retries + 1):
        summary = measure_once(case, options)
        attempts.append(summary)
        if summary["errors"] or (summary["other_cpu"] or 0) <= options.other_limit:
            break
        if attempt < options.retries:
            log(f"{case.name}: other work used {summary['other_cpu']} cores; measuring again")
    best = min(attempts, key=lambda summary: summary["other_cpu"] or 0)
    best["errors"] = sum(summary["errors"] for summary in attempts)
    best["attempts"] = len(attempts)
    return best


def load_run(
    server: Server,
    workload: Workload,
    options: argparse.Namespace,
    duration: float,
    **extra: Any,
) -> LoadRun:
    """The load generator against ``server``, as the options say."""
    return LoadRun(
        server.target,
        workload,
        connections=options.connections,
        threads=options.threads,
        warmup=options.warmup,
        duration=duration,
        build_dir=options.data_root / "build",
        **extra,
    )


def measure_once(case: Case, options: argparse.Namespace) -> dict[str, Any]:
    if options.quiet_wait > 0:
        other = wait_quiet(options.other_limit, options.quiet_wait)
        if other > options.other_limit:
            log(f"machine busy before {case.name}: {other:.2f} cores used by other work")
    with running(case.start) as server:
        run = load_run(server, case.workload, options, options.duration, server_pids=server.pids)
        run.start()
        result = run.finish()
        summary = result.summary()
        summary.update(server.memory())
        summary["startup_s"] = round(server.startup, 3)
    log(
        f"{case.name}: {summary['rps']:.0f} req/s, p50 {summary['p50_ms']:.2f} ms, "
        f"p99 {summary['p99_ms']:.2f} ms, p99.9 {summary['p999_ms']:.2f} ms, "
        f"errors {summary['errors']}, CPU: server {summary['server_cpu']} "
        f"load {summary['load_cpu']} other {summary['other_cpu']}, "
        f"RSS {(summary['peak_rss_kb'] or 0) / 1024:.0f} MB"
    )
    if summary["errors"]:
        log(f"{case.name}: WRONG REPLIES: {summary['mismatch_samples']}")
    return summary


def measure_reload(
    start: Callable[[], Server], workload: Workload, options: argparse.Namespace, before: float
) -> dict[str, Any]:
    """SIGHUP policyd while the load runs; the reload window is SIGHUP to its "reloaded" line."""
    if options.quiet_wait > 0:
        wait_quiet(0.15, options.quiet_wait)
    with running(start) as server:
        run = load_run(server, workload, options, 3600, timeline=True)  # ended below
        run.start()
        trigger_at = run.measure_from + int(before * 1e9)
        while time.monotonic_ns() < trigger_at:
            time.sleep(0.01)
        offset = server.log.stat().st_size
        triggered = time.monotonic_ns()
        os.kill(server.pid, signal.SIGHUP)

        def reloaded() -> re.Match[str] | None:
            return RELOADED.search(read_from(server.log, offset))

        try:
            found = poll(reloaded, options.reload_timeout, "policyd reload", interval=0.002)
        finally:
            done = time.monotonic_ns()
            run.set_stop(done + int(before * 1e9))
            result = run.finish()
        memory = server.memory()
    return reload_summary(result, triggered, done, found.group(0)) | memory


def reload_summary(result: LoadResult, start: int, end: int, line: str) -> dict[str, Any]:
    """Latency of requests in flight during the reload, and of those before it."""
    assert result.finished is not None and result.raw_latencies is not None
    during: list[int] = []
    before: list[int] = []
    after: list[int] = []
    for finished, latency in zip(result.finished, result.raw_latencies, strict=True):
        if finished >= start and finished - latency <= end:
            during.append(latency)
        elif finished < start:
            before.append(latency)
        else:
            after.append(latency)  # served by the new maps
    during.sort()
    before.sort()
    after.sort()
    seconds = (end - start) / 1e9
    return {
        "reload_s": round(seconds, 3),
        "reloaded": line,
        "during_requests": len(during),
        "during_rps": round(len(during) / seconds, 1) if seconds else None,
        "during_p50_ms": round(percentile_ms(during, 0.5), 3),
        "during_p99_ms": round(percentile_ms(during, 0.99), 3),
        "during_max_ms": round(during[-1] / 1e6, 3) if during else None,
        "before_rps": round(len(before) / ((start - result.window[0]) / 1e9), 1),
        "before_p99_ms": round(percentile_ms(before, 0.99), 3),
        "after_rps": round(len(after) / ((result.window[1] - end) / 1e9), 1),
        "after_p99_ms": round(percentile_ms(after, 0.99), 3),
        "requests": len(result.raw_latencies),
        "errors": result.errors,
        "mismatch_samples": result.samples,
    }


# py-spy


def profile(
    start: Callable[[], Server],
    workload: Workload,
    options: argparse.Namespace,
    out: Path,
) -> dict[str, Any]:
    """Sample policyd under load, then during a reload under load; top functions by own time."""
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        raise RuntimeError("py-spy is not installed (pip install py-spy)")
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {}
    with running(start) as server:
        run = load_run(server, workload, options, 3600)  # ended below
        run.start()
        while time.monotonic_ns() < run.measure_from:
            time.sleep(0.01)
        # Under load: every active thread (time in send() and in the log writer shows), then
        # only the thread holding the GIL (the Python work that limits throughput).
        steady = out / "policyd-load.txt"
        _py_spy(py_spy, server.pid, steady, options.duration)
        steady_gil = out / "policyd-load-gil.txt"
        _py_spy(py_spy, server.pid, steady_gil, options.duration, "--gil")
        # The reload: sample only the thread holding the GIL, which is what blocks requests.
        offset = server.log.stat().st_size
        reload_out = out / "policyd-reload.txt"
        spy = subprocess.Popen(
            # --subprocesses: policyd may parse the files in a worker process; sample it too.
            [*_py_spy_args(py_spy, server.pid, reload_out), "--gil", "--subprocesses"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # py-spy shows no sign of having attached (nothing on a non-tty stderr); give it a
        # second, so the profile certainly covers the reload from its start.
        time.sleep(1.0)
        os.kill(server.pid, signal.SIGHUP)
        poll(
            lambda: RELOADED.search(read_from(server.log, offset)),
            options.reload_timeout,
            "policyd reload",
        )
        spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        spy.wait(timeout=30)
        run.set_stop(time.monotonic_ns())
        result = run.finish()
        report["errors"] = result.errors
    report["load, active threads"] = top_functions(steady)
    report["load, GIL holder"] = top_functions(steady_gil)
    report["reload under load, GIL holder, policyd's process"] = top_functions(
        reload_out, children=False
    )
    report["reload under load, child processes (where policyd parses on reload)"] = top_functions(
        reload_out, children=True
    )
    report["files"] = [str(steady), str(steady_gil), str(reload_out)]
    return report


def print_profile(report: dict[str, Any]) -> None:
    for name, found in report.items():
        if not isinstance(found, dict):
            continue
        print(f"\n### {name}: {found['samples']} samples")
        if found["threads"]:
            print("threads: " + ", ".join(f"{t} {p}%" for t, p in found["threads"].items()))
        print("\n| own % | function | | inclusive % | function |\n|---:|---|---|---:|---|")
        for (own, own_pct), (incl, incl_pct) in zip(found["own"], found["inclusive"], strict=False):
            print(f"| {own_pct} | `{own}` | | {incl_pct} | `{incl}` |")
    print(f"\nraw stacks (py-spy --format raw): {', '.join(report['files'])}")


def _py_spy_args(py_spy: str, pid: int, output: Path) -> list[str]:
    # --nonblocking: sample without pausing policyd, so the profile does not slow what it measures.
    options = "--rate 200 --format raw --threads --nonblocking"
    return [py_spy, "record", "--pid", str(pid), *options.split(), "--output", str(output)]


def _py_spy(py_spy: str, pid: int, output: Path, seconds: float, *extra: str) -> None:
    subprocess.run(
        [*_py_spy_args(py_spy, pid, output), "--duration", str(int(seconds)), *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=True,
    )


_CONTEXT = re.compile(r'((?:process \d+:"[^"]*";?)*)(thread \([^)]*\): [^;]*)?;?')
_PROCESS = re.compile(r'process \d+:"[^"]*"')


def _where(frame: str) -> str:
    if frame.startswith("thread ("):
        return frame.partition(": ")[2]
    pid, _, command = frame[len("process ") :].partition(":")
    if "spawn_main" in command:
        return f"child {pid} (multiprocessing worker)"
    if "resource_tracker" in command:
        return f"child {pid} (multiprocessing resource tracker)"
    return f"child {pid}"


def top_functions(path: Path, count: int = 20, children: bool | None = None) -> dict[str, Any]:
    """From py-spy's collapsed stacks: share of samples per function, own and inclusive.

    ``children``: True counts only child processes' stacks, False only the server's own.
    """
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, number = line.rpartition(" ")
        if not number.isdigit():
            continue
        samples = int(number)
        # Leading 'process PID:"CMDLINE"' (--subprocesses; the command line may contain ";")
        # and "thread (TID): NAME" (--threads) frames say where the stack ran.
        where = _CONTEXT.match(stack)
        assert where is not None  # every part of the pattern is optional
        context = _PROCESS.findall(where.group(1)) + ([where.group(2)] if where.group(2) else [])
        frames = stack[where.end() :].split(";") if stack[where.end() :] else []
        if not frames:
            continue
        if context and context[0].startswith("process "):
            context = context[1:]  # the server's own process
        in_child = bool(context) and context[0].startswith("process ")
        if children is not None and in_child != children:
            continue
        threads[" / ".join(_where(frame) for frame in context) or "server"] += samples
        total += samples
        names = [re.sub(r":\d+\)$", ")", frame) for frame in frames]  # drop line numbers
        own[names[-1]] += samples
        # Inclusive time only for policyd's own functions: the event loop and thread
        # scaffolding around them would top the list with 100 %.
        for name in {name for name in names if "(policyd/" in name}:
            inclusive[name] += samples
    return {
        "samples": total,
        "threads": {name: round(100 * n / total, 1) for name, n in threads.most_common()}
        if total
        else {},
        "own": [(name, round(100 * n / total, 1)) for name, n in own.most_common(count)],
        "inclusive": [
            (name, round(100 * n / total, 1)) for name, n in inclusive.most_common(count)
        ],
    }


# Load generator calibration


def calibrate(floor: Case, options: argparse.Namespace) -> list[dict[str, Any]]:
    """The load generator against the floor, with 1 and 2 threads: what it costs per request.

    Load CPU is the generator process's share of a core over the window (/proc); the cost per
    request splits it into its own code (user time) and the kernel's socket work (system time),
    which on loopback includes delivering every request into the server's socket.
    """
    rows = []
    for threads in (1, 2):
        opts = argparse.Namespace(**{**vars(options), "threads": threads})
        case = Case(f"floor, loadgen x{threads}", floor.data, floor.start, floor.workload)
        rows.append({"threads": threads} | measure(case, opts))
    return rows


def print_calibration(rows: list[dict[str, Any]]) -> int:
    print(
        "| loadgen threads | floor req/s | p50 ms | p99 ms | load CPU (cores) "
        "| load µs/request: all = own code + kernel | floor CPU |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['threads']} | {row['rps']:,.0f} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} "
            f"| {row['load_cpu']} | {row['client_us_per_request']:.2f} = "
            f"{row['client_user_us']:.2f} + {row['client_sys_us']:.2f} | {row['server_cpu']} |"
        )
    return 1 if any(row["errors"] for row in rows) else 0


# Report


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def aggregate(case: Case) -> dict[str, Any]:
    results = case.results
    return {
        "rps": median([r["rps"] for r in results]),
        "p50_ms": median([r["p50_ms"] for r in results]),
        "p99_ms": median([r["p99_ms"] for r in results]),
        "p999_ms": median([r["p999_ms"] for r in results]),
        "peak_rss_mb": max((r["peak_rss_kb"] or 0) for r in results) / 1024,
        "peak_rss_bound_mb": max((r.get("peak_rss_bound_kb") or 0) for r in results) / 1024,
        "end_rss_mb": max((r["rss_kb"] or 0) for r in results) / 1024,
        "pss_mb": max(r["tree_pss_kb"] for r in results) / 1024,
        "processes": max(r["processes"] for r in results),
        "errors": sum(r["errors"] for r in results),
        "server_cpu": median([r["server_cpu"] or 0 for r in results]),
        "load_cpu": median([r["load_cpu"] or 0 for r in results]),
        "other_cpu": max(r["other_cpu"] or 0 for r in results),
        "runs": len(results),
        "all_rps": [round(r["rps"]) for r in results],
    }


def reload_targets(reloads: list[dict[str, Any]], target: Callable[..., None]) -> None:
    """The rows of the targets table about reloading the 1M map under load."""
    seconds = median([r["reload_s"] for r in reloads])
    p99 = median([r["during_p99_ms"] for r in reloads])
    worst = max(r["during_max_ms"] or 0 for r in reloads)
    target("reload of the 1M map under load", "<= 10 s", seconds, seconds <= 10, " s")
    target("p99 during the reload", "<= 50 ms", p99, p99 <= 50, " ms")
    target("max latency during the reload", "(no request waits for it)", worst, None, " ms")
    errors = sum(r["errors"] for r in reloads)
    target("failed requests during the reload", "0", errors, errors == 0)
    rss = max((r["peak_rss_kb"] or 0) for r in reloads) / 1024
    target("peak RSS including the reload", "<= 300 MB", rss, rss <= 300, " MB")
    value = max((r.get("peak_rss_bound_kb") or 0) for r in reloads) / 1024
    target("... main peak + parsing process peak, as if at once", "report", value, None, " MB")


def markdown(
    cases: list[Case],
    startup: list[float],
    reloads: list[dict[str, Any]],
    info: dict[str, str],
    options: argparse.Namespace,
) -> str:
    rows = {case.name: aggregate(case) for case in cases if case.results}
    lines = [
        f"Median of {options.runs} runs, {options.connections} connections, "
        f"{options.warmup:g} s warmup + {options.duration:g} s measured per run, "
        f"load generator bench/loadgen.c ({options.threads} thread"
        f"{'s' if options.threads > 1 else ''}, epoll).",
        "",
        "| server | data | req/s | p50 ms | p99 ms | p99.9 ms | RSS MB: peak (end) "
        "| server CPU | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for case in cases:
        if not case.results:
            continue
        row = rows[case.name]
        rss = f"{row['peak_rss_mb']:.0f} ({row['end_rss_mb']:.0f})"
        if row["processes"] > 10:  # a prefork server (postfwd2): shared pages count once
            rss = f"{row['pss_mb']:.0f} (PSS, {row['processes']} processes)"
        lines.append(
            f"| {case.name} | {case.data} | {row['rps']:,.0f} | {row['p50_ms']:.2f} "
            f"| {row['p99_ms']:.2f} | {row['p999_ms']:.2f} | {rss} "
            f"| {row['server_cpu']:.2f} | {row['errors']} |"
        )
    lines += [
        "",
        "Per run req/s (and the most CPU other work took during one): "
        + "; ".join(
            f"{name} {row['all_rps']} ({row['other_cpu']:.2f} cores)" for name, row in rows.items()
        )
        + ".",
    ]
    lines += ["", "| target (issue 5) | goal | measured | |", "|---|---|---:|---|"]

    def target(label: str, goal: str, value: float | None, ok: bool | None, unit: str = "") -> None:
        if value is None:
            return
        verdict = "" if ok is None else ("pass" if ok else "**miss**")
        shown = f"{value:.0f}" if float(value).is_integer() and not unit else f"{value:.2f}"
        lines.append(f"| {label} | {goal} | {shown}{unit} | {verdict} |")

    def ratio(a: str, b: str, key: str) -> float | None:
        if a in rows and b in rows and rows[b][key]:
            return float(rows[a][key] / rows[b][key])
        return None

    value = ratio("policyd", "floor", "rps")
    target("throughput policyd 1M / floor", ">= 0.7", value, value is not None and value >= 0.7)
    for name in ("postfwd2", "postfwd2 (cache)"):
        value = ratio("policyd", name, "rps")
        target(f"throughput policyd 1M / {name}", ">= 15", value, value is not None and value >= 15)
    value = ratio("policyd (decision log off)", "floor", "rps")
    target(
        "... with the decision log off / floor", ">= 0.7", value, value is not None and value >= 0.7
    )
    value = ratio("policyd (decision log off)", "postfwd2", "rps")
    target(
        "... with the decision log off / postfwd2",
        ">= 15",
        value,
        value is not None and value >= 15,
    )
    value = ratio("policyd", "floor", "p99_ms")
    target("p99 policyd 1M / floor", "<= 2", value, value is not None and value <= 2)
    value = ratio("policyd", "policyd 1k", "rps")
    target("throughput 1M / 1k", ">= 0.9", value, value is not None and value >= 0.9)
    if "policyd" in rows:
        rss = rows["policyd"]["peak_rss_mb"]
        target("peak RSS policyd 1M", "<= 300 MB", rss, rss <= 300, " MB")
        value = rows["policyd"]["peak_rss_bound_mb"]
        target("... main peak + parsing process peak, as if at once", "report", value, None, " MB")
    if reloads:
        reload_targets(reloads, target)
    if startup:
        target(
            "startup with the 1M map (exec to first reply)", "report", median(startup), None, " s"
        )
    lines += [
        "",
        "Machine: " + ", ".join(f"{key} {value}" for key, value in info.items()),
        "",
        "Commands:",
        "",
        "```sh",
        "python bench/run.py " + " ".join(sys.argv[1:]),
        "# which runs, per server and run (ports picked at start):",
        f"python bench/gen_data.py --preset 1m --out {options.data_root / 'dms-1m'}",
        f"python bench/gen_data.py --preset 1k --out {options.data_root / 'dms-1k'}",
        "python bench/floor.py --listen inet:127.0.0.1:0",
        " ".join(
            [_variable(setting) for setting in options.setting]
            + ["python -m policyd serve --listen inet:127.0.0.1:0 --map dms:DATA"]
        ),
        "postfwd2 --daemon --file bench/postfwd.cf --proto tcp --interface 127.0.0.1 --port PORT "
        f"--min_servers {options.connections + 5} --max_servers {options.connections + 10} "
        "--cache 0 --perfmon   # and --cache 600 for the cached row",
        f"python bench/load.py --connect TARGET --data DATA --connections {options.connections} "
        f"--threads {options.threads} --warmup {options.warmup:g} --duration {options.duration:g} "
        "--expect dms|fixed:DUNNO|equal --server-pid PID",
        "```",
    ]
    return "\n".join(lines) + "\n"


# Main


def parse_options(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CI: check replies, a few seconds")
    parser.add_argument("--calibrate", action="store_true", help="load generator against the floor")
    parser.add_argument("--profile", type=Path, metavar="DIR", help="py-spy policyd into DIR")
    parser.add_argument("--data-root", type=Path, default=Path("/tmp/policyd-bench"))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--connections", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1, help="load generator threads")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--pool", type=int, default=60_000, help="distinct requests per workload")
    parser.add_argument("--transport", choices=("inet", "unix"), default="inet")
    parser.add_argument("--reload-runs", type=int, default=3)
    parser.add_argument("--reload-timeout", type=float, default=120.0)
    parser.add_argument(
        "--setting",
        action="append",
        default=None,
        metavar="NAME=VALUE",
        help=f"policyd setting as POLICYD_NAME (default: {' '.join(DEFAULT_SETTINGS)})",
    )
    parser.add_argument(
        "--floor-protocol", choices=("buffered", "plain"), default="buffered", help="see floor.py"
    )
    parser.add_argument("--no-postfwd", action="store_true", help="leave postfwd2 out")
    parser.add_argument(
        "--quiet-setting",
        default="log_decisions=none",
        metavar="NAME=VALUE",
        help='the policyd setting for the row without per-request logging ("" for no such row)',
    )
    parser.add_argument(
        "--only",
        type=lambda text: text.split(","),
        metavar="NAMES",
        help='comma-separated: "floor", "policyd 1k", "policyd", "policyd (decision log off)", '
        '"postfwd2", "postfwd2 (cache)", "reload"',
    )
    parser.add_argument("--no-1m", action="store_true", help="only the 1k dataset")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=30.0,
        help="before each measurement, wait up to this long for other work on the machine to stop",
    )
    parser.add_argument(
        "--other-limit",
        type=float,
        default=0.2,
        help="cores other work may use during a run before it counts as disturbed",
    )
    parser.add_argument("--retries", type=int, default=2, help="re-measure a disturbed run")
    parser.add_argument("--json", type=Path, help="also write every raw result here")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    options = parser.parse_args(argv)
    options.setting = list(DEFAULT_SETTINGS if options.setting is None else options.setting)
    return options


def main(argv: list[str] | None = None) -> int:
    options = parse_options(argv)
    become_subreaper()
    try:
        log(f"load generator: {build_loadgen(options.data_root / 'build')}")
    except RuntimeError as error:  # no compiler, or the source does not build: say so first
        print(f"run.py: {error}", file=sys.stderr)
        return 2
    if options.smoke:
        return smoke(options)
    return benchmark(options)


@dataclass
class Setup:
    """The data, request pools and server starters every mode uses."""

    work: Path
    floor: Case
    small: Case
    big: Case | None
    quiet: Case | None  # the 1M case with policyd's decision log off
    postfwd: list[Case]


def prepare(options: argparse.Namespace) -> Setup:
    log("generating data (reused when already there)")
    small_data = options.data_root / "dms-1k"
    big_data = options.data_root / "dms-1m"
    gen_data.generate(small_data, **gen_data.PRESETS["1k"])
    if not options.no_1m:
        gen_data.generate(big_data, **gen_data.PRESETS["1m"])
    log("building request pools")
    small_load = dms_workload(load_model(small_data), options.pool)
    model = load_model(small_data if options.no_1m else big_data)
    big_load = small_load if options.no_1m else dms_workload(model, options.pool)
    equal_load = equal_workload(model, options.pool)
    del model  # the 1M model is large; the load generator needs only the request lists

    work = Path(tempfile.mkdtemp(prefix="policyd-bench-"))
    transport, settings = options.transport, options.setting

    def probe(workload: Workload) -> tuple[bytes, bytes]:
        return workload.requests[0], workload.expected[0]

    floor = Case(
        "floor",
        "none (fixed DUNNO)",
        lambda: start_floor(work, transport, probe(big_load), options.floor_protocol),
        big_load.with_expectation("fixed:DUNNO", "DUNNO"),
    )
    small = Case(
        "policyd 1k",
        "1k aliases",
        lambda: start_policyd(work, small_data, transport, settings, probe(small_load)),
        small_load,
    )
    big = quiet = None
    if not options.no_1m:
        big = Case(
            "policyd",
            "1M aliases",
            lambda: start_policyd(work, big_data, transport, settings, probe(big_load)),
            big_load,
        )
        # postfwd2 runs with logging off; this is policyd on the same terms (no line per
        # refusal). The setting is QUIET_SETTING; --quiet-setting "" leaves the row out.
        if options.quiet_setting:
            quiet_settings = [*settings, options.quiet_setting]
            quiet = Case(
                "policyd (decision log off)",
                "1M aliases",
                lambda: start_policyd(work, big_data, transport, quiet_settings, probe(big_load)),
                big_load,
            )
    postfwd = []
    if POSTFWD and not options.no_postfwd:
        for cache, name in ((0, "postfwd2"), (600, "postfwd2 (cache)")):
            start = lambda cache=cache: start_postfwd(  # noqa: E731
                work, options.connections, cache, transport, probe(equal_load)
            )
            postfwd.append(Case(name, "sender == login rule", start, equal_load))
    return Setup(work, floor, small, big, quiet, postfwd)


def benchmark(options: argparse.Namespace) -> int:
    setup = prepare(options)
    try:
        if options.calibrate:
            return print_calibration(calibrate(setup.floor, options))
        if options.profile:
            if setup.big is None:
                raise SystemExit("--profile needs the 1M data (drop --no-1m)")
            report = profile(setup.big.start, setup.big.workload, options, options.profile)
            print_profile(report)
            return 1 if report["errors"] else 0
        return full(setup, options)
    finally:
        shutil.rmtree(setup.work, ignore_errors=True)


def full(setup: Setup, options: argparse.Namespace) -> int:
    cases = [setup.floor, setup.small]
    cases += [case for case in (setup.big, setup.quiet) if case is not None]
    cases += setup.postfwd
    if options.only:
        cases = [case for case in cases if case.name in options.only]
    info = machine()
    log(f"machine: {info}")
    for number in range(1, options.runs + 1):
        for case in cases:
            log(f"run {number}/{options.runs}: {case.name}")
            case.results.append(measure(case, options))
    startup = [r["startup_s"] for r in setup.big.results] if setup.big else []
    reloads = []
    reload_runs = (
        options.reload_runs if setup.big and "reload" in (options.only or ["reload"]) else 0
    )
    for number in range(1, reload_runs + 1):
        assert setup.big is not None
        log(f"reload under load {number}/{options.reload_runs}")
        reload = measure_reload(setup.big.start, setup.big.workload, options, before=3.0)
        log(f"reload: {json.dumps(reload)}")
        reloads.append(reload)
    text = markdown(cases, startup, reloads, info, options)
    print(text)
    if options.markdown:
        options.markdown.write_text(text)
    if options.json:
        raw = {"machine": info, "cases": {c.name: c.results for c in cases}, "reloads": reloads}
        options.json.write_text(json.dumps(raw, indent=1))
    failed = sum(r["errors"] for case in cases for r in case.results)
    failed += sum(r["errors"] for r in reloads)
    return 1 if failed else 0


def framing_problems(name: str, target: str, workload: Workload) -> list[str]:
    """A request split across reads gets one reply; two requests in one write get two.

    Postfix sends a whole request at once and waits for the reply, but TCP may still split or
    join reads; a server must frame by the empty line, never by read.
    """
    problems = []
    request, expected = workload.requests[1], workload.expected[1]
    family, address = parse_target(target)
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(address)
        if family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Cut inside a line and between the two newlines of the terminator.
        for piece in (request[:7], request[7:-1], request[-1:]):
            sock.sendall(piece)
            time.sleep(0.02)  # let each piece arrive as a read of its own
        got = _read_replies(sock, 1)
        if got != expected:
            problems.append(f"{name}: split request answered {got!r}, expected {expected!r}")
        sock.sendall(request + request)
        got = _read_replies(sock, 2)
        if got != expected * 2:
            problems.append(f"{name}: two requests in one write answered {got!r}")
    return problems


def _read_replies(sock: socket.socket, count: int) -> bytes:
    data = b""
    while data.count(b"\n\n") < count:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def smoke(options: argparse.Namespace) -> int:
    """Small data, short runs, few connections: every reply must be right. Never timings."""
    root = Path(tempfile.mkdtemp(prefix="policyd-bench-smoke-"))
    try:
        data = options.data_root / "dms-1k"
        gen_data.generate(data, **gen_data.PRESETS["1k"])
        model = load_model(data)
        dms = dms_workload(model, 3000)
        options.connections, options.threads = 8, 1
        options.warmup, options.duration, options.quiet_wait, options.retries = 0.2, 1.0, 0, 0
        transport, settings = options.transport, options.setting
        probe = (dms.requests[0], dms.expected[0])
        cases = [
            Case(
                "floor",
                "-",
                lambda: start_floor(root, transport, probe),
                dms.with_expectation("f", "DUNNO"),
            ),
            Case(
                "policyd", "1k", lambda: start_policyd(root, data, transport, settings, probe), dms
            ),
        ]
        if POSTFWD and not options.no_postfwd:
            equal = equal_workload(model, 3000)
            equal_probe = (equal.requests[0], equal.expected[0])
            cases.append(
                Case(
                    "postfwd2",
                    "sender == login",
                    lambda: start_postfwd(root, options.connections, 0, transport, equal_probe),
                    equal,
                )
            )
        failures = []
        for case in cases:
            if case.name != "postfwd2":
                with running(case.start) as server:
                    failures += framing_problems(case.name, server.target, case.workload)
            summary = measure(case, options)
            if summary["errors"] or not summary["requests"]:
                failures.append(f"{case.name}: {summary}")
        # A reload while serving must not produce a single wrong or lost reply.
        options.reload_timeout = 30
        start = lambda: start_policyd(root, data, transport, settings, probe)  # noqa: E731
        reload = measure_reload(start, dms, options, before=0.3)
        log(f"reload: {reload['reloaded']}, errors {reload['errors']}")
        if reload["errors"] or not reload["requests"]:
            failures.append(f"reload: {reload}")
        for failure in failures:
            print(f"SMOKE FAILED: {failure}", file=sys.stderr)
        if not failures:
            print("smoke: every reply correct", file=sys.stderr)
        return 1 if failures else 0
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

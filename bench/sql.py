"""The SQL stores' benchmark: policyd with pgsql: and mysql: maps against a real PostgreSQL and
MariaDB, warm and cold, through a database outage, and how long a NOTIFY takes to reach two
replicas. Prints the rows of BENCHMARKS.md's "SQL stores" section.

    python bench/sql.py                  # everything, about 4 minutes
    python bench/sql.py --smoke          # CI (tests/test_bench_sql.py): replies only, seconds
    python bench/sql.py --mailboxes 100000 --aliases 200000 --duration 20

The data is postfixadmin's tables (examples/sql/postfixadmin/), generated: mailboxes, their
own alias rows, and aliases with comma lists of one to three mailboxes. The same ownership is
also written as a texthash table, the file-map baseline on the same workload. Every reply is
checked against the owners computed here from the generated rows, never with policyd's code.

Rows:
  * texthash: the baseline; policyd's decision cache on, as by default.
  * pgsql/mysql warm: the defaults (cache_ttl 60 s, decision cache on); after the warmup
    every answer is remembered.
  * pgsql/mysql cold: cache_ttl = 0 and decision_cache_size = 0: every request is one round
    trip to the database.
  * pgsql down (4xx): the database stopped; cold, so every request finds it down; expected
    reply 451 4.3.0 for all.
  * pgsql down (stale): warmed, then the database stopped; cache_ttl 1 s, stale_ttl 600 s:
    every answer comes from memory, counted as stale.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from load import LoadRun, Workload, _attributes, _encode, _not_owned, build_loadgen
from run import DEFAULT_SETTINGS, Server, _python_server, log, policyd_env, running

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))

from tests.servers import oracle  # noqa: E402
from tests.servers.mysql import MariaServer  # noqa: E402
from tests.servers.pgsql import ADMIN, PgServer  # noqa: E402
from tests.servers.postfix_maps import PostfixMaps  # noqa: E402

TEMPFAIL = b"action=451 4.3.0 Temporary lookup failure\n\n"
OWNED = b"action=OK\n\n"


# The data and the model


def generate(directory: Path, mailboxes: int, aliases: int, seed: int = 1) -> dict[str, set[str]]:
    """postfixadmin rows as SQL (postfixadmin.sql) and the same ownership as a texthash table
    (owners.texthash); returns the model: address -> its owners."""
    rng = random.Random(seed)
    domains = [f"d{n}.example" for n in range(10)]
    boxes = [f"user{n}@{domains[n % len(domains)]}" for n in range(mailboxes)]
    owners: dict[str, set[str]] = {box: {box} for box in boxes}
    alias_rows: list[tuple[str, str]] = [(box, box) for box in boxes]  # postfixadmin's own row
    for n in range(aliases):
        address = f"alias{n}@{domains[n % len(domains)]}"
        goto = rng.sample(boxes, rng.choice((1, 1, 2, 3)))
        separator = ", " if rng.random() < 0.2 else ","
        alias_rows.append((address, separator.join(goto)))
        owners[address] = set(goto)
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / "postfixadmin.sql").open("w") as sql:
        for start in range(0, len(boxes), 1000):
            values = ",\n".join(
                f"('{box}', '{box.partition('@')[0]}', '{box.partition('@')[2]}', '1')"
                for box in boxes[start : start + 1000]
            )
            sql.write(
                f"INSERT INTO mailbox (username, local_part, domain, active) VALUES\n{values};\n"
            )
        for start in range(0, len(alias_rows), 1000):
            values = ",\n".join(
                f"('{address}', '{goto}', '{address.partition('@')[2]}', '1')"
                for address, goto in alias_rows[start : start + 1000]
            )
            sql.write(f"INSERT INTO alias (address, goto, domain, active) VALUES\n{values};\n")
    with (directory / "owners.texthash").open("w") as table:
        for address, who in owners.items():
            table.write(f"{address} {','.join(sorted(who))}\n")
    return owners


def workload(owners: dict[str, set[str]], size: int, seed: int = 1) -> Workload:
    """Submission traffic: a mailbox as itself (30 %), as one of its aliases (35 %), as
    someone else's alias (20 %) or mailbox (10 %), or as an address no row lists (5 %)."""
    rng = random.Random(seed)
    boxes = [address for address in owners if address.startswith("user")]
    aliases = [address for address in owners if address.startswith("alias")]
    kinds = {"self": 30, "alias": 35, "foreign_alias": 20, "foreign_mailbox": 10, "unlisted": 5}
    names, weights = list(kinds), list(kinds.values())
    counts = dict.fromkeys(names, 0)
    requests: list[bytes] = []
    expected: list[bytes] = []
    message = 0
    while len(requests) < size:
        kind = rng.choices(names, weights)[0]
        login = rng.choice(boxes)
        if kind == "self":
            sender = login
        elif kind == "alias":
            sender = rng.choice(aliases)
            login = rng.choice(sorted(owners[sender]))
        elif kind == "foreign_alias":
            sender = rng.choice(aliases)
        elif kind == "foreign_mailbox":
            sender = rng.choice(boxes)
        else:
            sender = f"nobody{rng.randrange(10**6)}@{login.partition('@')[2]}"
        reply = OWNED if login in owners.get(sender, set()) else _not_owned(login)
        message += 1
        for attributes in _attributes(rng, sender, login, message):
            requests.append(_encode(attributes))
            expected.append(reply)
            counts[kind] += 1
    return Workload("sql", requests[:size], expected[:size], counts)


# Servers


def start_policyd(work: Path, name: str, config: str, probe: tuple[bytes, bytes]) -> Server:
    """policyd serve with this TOML configuration, on a unix socket of its own."""
    path = work / f"{name}.toml"
    path.write_text(config)
    argv = [sys.executable, "-m", "policyd", "serve", "--config", str(path)]
    argv += ["--listen", f"unix:{work / (name + '.sock')}"]
    return _python_server(name, argv, work, probe, env=policyd_env(list(DEFAULT_SETTINGS)))


def sql_config(backend: str, cf: Path, **options: Any) -> str:
    top = {key: value for key, value in options.items() if key == "decision_cache_size"}
    table = {key: value for key, value in options.items() if key not in top}
    lines = [f"{key} = {json.dumps(value)}" for key, value in top.items()]
    lines += ["[[maps]]", f'type = "{backend}"', f"path = {json.dumps(str(cf))}"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in table.items()]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def databases(data: Path, work: Path) -> Iterator[dict[str, tuple[Any, Path]]]:
    """PostgreSQL and MariaDB with the generated rows; each with a map file pointing at it."""
    schema = oracle.EXAMPLES / "postfixadmin"
    rows = data / "postfixadmin.sql"
    maps = PostfixMaps(work / "postfix")
    with (
        PgServer(sql_files=(schema / "schema.pgsql.sql", rows), notify=True) as pg,
        MariaServer(databases={"postfixadmin": (schema / "schema.mysql.sql", rows)}) as maria,
    ):
        found = {}
        for backend, server in (("pgsql", pg), ("mysql", maria)):
            example = oracle.example("postfixadmin", backend)
            cf = maps.render(f"{backend}.cf", example, **oracle.connection(server))
            found[backend] = (server, cf)
        yield found


# Measurements


def measure(
    server: Server, load: Workload, options: argparse.Namespace, **extra: Any
) -> dict[str, Any]:
    run = LoadRun(
        server.target,
        load,
        connections=options.connections,
        warmup=options.warmup,
        duration=options.duration,
        build_dir=options.data_root / "build",
        server_pids=server.pids,
        **extra,
    )
    run.start()
    summary = run.finish().summary()
    log(
        f"{server.name}: {summary['rps']:.0f} req/s, p50 {summary['p50_ms']} ms, "
        f"p99 {summary['p99_ms']} ms, errors {summary['errors']}, "
        f"CPU server {summary['server_cpu']} load {summary['load_cpu']}"
        f" other {summary['other_cpu']}"
    )
    if summary["errors"]:
        log(f"{server.name}: WRONG REPLIES: {summary['mismatch_samples']}")
    return summary


async def _prime(target: str, load: Workload, parallel: int = 16) -> int:
    """Send every request of the workload once, ``parallel`` connections at a time, so each
    answer is remembered before a warm measurement starts; returns how many replies were not
    the expected one."""
    path = target.removeprefix("unix:")
    wrong = 0

    async def connection(indexes: range) -> None:
        nonlocal wrong
        reader, writer = await asyncio.open_unix_connection(path)
        for index in indexes:
            writer.write(load.requests[index])
            wrong += await reader.readuntil(b"\n\n") != load.expected[index]
        writer.close()

    count = len(load.requests)
    await asyncio.gather(*(connection(range(n, count, parallel)) for n in range(parallel)))
    return wrong


def prime(server: Server, load: Workload) -> None:
    started = time.monotonic()
    wrong = asyncio.run(_prime(server.target, load))
    log(f"{server.name}: every request asked once in {time.monotonic() - started:.1f} s")
    if wrong:
        raise RuntimeError(f"{server.name}: {wrong} wrong replies while priming")


def rows(
    work: Path,
    data: Path,
    load: Workload,
    dbs: dict[str, tuple[Any, Path]],
    options: argparse.Namespace,
) -> list[dict[str, Any]]:
    probe = (load.requests[0], load.expected[0])
    results = []

    def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
        """The run with the median throughput; a wrong reply in any run counts."""
        chosen = dict(sorted(runs, key=lambda run: run["rps"])[len(runs) // 2])
        chosen["errors"] = sum(run["errors"] for run in runs)
        chosen["runs_rps"] = [round(run["rps"]) for run in runs]
        return chosen

    texthash = f'[[maps]]\ntype = "texthash"\npath = {json.dumps(str(data / "owners.texthash"))}\n'
    warm = {
        "texthash (file map)": texthash,
        "pgsql warm": sql_config("pgsql", dbs["pgsql"][1]),
        "mysql warm": sql_config("mysql", dbs["mysql"][1]),
    }
    # Warm rows take turns, run by run: other work on a shared machine then weighs on each
    # alike, and the file map and the SQL maps are compared on the same terms.
    with contextlib.ExitStack() as stack:
        servers = {}
        for name, config in warm.items():
            slug = name.split()[0]
            start = lambda slug=slug, config=config: start_policyd(work, slug, config, probe)  # noqa: E731
            servers[name] = stack.enter_context(running(start))
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in servers}
        for _ in range(options.runs):
            for name, server in servers.items():
                # Right before each run: an answer lives cache_ttl (60 s), and the other
                # servers' runs take about that long.
                prime(server, load)
                runs[name].append(measure(server, load, options))
    results += [{"row": name, **median_run(runs[name])} for name in servers]
    for backend in ("pgsql", "mysql"):
        cold = sql_config(backend, dbs[backend][1], cache_ttl=0, decision_cache_size=0)
        with running(
            lambda cold=cold, b=backend: start_policyd(work, f"{b}-cold", cold, probe)
        ) as server:
            cold_runs = [measure(server, load, options) for _ in range(options.runs)]
        results.append({"row": f"{backend} cold", **median_run(cold_runs)})

    pg, cf = dbs["pgsql"]
    cold = sql_config("pgsql", cf, cache_ttl=0, decision_cache_size=0)
    with running(lambda: start_policyd(work, "pgsql-down", cold, probe)) as server, pg.outage():
        failing = Workload("down", load.requests, [TEMPFAIL] * len(load.requests))
        results.append({"row": "pgsql down (4xx)", **measure(server, failing, options)})
    # No LISTEN: a listener that reconnects forgets every answer, which is right, but then
    # there would be nothing left to keep.
    stale = sql_config("pgsql", cf, cache_ttl=1, stale_ttl=600, notify_channel="")
    with running(lambda: start_policyd(work, "pgsql-stale", stale, probe)) as server:
        prime(server, load)  # every request has an answer to keep
        with pg.outage():
            time.sleep(1.5)  # beyond cache_ttl: what follows comes from the stale answers
            results.append({"row": "pgsql down (stale)", **measure(server, load, options)})
    return results


async def notify_delays(
    work: Path,
    dbs: dict[str, tuple[Any, Path]],
    load: Workload,
    owners: dict[str, set[str]],
    repeats: int,
) -> dict[str, Any]:
    """Seconds from the start of an UPDATE to the moment each of two replicas answers with
    the new owner, with an hour of cache_ttl: only the NOTIFY can tell them."""
    import asyncpg  # noqa: PLC0415 (the pgsql extra, needed here only)

    pg, cf = dbs["pgsql"]
    config = sql_config("pgsql", cf, cache_ttl=3600)
    probe = (load.requests[0], load.expected[0])
    replicas = [start_policyd(work, f"replica{n}", config, probe) for n in range(2)]
    # The owner of the tables, over the server's socket (the login role may only read).
    connection = await asyncpg.connect(
        host=str(pg.socket_dir), port=pg.port, user=ADMIN, database=pg.dbname
    )
    delays: list[float] = []
    try:
        ask = "request=smtpd_access_policy\nsender=alias0@d0.example\nsasl_username={}\n\n"
        login = "notify-test@d0.example"  # not alias0's owner, until the UPDATE says so
        original = ",".join(sorted(owners["alias0@d0.example"]))
        streams = [await asyncio.open_unix_connection(r.target[5:]) for r in replicas]

        async def reply(stream: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> bytes:
            stream[1].write(ask.format(login).encode())
            return await stream[0].readuntil(b"\n\n")

        for repeat in range(repeats):
            owned = repeat % 2 == 0  # give alias0 to user9, then take it back
            goto = login if owned else original
            want = OWNED if owned else _not_owned(login)
            for stream in streams:
                assert await reply(stream) != want
            started = time.perf_counter()
            await connection.execute(
                "UPDATE alias SET goto = $1 WHERE address = 'alias0@d0.example'", goto
            )

            delays += await asyncio.gather(
                *(changed(reply, stream, want, started) for stream in streams)
            )
        for _, writer in streams:
            writer.close()
    finally:
        await connection.close()
        for replica in replicas:
            replica.stop()
    ordered = sorted(delays)
    return {
        "replicas": 2,
        "changes": repeats,
        "median_ms": round(statistics.median(ordered) * 1000, 2),
        "p90_ms": round(ordered[int(0.9 * (len(ordered) - 1))] * 1000, 2),
        "max_ms": round(ordered[-1] * 1000, 2),
    }


async def changed(
    reply: Callable[[Any], Awaitable[bytes]], stream: Any, want: bytes, started: float
) -> float:
    """Ask until the reply is ``want``; the seconds since ``started``."""
    while await reply(stream) != want:
        pass
    return time.perf_counter() - started


def markdown(results: list[dict[str, Any]], notify: dict[str, Any] | None) -> str:
    lines = [
        "| row | requests/s | p50 ms | p99 ms | errors | policyd CPU | µs CPU a request"
        " | other CPU | runs (req/s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        runs = ", ".join(map(str, r.get("runs_rps", [round(r["rps"])])))
        cost = round(r["server_cpu"] / r["rps"] * 1e6, 1) if r["rps"] and r["server_cpu"] else "-"
        lines.append(
            f"| {r['row']} | {r['rps']:.0f} | {r['p50_ms']} | {r['p99_ms']} | {r['errors']} |"
            f" {r['server_cpu']} | {cost} | {r['other_cpu']} | {runs} |"
        )
    if notify:
        lines.append("")
        lines.append(
            f"NOTIFY to {notify['replicas']} replicas, {notify['changes']} changes: median"
            f" {notify['median_ms']} ms, p90 {notify['p90_ms']} ms, max {notify['max_ms']} ms"
            " from the start of the UPDATE to the new answer."
        )
    return "\n".join(lines)


def parse_options(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CI: check replies, a few seconds")
    parser.add_argument("--data-root", type=Path, default=Path("/tmp/policyd-bench"))
    parser.add_argument("--mailboxes", type=int, default=10_000)
    parser.add_argument("--aliases", type=int, default=20_000)
    parser.add_argument("--pool", type=int, default=20_000, help="distinct requests")
    parser.add_argument("--connections", type=int, default=100)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--notify-changes", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3, help="runs of each row; the median counts")
    parser.add_argument("--json", type=Path, help="also write every raw result here")
    options = parser.parse_args(argv)
    if options.smoke:
        options.mailboxes, options.aliases, options.pool = 200, 300, 2000
        options.connections, options.warmup, options.duration = 8, 0.5, 1.0
        options.notify_changes, options.runs = 4, 1
    return options


def main(argv: list[str] | None = None) -> int:
    options = parse_options(argv)
    try:
        build_loadgen(options.data_root / "build")
    except RuntimeError as error:
        print(f"sql.py: {error}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="policyd-bench-sql-"))
    try:
        data = options.data_root / f"sql-{options.mailboxes}-{options.aliases}"
        log(f"generating {options.mailboxes} mailboxes and {options.aliases} aliases")
        owners = generate(data, options.mailboxes, options.aliases)
        load = workload(owners, options.pool)
        with databases(data, work) as dbs:
            results = rows(work, data, load, dbs, options)
            notify = asyncio.run(notify_delays(work, dbs, load, owners, options.notify_changes))
        print(markdown(results, notify))
        if options.json:
            options.json.write_text(json.dumps({"rows": results, "notify": notify}, indent=2))
        wrong = [r["row"] for r in results if r["errors"] or not r["requests"]]
        if wrong:
            print(f"WRONG OR NO REPLIES: {', '.join(wrong)}", file=sys.stderr)
            return 1
        if options.smoke:
            print("smoke: every reply correct", file=sys.stderr)
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

"""What a replica carries: two orchestratord replicas on one throwaway PostgreSQL (Debian's server, as the
tests start it, with fsync on), NODES nodes heartbeating every INTERVAL seconds.

Two phases on the same replicas, after one interval of warm-up, then a quiet spell that measures what a
replica costs doing nothing but polling the database:
- "first only": every node heartbeats to the first replica; the second learns every heartbeat from the
  first one's batched rows. This separates the two costs: CPU per heartbeat taken over HTTP (the first)
  and per heartbeat learnt from the database (the second).
- "spread": half the nodes (even numbers) heartbeat to the first replica, half to the second, as agents
  given the URL list in two orders are (docs/failover.md); each takes half over HTTP, learns the rest.
Per phase it prints, per replica, the CPU per heartbeat and the cores used, and the database's write rate
from pg_stat_database / pg_stat_user_tables deltas (rows and transactions per second, WAL bytes), then
how many nodes each replica lists online.

The load is heartbeat.py's bodies (2 pools, 3 models, the free slots changing), sent by one asyncio
process paced per node: node n is due at n/NODES of each interval, over 64 connections per replica
(real agents hold one connection each). On a two-core machine this generator and the two replicas share
the cores: 10,000 nodes at the shipped 5 s interval is 2,000 heartbeats/s, which it can send; at 1 s
(10,000/s) it could not, so the default is 5 s and the output says what rate was reached.

    python bench/replicas.py [--nodes 10000] [--interval 5] [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _orchestratord import harness, postgres  # noqa: E402
from _orchestratord.heartbeat_load import SLOT_STEPS, heartbeat_bodies  # noqa: E402
from support import TEST_TOKEN, make_daemon, wait_until  # noqa: E402
from support_postgres import fresh_database  # noqa: E402

CONNECTIONS_PER_REPLICA = 64
NODE_TIMEOUT_MS = 600_000
HEADERS = {"Authorization": f"Bearer {TEST_TOKEN}", "Content-Type": "application/json"}


def node_id(number: int) -> str:
    return f"n-{number:05d}"


@dataclass
class Sent:
    answered: list[int]  # per replica, heartbeats answered 200
    failed: int  # answers other than 200, and requests that failed
    why: Counter  # what the failed ones got: a status, or the exception's name
    max_late_s: float  # how far behind its schedule the generator fell at worst
    generator_cpu_s: float


async def drive(urls: list[str], owner: list[int], interval_s: float, seconds: float) -> Sent:
    """Each node's heartbeat every interval_s to urls[owner[node]], node n due at n/len(owner) of each
    interval; runs for `seconds`, then waits for the answers still on their way."""
    bodies = [body.encode() for body in heartbeat_bodies()]
    nodes = len(owner)
    sent = Sent([0] * len(urls), 0, Counter(), 0.0, 0.0)
    cpu_start = time.process_time()
    sessions = [
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=CONNECTIONS_PER_REPLICA),
            headers=HEADERS,
            timeout=aiohttp.ClientTimeout(total=30),
        )
        for _ in urls
    ]

    async def one(number: int, visit: int) -> None:
        replica = owner[number]
        url = f"{urls[replica]}/v2/nodes/{node_id(number)}/heartbeat"
        try:
            async with sessions[replica].post(url, data=bodies[visit % SLOT_STEPS]) as answer:
                await answer.read()
                if answer.status == 200:
                    sent.answered[replica] += 1
                else:
                    sent.failed += 1
                    sent.why[f"HTTP {answer.status}"] += 1
        except (aiohttp.ClientError, TimeoutError) as exc:
            sent.failed += 1
            sent.why[type(exc).__name__] += 1

    tasks: set[asyncio.Task] = set()
    try:
        start = time.monotonic()
        slot_s = 0.01  # send what is due every 10 ms
        due_total = int(seconds / interval_s * nodes)
        issued = 0
        while issued < due_total:
            now = time.monotonic() - start
            due = min(due_total, int(now / interval_s * nodes))
            if due - issued > 0:
                # Behind schedule by (due - issued) nodes' worth of time, beyond the slot being sent now.
                sent.max_late_s = max(sent.max_late_s, (due - issued) / nodes * interval_s - slot_s)
            for position in range(issued, due):
                task = asyncio.create_task(one(position % nodes, position // nodes))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            issued = due
            await asyncio.sleep(slot_s)
        if tasks:
            await asyncio.wait(tasks)
    finally:
        for session in sessions:
            await session.close()
    sent.generator_cpu_s = time.process_time() - cpu_start
    return sent


REGISTER_TRIES = 3  # an agent retries a 503; so does the bench, and it says how often


async def register(urls: list[str], nodes: int) -> int:
    """Every node registered, node n at urls[n % len(urls)], with its first heartbeat; the number of 503
    answers retried. Any other failure, or a 503 REGISTER_TRIES times over, ends the bench."""
    first_beat = heartbeat_bodies()[0].encode()
    retried = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=32), headers=HEADERS) as session:
        limit = asyncio.Semaphore(32)

        async def post(what: str, url: str, **body) -> str | None:
            """None once answered 200, else why not."""
            nonlocal retried
            for attempt in range(1, REGISTER_TRIES + 1):
                async with session.post(url, **body) as answer:
                    if answer.status == 200:
                        return None
                    text = (await answer.text())[:300]
                if answer.status != 503 or attempt == REGISTER_TRIES:
                    return f"{what}: {answer.status} {text}"
                retried += 1
            return None

        async def one(number: int) -> str | None:
            url = urls[number % len(urls)]
            async with limit:
                registration = harness.registration(node_id(number), pools=2)
                failed = await post(
                    f"register {node_id(number)}", f"{url}/v2/nodes/register", json=registration
                )
                beat_url = f"{url}/v2/nodes/{node_id(number)}/heartbeat"
                return failed or await post(f"heartbeat {node_id(number)}", beat_url, data=first_beat)

        failures = [why for why in await asyncio.gather(*(one(n) for n in range(nodes))) if why]
    if failures:
        sys.exit(f"bench: {len(failures)} nodes could not register, the first: {failures[0]}")
    return retried


def online_on(url: str) -> int:
    return harness.online_count(url, TEST_TOKEN)


def listed_on(url: str) -> int:
    """How many nodes a replica lists, whatever their status."""
    request = urllib.request.Request(url + "/v2/nodes", headers={"Authorization": f"Bearer {TEST_TOKEN}"})
    with urllib.request.urlopen(request, timeout=60) as answer:
        return json.load(answer)["count"]


@dataclass
class DatabaseCounters:
    commits: int
    rows_written: int  # inserted + updated + deleted, every table of the daemon's database
    node_rows_updated: int
    wal_bytes: int
    server_cpu_s: float


def database_counters(server, database_name: str) -> DatabaseCounters:
    """The database's cumulative counters now. The statistics are those the server has flushed: a busy
    backend reports at most a second late, so each phase runs for many seconds."""
    (row,) = server.sql(
        database_name,
        "SELECT d.xact_commit, d.tup_inserted + d.tup_updated + d.tup_deleted, t.n_tup_upd, "
        "pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint "
        "FROM pg_stat_database d, pg_stat_user_tables t "
        "WHERE d.datname = current_database() AND t.relname = 'nodes'",
    )
    return DatabaseCounters(*row, server_cpu_s=postgres.server_cpu_s(server))


def measure_phase(name: str, replicas, server, database_name: str, run, fatal: bool = True) -> None:
    """Runs `run()` (a function returning Sent, or None for a quiet spell) and prints what it cost."""
    cpu_before = [harness.process_cpu_s(r.proc.pid) for r in replicas]
    db_before = database_counters(server, database_name)
    started = time.monotonic()
    sent = run()
    elapsed = time.monotonic() - started
    cpu = [harness.process_cpu_s(r.proc.pid) - b for r, b in zip(replicas, cpu_before, strict=True)]
    db_after = database_counters(server, database_name)
    print(f"== {name}: {elapsed:.1f} s, load average {os.getloadavg()[0]:.2f}")
    if sent is None:
        for number, seconds in enumerate(cpu, 1):
            print(f"  replica {number}: {seconds / elapsed:.3f} cores doing nothing but polling")
    else:
        total = sum(sent.answered)
        print(
            f"  {total} heartbeats answered ({total / elapsed:.0f}/s), {sent.failed} failed "
            f"{dict(sent.why.most_common(3))}; generator "
            f"{sent.generator_cpu_s / elapsed:.2f} cores, at worst {sent.max_late_s:.2f} s behind schedule"
        )
        for number, (seconds, took) in enumerate(zip(cpu, sent.answered, strict=True), 1):
            learnt = total - took
            per_taken = f"{seconds / took * 1e6:.0f} us per heartbeat it took" if took else "took none"
            print(
                f"  replica {number}: took {took} over HTTP, learnt {learnt} from the database; "
                f"{seconds / elapsed:.3f} cores; {seconds / total * 1e6:.0f} us per heartbeat in the "
                f"cluster; {per_taken}"
            )
        if sent.failed and fatal:
            sys.exit(f"bench: {name}: {sent.failed} heartbeats were not answered 200; no figure printed")
    print(
        f"  database: {(db_after.commits - db_before.commits) / elapsed:.1f} transactions/s committed "
        f"(reads included), {(db_after.rows_written - db_before.rows_written) / elapsed:.0f} rows "
        f"written/s ({(db_after.node_rows_updated - db_before.node_rows_updated) / elapsed:.0f} node "
        f"rows), WAL {(db_after.wal_bytes - db_before.wal_bytes) / elapsed / 1e6:.2f} MB/s, server CPU "
        f"{(db_after.server_cpu_s - db_before.server_cpu_s) / elapsed:.2f} cores"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--interval", type=float, default=5.0, help="heartbeat interval in s (default 5)")
    parser.add_argument("--seconds", type=float, default=20, help="each phase's length (default 20)")
    parser.add_argument("--quiet-seconds", type=float, default=5, help="the quiet spell (default 5)")
    args = parser.parse_args()
    rate = args.nodes / args.interval
    print(
        f"{args.nodes} nodes, one heartbeat each every {args.interval:g} s ({rate:.0f}/s offered), two "
        f"replicas, {harness.machine_note()}"
    )
    server = postgres.start(durable=True)
    workdir = server.root / "bench"
    try:
        database = fresh_database(server, workdir / "db")
        database_name = urlsplit(database["db_url"]).path.lstrip("/")
        settings = {
            "heartbeat_interval_ms": int(args.interval * 1000),
            # Far beyond the shipped 3 intervals: registering 10,000 nodes one commit at a time takes
            # minutes here, and nodes registered first must not go offline meanwhile. Each node going
            # offline and back costs the gateway's routing table a rebuild of every pool serving its
            # model (routing.py), which at 10,000 nodes saturates a replica for minutes: a figure for a
            # cluster coming back, not for the steady state this bench measures.
            "node_timeout_ms": NODE_TIMEOUT_MS,
            "max_nodes": max(args.nodes, 1),
            "log_level": "warning",
        }
        replicas = [
            make_daemon(workdir / name, **database, **settings).start() for name in ("first", "second")
        ]
        urls = [r.url for r in replicas]
        try:
            started = time.monotonic()
            retried = asyncio.run(register(urls, args.nodes))
            print(
                f"registered {args.nodes} nodes, half on each replica, "
                f"in {time.monotonic() - started:.1f} s; {retried} answers 503 (the database busy) retried"
            )
            # Each replica learns the other's registrations from the change log: wait until both list
            # every node before anything is measured.
            for url in urls:
                wait_until(
                    lambda url=url: listed_on(url) == args.nodes, timeout=60, interval=1, what=f"all on {url}"
                )

            def quiet() -> None:
                time.sleep(args.quiet_seconds)

            def phase(owner: list[int], seconds: float = args.seconds):
                return lambda: asyncio.run(drive(urls, owner, args.interval, seconds))

            # One interval to open the connections and settle every node's readings on both replicas.
            measure_phase(
                "warm-up (not a figure)",
                replicas,
                server,
                database_name,
                phase([n % 2 for n in range(args.nodes)], args.interval),
                fatal=False,
            )
            measure_phase("first only", replicas, server, database_name, phase([0] * args.nodes))
            measure_phase(
                "spread", replicas, server, database_name, phase([n % 2 for n in range(args.nodes)])
            )
            # Last, so that nothing from the registration (the other replica's records still being taken
            # in) counts as the cost of doing nothing; after the batches of the phase before (written
            # within a second, the statistics flushed within another) are out of the way.
            time.sleep(2)
            measure_phase("quiet", replicas, server, database_name, quiet)
            online = [online_on(url) for url in urls]
        finally:
            for replica in replicas:
                replica.stop()
    finally:
        server.stop()
        shutil.rmtree(server.root, ignore_errors=True)
    print(f"online at the end: {online[0]} on the first replica, {online[1]} on the second, of {args.nodes}")
    if online != [args.nodes, args.nodes]:
        sys.exit("bench: a replica lists nodes offline: the heartbeats did not keep up")


if __name__ == "__main__":
    main()

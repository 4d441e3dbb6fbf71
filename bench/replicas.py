"""What a second replica costs: two orchestratord replicas on one throwaway PostgreSQL (Debian's server,
as the tests start it). NODES nodes heartbeat once a second to the FIRST replica only; the second
replica learns every heartbeat from the first one's batched rows. Prints, per replica, the CPU per
heartbeat (the first takes the HTTP request, the second reads the row), how many nodes each lists
online, and the node rows per second the database takes.

    python bench/replicas.py [--nodes 1000] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _orchestratord.harness import process_cpu_s  # noqa: E402
from support import TEST_TOKEN, make_daemon, sample_heartbeat, sample_registration  # noqa: E402
from support_postgres import daemon_sql, fresh_database, start_postgres  # noqa: E402


async def drive(url: str, nodes: int, seconds: float) -> int:
    """Each node's heartbeat once a second, spread over the second; the count answered 200."""
    headers = {"Authorization": f"Bearer {TEST_TOKEN}"}
    body = sample_heartbeat(sample_registration("x"), ["llama"])
    sent = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64), headers=headers) as session:

        async def one(node_id: str) -> int:
            async with session.post(f"{url}/v2/nodes/{node_id}/heartbeat", json=body) as answer:
                return answer.status == 200

        start = time.monotonic()
        while time.monotonic() - start < seconds:
            second = time.monotonic()
            results = await asyncio.gather(*(one(f"n-{n}") for n in range(nodes)))
            sent += sum(results)
            await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - second)))
    return sent


async def register(url: str, nodes: int) -> None:
    headers = {"Authorization": f"Bearer {TEST_TOKEN}"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=32), headers=headers) as session:

        async def one(n: int) -> None:
            async with session.post(f"{url}/v2/nodes/register", json=sample_registration(f"n-{n}")) as a:
                assert a.status == 200, await a.text()

        await asyncio.gather(*(one(n) for n in range(nodes)))


async def online_on(url: str) -> int:
    headers = {"Authorization": f"Bearer {TEST_TOKEN}"}
    async with (
        aiohttp.ClientSession(headers=headers) as session,
        session.get(f"{url}/v2/nodes?status=online") as answer,
    ):
        return (await answer.json())["count"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=10)
    args = parser.parse_args()
    server = start_postgres()
    workdir = server.root / "bench"
    try:
        database = fresh_database(server, workdir / "db")
        settings = {"node_timeout_ms": 15000, "heartbeat_interval_ms": 1000, "log_level": "warning"}
        first = make_daemon(workdir / "first", **database, **settings).start()
        second = make_daemon(workdir / "second", **database, **settings).start()
        try:
            asyncio.run(register(first.url, args.nodes))
            cpu_before = [process_cpu_s(d.proc.pid) for d in (first, second)]
            rows_before = daemon_sql(
                database, "SELECT n_tup_upd FROM pg_stat_user_tables WHERE relname = 'nodes'"
            )
            started = time.monotonic()
            beats = asyncio.run(drive(first.url, args.nodes, args.seconds))
            elapsed = time.monotonic() - started
            cpu = [process_cpu_s(d.proc.pid) - b for d, b in zip((first, second), cpu_before, strict=True)]
            online = [asyncio.run(online_on(d.url)) for d in (first, second)]
            rows_after = daemon_sql(
                database, "SELECT n_tup_upd FROM pg_stat_user_tables WHERE relname = 'nodes'"
            )
        finally:
            first.stop()
            second.stop()
    finally:
        server.stop()
    print(f"{args.nodes} nodes, {beats} heartbeats in {elapsed:.1f} s, all to the first replica")
    print(f"first replica (takes the HTTP heartbeats): {cpu[0] / beats * 1e6:.0f} us CPU per heartbeat")
    print(f"second replica (reads the rows):           {cpu[1] / beats * 1e6:.0f} us CPU per heartbeat")
    print(f"node rows updated: {(rows_after[0][0] - rows_before[0][0]) / elapsed:.0f} per second")
    print(f"online at the end: {online[0]} on the first replica, {online[1]} on the second")


if __name__ == "__main__":
    main()

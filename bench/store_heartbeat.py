"""Heartbeat throughput: the PostgreSQL-backed orchestratord against the SQLite one, in the same run.

The load is bench/heartbeat.py's (bench/_orchestratord/heartbeat_load.py): 1,000 registered nodes
(2 pools, 3 models each), authenticated heartbeats from 64 connections (wrk, one thread), each changing a
pool's free slots. Two daemons as shipped, the same settings but the store: SQLite (WAL on disk,
synchronous=FULL) and PostgreSQL (Debian's server in a temporary folder, fsync and full-page writes on,
so both pay for their commits). Both batch heartbeats and write them once a second. The daemons and the
PostgreSQL server are pinned to CPU 0, wrk to CPU 1: the database's work competes with its daemon's, the
worst case (a real database has a host of its own). Rounds alternate between the two. Prints req/s,
p50/p99, the daemon's CPU per heartbeat, the PostgreSQL server's, and the ratios PG/SQLite; a round with
any answer that is not 2xx fails the bench instead.

    python bench/store_heartbeat.py [--duration 4] [--rounds 6]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _orchestratord import harness, postgres
from _orchestratord.heartbeat_load import CONNECTIONS, NODES, seed, write_lua
from support_postgres import daemon_sql, fresh_database

SETTINGS = {"node_timeout_ms": 600_000, "heartbeat_interval_ms": 5000}
STORED = "SELECT count(*) FROM nodes WHERE last_heartbeat_at IS NOT NULL"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=int, default=4, help="seconds per measured run (default 4)")
    parser.add_argument("--rounds", type=int, default=6, help="alternating SQLite/PG rounds (default 6)")
    args = parser.parse_args()
    harness.require_tools()
    print(f"store heartbeat benchmark: {NODES} nodes, {CONNECTIONS} connections, {harness.machine_note()}")

    server = postgres.start(durable=True, cpu=harness.SERVER_CPU)
    try:
        with harness.scratch_dir("hb-store-") as scratch, harness.scratch_dir("hb-db-") as db_dir:
            scratch, db_dir = Path(scratch), Path(db_dir)
            (scratch / "sqlite").mkdir()
            database = fresh_database(server, scratch / "pg")
            sqlite_daemon = harness.Daemon(scratch / "sqlite", db_dir, **SETTINGS)
            pg_daemon = harness.Daemon(scratch / "pg", db_dir / "unused", **database, **SETTINGS)
            try:
                for name, daemon in (("SQLite", sqlite_daemon), ("PostgreSQL", pg_daemon)):
                    seconds = seed(daemon)
                    print(f"{name}: registered {NODES} nodes over HTTP in {seconds:.1f} s (each committed)")
                targets = [
                    harness.Target(
                        "orchestratord, SQLite",
                        sqlite_daemon.url,
                        sqlite_daemon.proc.pid,
                        write_lua(scratch / "sqlite.lua", sqlite_daemon.token),
                    ),
                    harness.Target(
                        "orchestratord, PostgreSQL",
                        pg_daemon.url,
                        pg_daemon.proc.pid,
                        write_lua(scratch / "pg.lua", pg_daemon.token),
                    ),
                ]
                pg_cpu_before = postgres.server_cpu_s(server)
                sqlite_runs, pg_runs = harness.alternating_rounds(
                    targets, args.rounds, args.duration, CONNECTIONS
                )
                pg_server_cpu_s = postgres.server_cpu_s(server) - pg_cpu_before
                online = [harness.online_count(d.url, d.token) for d in (sqlite_daemon, pg_daemon)]
            finally:
                sqlite_daemon.stop()
                pg_daemon.stop()
            with sqlite3.connect(db_dir / "registry.db") as db:
                stored = [db.execute(STORED).fetchone()[0], daemon_sql(database, STORED)[0][0]]
    finally:
        server.stop()
        shutil.rmtree(server.root, ignore_errors=True)

    print(f"median of {args.rounds} rounds of {args.duration} s:")
    for target, runs in zip(targets, (sqlite_runs, pg_runs), strict=True):
        print("  " + harness.describe(target.label, harness.median_result(runs)))
    pg_heartbeats = sum(r.requests for r in pg_runs)
    print(
        f"  PostgreSQL server: {pg_server_cpu_s / pg_heartbeats * 1e6:.1f} us CPU per heartbeat taken by its "
        "daemon (over every round, both daemons', and the warm-ups; on CPU 0 with the daemons)"
    )
    pairs = list(zip(pg_runs, sqlite_runs, strict=True))
    ratios = [
        ("throughput PG/SQLite", [p.requests_per_s / s.requests_per_s for p, s in pairs], "goal >= 0.80"),
        ("p99 PG/SQLite", [p.p99_ms / s.p99_ms for p, s in pairs], "lower is better"),
        (
            "daemon CPU per heartbeat PG/SQLite",
            [p.server_cpu_us_per_request / s.server_cpu_us_per_request for p, s in pairs],
            "the daemon process only",
        ),
    ]
    print("ratios, median over the rounds (each round's two runs back to back):")
    for label, values, note in ratios:
        low, high = min(values), max(values)
        print(f"  {label:<36} {statistics.median(values):.2f}  (rounds {low:.2f}-{high:.2f}; {note})")
    print(
        f"  nodes online at the end: SQLite {online[0]}, PostgreSQL {online[1]} of {NODES}; "
        f"heartbeats in the database after stop: SQLite {stored[0]}, PostgreSQL {stored[1]} of {NODES}"
    )
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()

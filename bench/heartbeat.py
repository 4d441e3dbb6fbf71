"""Heartbeat throughput: orchestratord against a bare aiohttp app, in the same run.

1,000 registered nodes (2 pools, 3 models each) send authenticated heartbeats from 64 connections (wrk,
one thread). The daemon runs as shipped: metrics on, SQLite WAL on disk with synchronous=FULL and the
once-a-second batch write. Each heartbeat changes a pool's free slots, so the placement index is
updated on every request. Server pinned to CPU 0, wrk to CPU 1. Prints req/s, p50/p99 and ratios; a
round with any answer that is not 2xx fails the bench instead.

    python bench/heartbeat.py [--duration 4] [--rounds 6]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _orchestratord import harness
from _orchestratord.heartbeat_load import (  # noqa: F401  (tls_heartbeat.py takes these from here)
    CONNECTIONS,
    NODES,
    SLOT_STEPS,
    heartbeat_bodies,
    seed,
    write_lua,
)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=int, default=4, help="seconds per measured run (default 4)")
    parser.add_argument("--rounds", type=int, default=6, help="alternating daemon/bare rounds (default 6)")
    args = parser.parse_args()
    harness.require_tools()
    print(f"heartbeat benchmark: {NODES} nodes, {CONNECTIONS} connections, {harness.machine_note()}")

    with harness.scratch_dir("hb-bench-") as scratch, harness.scratch_dir("hb-db-", memory=False) as db_dir:
        scratch, db_dir = Path(scratch), Path(db_dir)
        daemon = harness.Daemon(scratch, db_dir, node_timeout_ms=600_000, heartbeat_interval_ms=5000)
        bare = harness.BareApp("heartbeat")
        try:
            seconds = seed(daemon)
            print(f"registered {NODES} nodes over HTTP in {seconds:.1f} s (each registration fsynced)")
            daemon_script = write_lua(scratch / "daemon.lua", daemon.token)
            bare_script = write_lua(scratch / "bare.lua", None)
            daemon_runs, bare_runs = harness.paired_rounds(
                daemon, daemon_script, bare, bare_script, args.rounds, args.duration, CONNECTIONS
            )
            online = harness.online_count(daemon.url, daemon.token)
        finally:
            daemon.stop()
            bare.stop()
        stored = stored_heartbeats(db_dir / "registry.db")

    ours, floor = harness.median_result(daemon_runs), harness.median_result(bare_runs)
    print(f"median of {args.rounds} rounds of {args.duration} s:")
    print("  " + harness.describe("orchestratord", ours))
    print("  " + harness.describe("bare aiohttp", floor))
    pairs = list(zip(daemon_runs, bare_runs, strict=True))
    ratios = [
        ("throughput daemon/bare", [d.requests_per_s / b.requests_per_s for d, b in pairs], "goal >= 0.90"),
        ("p99 daemon/bare", [d.p99_ms / b.p99_ms for d, b in pairs], "goal <= 2.00"),
        (
            "CPU efficiency daemon/bare",
            [b.server_cpu_us_per_request / d.server_cpu_us_per_request for d, b in pairs],
            "bare's CPU per request / the daemon's",
        ),
    ]
    print("ratios, median over the rounds (each round's two runs back to back):")
    for label, values, note in ratios:
        print(f"  {label:<28} {statistics.median(values):.2f}  ({note})")
    print(
        f"  nodes online at the end: {online} of {NODES}; heartbeats on disk after stop: {stored} of {NODES}"
    )


def stored_heartbeats(db_path: Path) -> int:
    import sqlite3

    with sqlite3.connect(db_path) as db:
        return db.execute("SELECT count(*) FROM nodes WHERE last_heartbeat_at IS NOT NULL").fetchone()[0]


if __name__ == "__main__":
    main()

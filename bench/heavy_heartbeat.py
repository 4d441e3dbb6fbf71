"""Do heartbeats with large model lists from a few nodes delay everyone else's?

1,000 ordinary nodes (2 pools, 3 models each) heartbeat through wrk (one thread, 16 connections) while, in
the second phase of each round, a dozen heavy nodes each report 2 pools holding max_models_per_node (4,096)
models, as fast as one connection per node allows (or every --heavy-interval-ms), their free slots
changing on every heartbeat, with a placement for one of their models after each (every placement brings
the index up to date, so the heavy nodes' index work is done in full, not coalesced). Prints the ordinary
nodes' p50/p99 without and with the heavy nodes, round by round, and the heavy nodes' own rate. Server
pinned to CPU 0, load to CPU 1. Any answer that is not 2xx (ordinary or heavy, heartbeat or placement)
fails the bench instead of printing a figure.

    python bench/heavy_heartbeat.py [--duration 4] [--rounds 3] [--heavy-nodes 12] [--heavy-interval-ms 0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _orchestratord import harness

NODES = 1000
CONNECTIONS = 16
MODELS = ["llama-3.1-8b", "qwen2.5-7b", "mistral-7b"]
HEAVY_MODELS = [f"org-{n // 64}/model-{n}:q4_k_m" for n in range(4096)]  # max_models_per_node's default


def ordinary_body(step: int) -> dict:
    return harness.heartbeat_body(
        [
            harness.pool_status("pool-0", 8 - step % 5, 60, MODELS),
            harness.pool_status("pool-1", 8, 70, MODELS),
        ]
    )


def heavy_body(step: int) -> bytes:
    pools = [harness.pool_status(f"pool-{p}", step % 8 + 1, 60, HEAVY_MODELS) for p in range(2)]
    return json.dumps(harness.heartbeat_body(pools)).encode()


def write_lua(path: Path, token: str) -> Path:
    bodies = ", ".join(harness.lua_string(json.dumps(ordinary_body(step))) for step in range(5))
    path.write_text(
        f"""
local ids = {{}}
for i = 0, {NODES - 1} do ids[#ids + 1] = string.format("bench-%04d", i) end
local bodies = {{ {bodies} }}
local counter = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = {harness.lua_string("Bearer " + token)}
request = function()
  local node = counter % {NODES}
  counter = counter + 1
  local body = bodies[(math.floor(counter / {NODES}) % 5) + 1]
  return wrk.format(nil, "/v2/nodes/" .. ids[node + 1] .. "/heartbeat", nil, body)
end
"""
    )
    path.chmod(0o600)
    return path


class HeavySender:
    """The heavy nodes' heartbeats (and a placement after each) from a thread, until stopped."""

    def __init__(self, url: str, token: str, node_ids: list[str], interval_s: float) -> None:
        self.url, self.node_ids, self.interval_s = url, node_ids, interval_s
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self.bodies = [heavy_body(step) for step in range(8)]
        self.sent = 0
        self.failures: list[str] = []  # "POST <path>: <status>", the first few kept for the message
        self.failed = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> HeavySender:
        self.started = time.perf_counter()
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.thread.join(timeout=60)
        self.seconds = time.perf_counter() - self.started
        if self.thread.is_alive():
            raise harness.BenchFailed("bench: the heavy nodes' sender did not stop within 60 s")

    def _check(self, what: str, status: int) -> None:
        if not 200 <= status < 300:
            self.failed += 1
            if len(self.failures) < 3:
                self.failures.append(f"{what}: {status}")

    def raise_if_failed(self, label: str) -> None:
        """A heavy phase with a refused heartbeat or placement measured the error path: fail the bench."""
        if self.failed:
            raise harness.BenchFailed(
                f"bench: {label}: {self.failed} heavy-node answers were not 2xx (first: "
                f"{'; '.join(self.failures)}); a failed round prints no figure"
            )

    async def _run(self) -> None:
        async with aiohttp.ClientSession(headers=self.headers) as session:
            await asyncio.gather(*(self._one(session, node_id) for node_id in self.node_ids))

    async def _one(self, session: aiohttp.ClientSession, node_id: str) -> None:
        step = 0
        placement = json.dumps({"model_id": HEAVY_MODELS[-1]}).encode()
        while not self.stopping.is_set():
            step += 1
            async with session.post(
                f"{self.url}/v2/nodes/{node_id}/heartbeat", data=self.bodies[step % 8]
            ) as answer:
                await answer.read()
                self.sent += 1
                self._check(f"heartbeat of {node_id}", answer.status)
            async with session.post(f"{self.url}/v2/placement", data=placement) as answer:
                await answer.read()
                self._check("placement", answer.status)
            if self.interval_s:
                await asyncio.sleep(self.interval_s)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=int, default=4, help="seconds per measured run (default 4)")
    parser.add_argument("--rounds", type=int, default=3, help="quiet/heavy round pairs (default 3)")
    parser.add_argument("--heavy-nodes", type=int, default=12, help="nodes with large model lists")
    parser.add_argument(
        "--heavy-interval-ms",
        type=int,
        default=0,
        help="pause between one heavy node's heartbeats (default 0: as fast as it can; agents use 5000)",
    )
    args = parser.parse_args()
    harness.require_tools()
    os.sched_setaffinity(0, {int(harness.LOAD_CPU)})  # the heavy sender shares the load generator's core
    print(
        f"heavy-heartbeat benchmark: {NODES} ordinary nodes ({CONNECTIONS} connections), {args.heavy_nodes} "
        f"heavy nodes of 2 x {len(HEAVY_MODELS)} models, {harness.machine_note()}"
    )
    with harness.scratch_dir("hh-bench-") as scratch, harness.scratch_dir("hh-db-") as db_dir:
        scratch, db_dir = Path(scratch), Path(db_dir)
        daemon = harness.Daemon(scratch, db_dir, node_timeout_ms=600_000, heartbeat_interval_ms=5000)
        try:
            heavy_ids = [f"heavy-{n:02d}" for n in range(args.heavy_nodes)]
            nodes = [
                (harness.registration(f"bench-{n:04d}", pools=2), ordinary_body(0)) for n in range(NODES)
            ]
            nodes += [
                (harness.registration(node_id, pools=2), json.loads(heavy_body(0))) for node_id in heavy_ids
            ]
            harness.seed_nodes(daemon.url, daemon.token, nodes)
            script = write_lua(scratch / "ordinary.lua", daemon.token)
            harness.run_wrk(daemon.url, script, 2, CONNECTIONS, daemon.proc.pid, "warm-up")
            quiet, loaded, heavy_rates = [], [], []
            for round_number in range(1, args.rounds + 1):
                label = f"round {round_number}"
                quiet.append(
                    harness.run_wrk(
                        daemon.url, script, args.duration, CONNECTIONS, daemon.proc.pid, f"{label}, alone"
                    )
                )
                with HeavySender(daemon.url, daemon.token, heavy_ids, args.heavy_interval_ms / 1000) as heavy:
                    loaded.append(
                        harness.run_wrk(
                            daemon.url, script, args.duration, CONNECTIONS, daemon.proc.pid, f"{label}, heavy"
                        )
                    )
                heavy.raise_if_failed(f"{label}, heavy nodes")
                heavy_rates.append(heavy.sent / heavy.seconds)
                print(f"round {round_number}:")
                print("  " + harness.describe("ordinary, alone", quiet[-1]))
                print("  " + harness.describe("ordinary, with heavy", loaded[-1]))
                print(
                    f"  heavy nodes: {heavy.sent} heartbeats ({heavy_rates[-1]:.0f}/s, each followed by a "
                    "placement), every answer 2xx"
                )
        finally:
            daemon.stop()
    alone, with_heavy = harness.median_result(quiet), harness.median_result(loaded)
    print(f"median of {args.rounds} rounds of {args.duration} s:")
    print("  " + harness.describe("ordinary, alone", alone))
    print("  " + harness.describe("ordinary, with heavy", with_heavy))
    print(f"  heavy heartbeats per second: {statistics.median(heavy_rates):.0f}")
    print(
        f"  ordinary p99 with heavy nodes / alone: {with_heavy.p99_ms / alone.p99_ms:.2f} "
        f"(p50 {with_heavy.p50_ms / alone.p50_ms:.2f})"
    )


if __name__ == "__main__":
    main()

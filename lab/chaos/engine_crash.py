"""An engine crashes (kill -9 of llama-server under its unit) on one pool while serving.

Checked: the pool out of placement within one heartbeat (the agent beats at once on the change), systemd
brings the engine back (a new MainPID) and the pool is ready again, clients see at most the requests in
flight on it (its slots plus the gateway's engine backlog).
"""

from __future__ import annotations

import time

from common import Context, Row, heartbeat_s, poll, seconds

POOL_UNIT = "llorch-engine@gpus01"
IN_FLIGHT_MAX = 2 + 1  # the lab engine's parallel slots + gateway_engine_backlog


def serving(ctx: Context, node: str) -> bool:
    pools = (ctx.lab.node(node) or {}).get("pools") or [{}]
    engine = pools[0].get("engine") or {}
    return bool(pools[0].get("ready")) and engine.get("state") == "ready"


def run(ctx: Context) -> list[Row]:
    lab = ctx.lab
    node = lab.gpu_nodes[0]
    beat = heartbeat_s(lab)
    before = lab.unit_show(node, POOL_UNIT)
    killed_at = time.monotonic()
    lab.run_in(node, "systemctl", "kill", "-s", "KILL", POOL_UNIT)
    out = poll(lambda: not serving(ctx, node), 2 * beat, 0.05)
    back = poll(lambda: serving(ctx, node), 120, 0.2)
    after = lab.unit_show(node, POOL_UNIT)
    end = time.monotonic()
    ctx.load.settled(end)
    clients = ctx.load.window(killed_at, end)
    restarted = after.get("MainPID") != before.get("MainPID") and after.get("ActiveState") == "active"
    return [
        Row(
            f"engine kill -9 on {node}",
            f"out of placement <= 1 heartbeat ({beat:g} s); back by systemd; "
            f"<= {IN_FLIGHT_MAX} client errors",
            f"out {seconds(out)}; ready again {seconds(back)}; restarted {restarted}; "
            f"clients: {clients.summary()}",
            out is not None
            and out <= beat
            and back is not None
            and restarted
            and len(clients.errors) <= IN_FLIGHT_MAX,
        )
    ]

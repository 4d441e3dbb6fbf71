"""A GPU node reboots: its container restarted (podman restart: systemd shuts down, boots again).

Checked: every service back by itself (pool-managerd and the engine active, started after the reboot), the
node online with its pool ready, its model still staged (in the node's models), clients served by the
other node meanwhile (errors at most the requests in flight on it).
"""

from __future__ import annotations

import subprocess
import time

from common import Context, Row, poll, seconds

UNITS = ("pool-managerd", "llorch-engine@gpus01")
IN_FLIGHT_MAX = 2 + 1  # the engine's slots + gateway_engine_backlog


def serving(ctx: Context, node: str) -> bool:
    view = ctx.lab.node(node) or {}
    pools = view.get("pools") or [{}]
    return view.get("status") == "online" and bool(pools[0].get("ready"))


def run(ctx: Context) -> list[Row]:
    lab = ctx.lab
    node = lab.gpu_nodes[0]
    model = lab.model()
    before = {unit: lab.unit_show(node, unit).get("ActiveEnterTimestamp") for unit in UNITS}
    registered_before = (lab.node(node) or {}).get("registered_at")
    rebooted_at = time.monotonic()
    subprocess.run(["podman", "restart", "-t", "30", node], check=True, capture_output=True, timeout=120)
    restarted_s = time.monotonic() - rebooted_at
    # Served again by the rebooted node: registered anew (the agent deregisters as it stops), pool ready.
    poll(
        lambda: serving(ctx, node) and (lab.node(node) or {}).get("registered_at") != registered_before,
        300,
        0.5,
    )
    back = time.monotonic() - rebooted_at if serving(ctx, node) else None
    after = {unit: lab.unit_show(node, unit) for unit in UNITS}
    view = lab.node(node) or {}
    end = time.monotonic()
    started_again = all(
        after[unit].get("ActiveState") == "active" and after[unit].get("ActiveEnterTimestamp") != before[unit]
        for unit in UNITS
    )
    staged = model in str(view.get("models"))
    ctx.load.settled(end)
    clients = ctx.load.window(rebooted_at, end)
    return [
        Row(
            f"reboot {node}",
            "services back by themselves, node online and ready, model staged; "
            f"<= {IN_FLIGHT_MAX} client errors",
            f"online and ready {seconds(back)} after the reboot began (podman restart: {restarted_s:.1f} s); "
            f"services started again {started_again}; "
            f"{model} staged {staged}; clients: {clients.summary()}",
            back is not None and started_again and staged and len(clients.errors) <= IN_FLIGHT_MAX,
        )
    ]

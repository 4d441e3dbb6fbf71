"""A GPU falls off the bus while serving: the stand-in nvidia-smi of one node turns into a hung machine.

The stand-in replays its fixture afresh at every call; a `hang-seconds` file renamed into the fixture makes
every call block, as nvidia-smi does inside a driver whose GPU fell off the bus (files/testing/README.md).
Checked: the node's pool reports not ready within the agent's GPU probe interval + its timeout + one
heartbeat, the node stays online throughout, clients see no error (routed to the other node), and once the
file is gone the pool is ready again within one probe interval + one heartbeat.
"""

from __future__ import annotations

import time

from common import Context, Row, heartbeat_s, poll, seconds

FIXTURE = "/usr/local/share/nvidia-smi-standin/lab-2x-l4"
# pool-managerd's defaults, which the lab keeps: gpu_probe_interval_s, gpu_probe_timeout_s.
PROBE_INTERVAL_S, PROBE_TIMEOUT_S = 15.0, 10.0


def pool_ready(ctx: Context, node: str) -> bool:
    return bool(((ctx.lab.node(node) or {}).get("pools") or [{}])[0].get("ready"))


def run(ctx: Context) -> list[Row]:
    lab = ctx.lab
    node = lab.gpu_nodes[0]
    beat = heartbeat_s(lab)
    statuses: set[str] = set()

    def watch(predicate) -> bool:
        statuses.add(str((lab.node(node) or {}).get("status")))
        return predicate()

    hung_at = time.monotonic()
    lab.run_in(node, "sh", "-c", f"echo 600 > {FIXTURE}/.hang && mv {FIXTURE}/.hang {FIXTURE}/hang-seconds")
    try:
        out_limit = PROBE_INTERVAL_S + PROBE_TIMEOUT_S + beat
        out = poll(lambda: watch(lambda: not pool_ready(ctx, node)), out_limit + 10, 0.5)
        time.sleep(beat)  # clients meet the pool out for a heartbeat
    finally:
        lab.run_in(node, "rm", "-f", f"{FIXTURE}/hang-seconds")
    back_limit = PROBE_INTERVAL_S + PROBE_TIMEOUT_S + beat  # a probe hung at the fix runs out its timeout
    back = poll(lambda: watch(lambda: pool_ready(ctx, node)), back_limit + 20, 0.5)
    end = time.monotonic()
    ctx.load.settled(end)
    clients = ctx.load.window(hung_at, end)
    return [
        Row(
            f"GPU hung on {node}",
            f"pool not ready <= {out_limit:g} s, node online, no client error; back <= {back_limit:g} s",
            f"not ready {seconds(out)}; node status seen {sorted(statuses)}; ready again {seconds(back)} "
            f"after the fix; clients: {clients.summary()}",
            out is not None
            and out <= out_limit
            and statuses == {"online"}
            and back is not None
            and back <= back_limit
            and not clients.errors,
        )
    ]

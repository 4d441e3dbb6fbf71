"""An engine hangs (SIGSTOP of llama-server: alive, answering nothing) on one pool while serving, then thaws.

Checked: the pool out of placement within the agent's engine timeout + poll + one heartbeat (it beats at
once on the change), the node online throughout, clients see at most the requests in flight on it (its
slots plus the gateway's engine backlog), and once thawed (SIGCONT) the pool is ready again within a
heartbeat. systemd does not restart a hung process (no watchdog): the hang ends here by the thaw.
"""

from __future__ import annotations

import time

from common import Context, Row, heartbeat_s, poll, seconds
from engine_crash import IN_FLIGHT_MAX, POOL_UNIT, serving

# pool-managerd's defaults, which the lab keeps: engine_timeout_s, engine_poll_interval_s.
ENGINE_TIMEOUT_S, ENGINE_POLL_S = 2.0, 1.0


def run(ctx: Context) -> list[Row]:
    lab = ctx.lab
    node = lab.gpu_nodes[0]
    beat = heartbeat_s(lab)
    out_limit = ENGINE_TIMEOUT_S + ENGINE_POLL_S + 1.0  # +1 s: the beat at once and this poll
    statuses: set[str] = set()

    def watch(predicate) -> bool:
        statuses.add(str((lab.node(node) or {}).get("status")))
        return predicate()

    hung_at = time.monotonic()
    lab.run_in(node, "systemctl", "kill", "-s", "STOP", POOL_UNIT)
    try:
        out = poll(lambda: watch(lambda: not serving(ctx, node)), out_limit + 10, 0.1)
        time.sleep(beat)  # clients meet the pool out for a heartbeat
    finally:
        thawed_at = time.monotonic()
        lab.run_in(node, "systemctl", "kill", "-s", "CONT", POOL_UNIT)
    back = poll(lambda: watch(lambda: serving(ctx, node)), 60, 0.1)
    end = time.monotonic()
    ctx.load.settled(end)
    clients = ctx.load.window(hung_at, end)
    slowest = max((r.seconds for r in ctx.load.window(hung_at, thawed_at).requests), default=0.0)
    return [
        Row(
            f"engine hung (SIGSTOP) on {node}",
            f"out of placement <= {out_limit:g} s, node online, <= {IN_FLIGHT_MAX} client errors; "
            f"ready <= {beat:g} s after the thaw",
            f"out {seconds(out)}; node status seen {sorted(statuses)}; ready {seconds(back)} after the "
            f"thaw; clients: {clients.summary()} (slowest {slowest:.1f} s)",
            out is not None
            and out <= out_limit
            and statuses == {"online"}
            and back is not None
            and back <= beat
            and len(clients.errors) <= IN_FLIGHT_MAX,
        )
    ]

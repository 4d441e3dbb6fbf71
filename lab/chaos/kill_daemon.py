"""kill -9 orchestratord under a swarm of simulated agents (pool-managerd's own loop) and client load.

systemd restarts it (Restart=on-failure, RestartSec=2). Checked: a new MainPID, no registration or drain
lost, every node (the swarm's and the lab's) heard again within two heartbeats of the daemon answering,
and the peak rate of agent requests at recovery against the steady rate (buckets of a tenth of a
heartbeat, at least 200 requests each: bench/_chaos/swarm.py).
"""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor

from _chaos.swarm import Swarm, first_answer_after, herd_bucket_s, node_id, rate_per_s
from common import Context, Row, heartbeat_s, poll, seconds


def nodes(ctx: Context) -> dict[str, dict]:
    answer = ctx.lab.api("GET", "/v2/nodes", timeout=30)
    return {n["node_id"]: n for n in answer.body["nodes"]} if answer.status == 200 else {}


def run(ctx: Context) -> list[Row]:
    lab, size = ctx.lab, ctx.swarm_size
    beat = heartbeat_s(lab)
    bucket_s = herd_bucket_s(beat, size)
    drained = [node_id(n) for n in range(0, size, max(1, size // 10))]
    swarm = Swarm(lab.control_url, lab.api_token, size, start_over_s=beat, ca_file=lab.ca_file).start()
    try:
        joined_at = time.monotonic()
        if poll(lambda: len(first_answer_after(swarm.sent, joined_at)) == size, 120, 0.5) is None:
            return [Row("kill -9 orchestratord", "swarm joins", "the swarm did not join in 120 s", False)]
        for name in drained:
            lab.api("POST", f"/v2/nodes/{name}/drain", {"drain": True})
        steady_from = time.monotonic()
        time.sleep(2 * beat)
        steady = rate_per_s(swarm.sent, steady_from, time.monotonic(), bucket_s)
        before, unit_before = nodes(ctx), lab.unit_show(lab.control, "orchestratord")

        killed_at = time.monotonic()
        lab.run_in(lab.control, "systemctl", "kill", "-s", "KILL", "orchestratord")
        down = poll(lambda: lab.api("GET", "/health", timeout=1).status == 200, 60, 0.1)
        back_at = time.monotonic()
        poll(lambda: len(first_answer_after(swarm.sent, killed_at)) == size, 4 * beat, 0.2)
        time.sleep(max(0.0, back_at + 2 * beat - time.monotonic()))
        recovery = rate_per_s(swarm.sent, back_at, back_at + 2 * beat, bucket_s)
        first = first_answer_after(swarm.sent, killed_at)
        after, unit_after = nodes(ctx), lab.unit_show(lab.control, "orchestratord")
    finally:
        swarm.stop()
        with ThreadPoolExecutor(8) as pool:  # the swarm's nodes leave the lab's registry
            list(pool.map(lambda n: lab.api("DELETE", f"/v2/nodes/{node_id(n)}"), range(size)))
    ctx.load.settled(back_at + 2 * beat)
    clients = ctx.load.window(killed_at, back_at + 2 * beat)

    returns = sorted(t - back_at for t in first.values())
    lost = set(before) - set(after)
    undrained = [n for n in drained if not after.get(n, {}).get("drain")]
    real_online = all(after.get(n, {}).get("status") == "online" for n in lab.gpu_nodes)
    restarted = unit_after.get("MainPID") != unit_before.get("MainPID")
    last = returns[-1] if len(returns) == size else None
    steady_rate, peak = statistics.mean(steady), max(recovery)
    return [
        Row(
            f"kill -9 orchestratord ({size} agents + lab)",
            f"restarted by systemd; nothing lost; every node back <= 2 heartbeats ({2 * beat:g} s)",
            f"down {seconds(down)}; lost {len(lost)} nodes, {len(undrained)} drains; last node back "
            f"{seconds(last)}; lab nodes online {real_online}; clients: {clients.summary()}",
            restarted
            and not lost
            and not undrained
            and real_online
            and last is not None
            and last <= 2 * beat,
        ),
        Row(
            "kill -9: no herd at recovery",
            "agents' peak req/s at recovery <= 2x steady",
            f"peak {peak:.0f} vs steady {steady_rate:.0f} req/s ({peak / steady_rate:.2f}x; "
            f"buckets of {bucket_s:g} s)",
            peak <= 2 * steady_rate,
        ),
    ]

"""Partition a GPU node: its container taken off the lab network (podman network disconnect), then put back.

Checked: offline after node_timeout_ms (within one heartbeat), out of placement meanwhile, no client error
once it is offline (new requests go to the other node), failed requests failing fast; healed: online within
one heartbeat, and no service restarted anywhere (the same MainPIDs).
"""

from __future__ import annotations

import subprocess
import time

from common import Context, Row, heartbeat_s, node_timeout_s, poll, seconds

UNITS = ("pool-managerd", "llorch-engine@gpus01")
# A request in flight on the node when it is cut cannot end before the registry declares the node offline
# (up to node_timeout_ms after the cut: bytes are held, not refused); from then it must end (retried on the
# other node or failed) within this: one sweep of the registry (at most 1 s) and the retry.
FAIL_FAST_S = 3.0


def status(ctx: Context, node: str) -> str | None:
    return (ctx.lab.node(node) or {}).get("status")


def run(ctx: Context) -> list[Row]:
    lab = ctx.lab
    node, other = lab.gpu_nodes[0], lab.gpu_nodes[1]
    beat, timeout = heartbeat_s(lab), node_timeout_s(lab)
    pids = {unit: lab.unit_show(node, unit).get("MainPID") for unit in UNITS}
    daemon_pid = lab.unit_show(lab.control, "orchestratord").get("MainPID")

    cut_at = time.monotonic()
    subprocess.run(["podman", "network", "disconnect", lab.network, node], check=True, capture_output=True)
    try:
        offline = poll(lambda: status(ctx, node) == "offline", timeout + 3 * beat, 0.2)
        offline_at = time.monotonic()
        placements = [
            (lab.api("POST", "/v2/placement", {"model_id": lab.model()}).body or {}).get("node_id")
            for _ in range(5)
        ]
        time.sleep(beat)  # clients meet the node offline for a heartbeat
    finally:
        healed_at = time.monotonic()
        subprocess.run(
            ["podman", "network", "connect", "--ip", lab.hosts[node], lab.network, node],
            check=True,
            capture_output=True,
        )
    online = poll(lambda: status(ctx, node) == "online", 120, 0.2)
    same = {unit: lab.unit_show(node, unit).get("MainPID") for unit in UNITS} == pids
    same = same and lab.unit_show(lab.control, "orchestratord").get("MainPID") == daemon_pid

    ctx.load.settled(healed_at)
    before_offline = ctx.load.window(cut_at, offline_at)
    while_offline = ctx.load.window(offline_at, healed_at)
    slowest = max((r.seconds for r in before_offline.requests), default=0.0)
    # How long after the node went offline the last request caught on it ended (0: none was left).
    lingered = max((r.ended_at - offline_at for r in before_offline.requests), default=0.0)
    on_time = offline is not None and timeout - beat <= offline <= timeout + beat
    return [
        Row(
            f"partition {node}",
            f"offline after {timeout:g} s +/- {beat:g}; placed elsewhere; requests caught on it end "
            f"< {FAIL_FAST_S:g} s after it is offline; no client error once offline",
            f"offline {seconds(offline)}; placements {sorted(set(map(str, placements)))}; clients until "
            f"offline: {before_offline.summary()} (slowest {slowest:.1f} s, the last ended {lingered:.1f} s "
            f"after offline); while offline: {while_offline.summary()}",
            on_time and set(placements) == {other} and lingered < FAIL_FAST_S and not while_offline.errors,
        ),
        Row(
            f"partition {node} healed",
            f"online <= 1 heartbeat ({beat:g} s); nothing restarted",
            f"online {seconds(online)} after the heal; same MainPIDs {same}",
            online is not None and online <= beat and same,
        ),
    ]

"""The control host's disk fills up under the running daemon.

The container's root is this machine's disk, so the lab never fills that: the daemon is stopped cleanly
(its WAL checkpointed away), its state folder is moved onto a 64 MiB tmpfs mounted in its place, the daemon
started again, and a filler file then takes every free byte. Checked: a write (a registration) answers 503
STORE_UNAVAILABLE; heartbeats and placement keep working from memory (both lab nodes online, heard, placed;
clients served); once the filler is gone the same write succeeds, and nothing was lost (every node, every
drain flag). Afterwards the state goes back to the disk, the tmpfs away, the daemon started as before.
"""

from __future__ import annotations

import time

from common import Context, Row, heartbeat_s, poll, seconds

STATE = "/var/lib/orchestratord"
COPY = "/root/chaos-orchestratord-state"
PROBE = "chaos-disk-probe"


def probe_registration() -> dict:
    """A node that registers only to prove a write; deleted at the end."""
    gpu = {
        "index": 0,
        "uuid": "GPU-chaos-disk-probe",
        "name": "NVIDIA L4",
        "vram_total_bytes": 24 * 1024**3,
        "compute_capability": "8.9",
        "driver_version": "550.90.07",
    }
    return {
        "node_id": PROBE,
        "machine_id": "chaos-disk-probe",
        "address": "http://chaos-disk-probe.lab:8000",
        "version": "0.1.0",
        "pools": [{"pool_id": "p0", "gpus": [0], "slots_total": 1}],
        "capabilities": {"gpus": [gpu], "cuda_version": "12.4", "cpu_cores": 1, "ram_total_bytes": 1024**3},
    }


def shell(ctx: Context, script: str) -> None:
    done = ctx.lab.run_in(ctx.lab.control, "sh", "-ec", script, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(
            f"on {ctx.lab.control}: {script.split(chr(10))[0]}...: {done.stderr.strip()[:200]}"
        )


def nodes(ctx: Context) -> dict[str, dict]:
    answer = ctx.lab.api("GET", "/v2/nodes", timeout=30)
    return {n["node_id"]: n for n in answer.body["nodes"]} if answer.status == 200 else {}


def up(ctx: Context) -> bool:
    return poll(lambda: ctx.lab.api("GET", "/health", timeout=1).status == 200, 60, 0.2) is not None


def run(ctx: Context) -> list[Row]:
    lab = ctx.lab
    beat = heartbeat_s(lab)
    shell(
        ctx,
        f"""systemctl stop orchestratord
        rm -rf {COPY} && cp -a {STATE} {COPY}
        mount -t tmpfs -o size=64m,mode=0750 tmpfs {STATE}
        cp -a {COPY}/. {STATE}/ && chown orchestratord:orchestratord {STATE}
        systemctl start orchestratord""",
    )
    try:
        if (
            not up(ctx)
            or poll(lambda: all((lab.node(n) or {}).get("status") == "online" for n in lab.gpu_nodes), 60)
            is None
        ):
            return [
                Row("control host disk full", "the daemon up on the small disk", "it did not come up", False)
            ]
        before = nodes(ctx)
        shell(ctx, f"dd if=/dev/zero of={STATE}/filler bs=1M 2>/dev/null || true")
        full_at = time.monotonic()
        refused = lab.api("POST", "/v2/nodes/register", probe_registration())
        heard = {n: (lab.node(n) or {}).get("last_heartbeat_at") for n in lab.gpu_nodes}
        time.sleep(2 * beat)  # heartbeats and clients for two heartbeats on the full disk
        still = {n: lab.node(n) or {} for n in lab.gpu_nodes}
        beating = all(
            still[n].get("status") == "online" and still[n].get("last_heartbeat_at") != heard[n]
            for n in heard
        )
        placed = lab.api("POST", "/v2/placement", {"model_id": lab.model()}).status == 200
        freed_at = time.monotonic()
        shell(ctx, f"rm -f {STATE}/filler")
        written = poll(
            lambda: lab.api("POST", "/v2/nodes/register", probe_registration()).status in (200, 201), 30
        )
        after = nodes(ctx)
    finally:
        lab.api("DELETE", f"/v2/nodes/{PROBE}")
        shell(
            ctx,
            f"""rm -f {STATE}/filler
            systemctl stop orchestratord
            rm -rf {COPY} && cp -a {STATE} {COPY}
            umount {STATE}
            cp -a {COPY}/. {STATE}/ && rm -rf {COPY}
            systemctl start orchestratord""",
        )
        up(ctx)
    ctx.load.settled(freed_at)
    clients = ctx.load.window(full_at, freed_at)
    code = (refused.body or {}).get("code") if isinstance(refused.body, dict) else None
    kept = set(before) <= set(after) and all(after[n]["drain"] == before[n]["drain"] for n in before)
    return [
        Row(
            "control host disk full",
            "writes 503 STORE_UNAVAILABLE; heartbeats, placement, clients work; the write works once freed; "
            "nothing lost",
            f"write: {refused.status} {code}; heartbeats on {beating}; placement {placed}; clients: "
            f"{clients.summary()}; the write worked {seconds(written)} after freeing; nothing lost {kept}",
            refused.status == 503
            and code == "STORE_UNAVAILABLE"
            and beating
            and placed
            and not clients.errors
            and written is not None
            and kept,
        )
    ]

"""Stop the replicas' PostgreSQL (fast shutdown) for about ten seconds, longer than a heartbeat and shorter
than node_timeout, then start it again, under the swarm and registry clients (replicas_ha.py, loopback).

Checked while it is away: a drain answers 503 STORE_UNAVAILABLE on both replicas (never 401, never 500),
the swarm's heartbeats keep answering 200, placements keep working from memory (no client error), no node
offline on either replica (a gap in the database pauses liveness decisions). After: a drain works on both
within a few seconds, nothing lost, both replicas list the same nodes with the same statuses.
"""

from __future__ import annotations

import time
from collections import Counter

from _chaos.swarm import node_id
from common import Context, Row, poll, seconds
from replicas_ha import AFTER_S, HEARTBEAT_S, NODE_TIMEOUT_S, SERVED, loopback, statuses

AWAY_S = 10.0
BACK_S = 10.0  # a drain works again within this of the server's start


def run(ctx: Context) -> list[Row]:
    size = ctx.swarm_size
    with loopback(size) as lb:
        a, b = lb.replicas
        drained = [node_id(n) for n in range(0, size, 10)]  # every tenth node
        for name in drained:
            lb.drain(a, name)
        time.sleep(HEARTBEAT_S)
        before = statuses(lb.nodes(b))

        stopped_at = time.monotonic()
        lb.server.stop()  # pg_ctl -m fast: the backends end, the replicas' connections with them
        drains: Counter = Counter()  # (replica, status code) of the drains tried while it is away
        offline, probe_node = 0, 1
        while time.monotonic() - stopped_at < AWAY_S:
            for name, replica in (("A", a), ("B", b)):
                status, code = lb.drain(replica, node_id(probe_node))
                drains[f"{name} {status} {code}".strip()] += 1
                offline = max(offline, len(lb.nodes(replica, "offline") or {}))
            probe_node = (probe_node + 2) % size
            time.sleep(0.5)
        started_at = time.monotonic()
        lb.server.start()  # pg_ctl -w: returns once the server takes connections
        up = time.monotonic() - started_at
        back = poll(lambda: lb.drain(a, node_id(3))[0] == 200 and lb.drain(b, node_id(5))[0] == 200, 30, 0.2)
        agree = poll(lambda: (shown := statuses(lb.nodes(a))) and shown == statuses(lb.nodes(b)), 30, 0.2)
        after_a, after_b = statuses(lb.nodes(a)), statuses(lb.nodes(b))
        time.sleep(max(0.0, started_at + AFTER_S - time.monotonic()))  # a window of clients after
        end = time.monotonic()
        lb.clients.settled(end)
        away = lb.clients.window(stopped_at, started_at)
        after = lb.clients.window(started_at, end)
        beats = [s for s in lb.swarm.sent if stopped_at <= s.at < started_at and s.kind == "heartbeat"]

    beats_bad = Counter(str(s.status) for s in beats if s.status != 200)
    refused_right = all(key.split()[1:] == ["503", "STORE_UNAVAILABLE"] for key in drains)
    lost = set(before) - set(after_b)
    kept = [n for n in drained if after_b.get(n, (None, False))[1]]
    return [
        Row(
            f"PostgreSQL away {AWAY_S:g} s ({size} agents, 2 replicas, loopback)",
            f"drains 503 STORE_UNAVAILABLE on both; heartbeats 200; placements 0 errors; none offline "
            f"(node_timeout {NODE_TIMEOUT_S:g} s)",
            f"drains: {dict(drains)}; heartbeats {len(beats) - sum(beats_bad.values())}/{len(beats)} 200"
            f"{f' {dict(beats_bad)}' if beats_bad else ''}; offline at worst {offline}; clients: "
            f"{away.summary()}",
            len(before) == size + len(SERVED)
            and refused_right
            and bool(drains)
            and bool(beats)
            and not beats_bad
            and offline == 0
            and not away.errors,
        ),
        Row(
            "PostgreSQL back",
            f"a drain works on both <= {BACK_S:g} s; nothing lost; replicas agree",
            f"server up in {up:.1f} s, then a drain works on both after {seconds(back)}; agree after "
            f"{seconds(agree)}; lost {len(lost)} of {len(before)} nodes, "
            f"{len(drained) - len(kept)} of {len(drained)} drains ({len(after_a)} vs {len(after_b)} nodes); "
            f"clients after: {after.summary()}",
            back is not None
            and back <= BACK_S
            and agree is not None
            and not lost
            and len(kept) == len(drained)
            and after_a == after_b
            and not after.errors,
        ),
    ]

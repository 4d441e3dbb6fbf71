"""kill -9 one of two orchestratord replicas under the swarm and registry clients, keep it down longer than
two heartbeats, start it again (replicas_ha.py: on loopback, nothing here is systemd's).

Checked: every node whose agent listed A first heartbeats on B within two heartbeats of the kill (the last
such node's first 200 from B), no node offline on B meanwhile (polled every half second), nothing lost (every
node and every drain still on B), the clients' errors at most the requests in flight at the kill, and A,
started again, lists the same nodes with the same statuses as B within a few seconds.
"""

from __future__ import annotations

import time

from _chaos.swarm import node_id
from common import Context, Row, poll, seconds
from replicas_ha import AFTER_S, HEARTBEAT_S, SERVED, loopback, probe, statuses

DOWN_S = 2.5 * HEARTBEAT_S  # longer than two heartbeats
AGREE_S = 2.0  # A back: it lists what B lists within this (it reads the database at start: 0.1 s measured)


def run(ctx: Context) -> list[Row]:
    size = ctx.swarm_size
    with loopback(size) as lb:
        a, b = lb.replicas
        drained = [node_id(n) for n in range(0, size, 10)]  # every tenth node
        for name in drained:
            lb.drain(a if int(name[-4:]) % 2 == 0 else b, name)
        time.sleep(HEARTBEAT_S)  # every agent heard its drain, the clients in their stride
        before = statuses(lb.nodes(b))

        killed_at = time.monotonic()
        a.kill()
        offline_on_b = 0
        while time.monotonic() - killed_at < DOWN_S:
            offline_on_b = max(offline_on_b, len(lb.nodes(b, "offline") or {}))
            time.sleep(0.5)
        moved = {}  # A-first node -> when its first 200 from B came, after the kill
        for s in sorted(lb.swarm.sent, key=lambda s: s.answered_at):
            if s.node % 2 == 0 and s.at >= killed_at and s.status == 200 and s.url == b.url:
                moved.setdefault(s.node, s.answered_at - killed_at)
        during = statuses(lb.nodes(b))

        restarted_at = time.monotonic()
        a.start()
        back = time.monotonic() - restarted_at
        agree = poll(lambda: (shown := statuses(lb.nodes(a))) and shown == statuses(lb.nodes(b)), 30, 0.2)
        after_a, after_b = statuses(lb.nodes(a)), statuses(lb.nodes(b))
        time.sleep(max(0.0, restarted_at + AFTER_S - time.monotonic()))  # a window of clients after
        end = time.monotonic()
        lb.clients.settled(end)
        in_flight = lb.clients.in_flight(killed_at)  # once settled: a request is recorded when it ends
        down = lb.clients.window(killed_at, restarted_at)
        after = lb.clients.window(restarted_at, end)
        alive = probe(a) and probe(b)

    a_first = size - size // 2
    last = max(moved.values()) if len(moved) == a_first else None
    lost = set(before) - set(during)
    undrained = [n for n in drained if not during.get(n, (None, False))[1]]
    return [
        Row(
            f"kill -9 replica A ({size} agents, 2 replicas, loopback)",
            f"A's agents on B <= 2 heartbeats ({2 * HEARTBEAT_S:g} s); none offline; nothing lost; "
            f"client errors <= in flight at the kill",
            f"last of {len(moved)}/{a_first} A-first nodes on B after {seconds(last)}; offline on B at "
            f"worst {offline_on_b}; lost {len(lost)} of {len(before)} nodes, {len(undrained)} of "
            f"{len(drained)} drains; "
            f"clients while A down: {down.summary()} ({in_flight} in flight at the kill)",
            len(before) == size + len(SERVED)
            and last is not None
            and last <= 2 * HEARTBEAT_S
            and offline_on_b == 0
            and not lost
            and not undrained
            and len(down.errors) <= in_flight,
        ),
        Row(
            "replica A started again",
            f"lists B's nodes and statuses within {AGREE_S:g} s; clients fine",
            f"answering after {back:.1f} s, agrees with B after {seconds(agree)} "
            f"({len(after_a)} vs {len(after_b)} nodes); clients after: {after.summary()}",
            alive and agree is not None and agree <= AGREE_S and after_a == after_b and not after.errors,
        ),
    ]

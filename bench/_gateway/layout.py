"""Which CPUs run what: the server under test, the stand-in engine, the load generators.

The layout adapts to the CPUs this process may use. With 4 or more, each part has its own; the load is
split over several generator processes so no single Python process has to keep the whole rate.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

MAX_GENERATORS = 6


@dataclass(frozen=True)
class Layout:
    server: str  # taskset list for the proxy or the daemon (one CPU: the daemon is one process)
    upstream: list[str]  # one stand-in engine process per entry, all on one port (SO_REUSEPORT)
    load: list[str]  # one load-generator process per entry
    shared: bool  # whether some parts share a CPU (then the figures measure contention too)

    def describe(self) -> str:
        note = "; parts share CPUs: expect contention in every figure" if self.shared else ""
        return (
            f"CPU layout: server (proxy / orchestratord) on {self.server}, stand-in engine on "
            f"{', '.join(self.upstream)}, {len(self.load)} load generator(s) on {', '.join(self.load)}{note}"
        )


def plan(cpus: list[int] | None = None) -> Layout:
    cpus = sorted(cpus if cpus is not None else os.sched_getaffinity(0))
    names = [str(cpu) for cpu in cpus]
    if len(names) == 1:
        return Layout(names[0], names[:1], names[:1], shared=True)
    if len(names) == 2:
        return Layout(names[0], names[1:], names[1:], shared=True)
    if len(names) == 3:
        return Layout(names[0], names[1:2], names[2:], shared=False)
    # Two engine processes from 8 CPUs up: the direct leg must not be held back by the stand-in itself.
    upstream = names[1:3] if len(names) >= 8 else names[1:2]
    rest = names[1 + len(upstream) :]
    return Layout(names[0], upstream, rest[:MAX_GENERATORS], shared=False)

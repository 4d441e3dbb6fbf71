"""What every chaos scenario shares: the table's row, the run's context, polling with a deadline."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from _chaos.load import ClientLoad
from target import Lab


@dataclass(frozen=True)
class Row:
    scenario: str
    expected: str
    measured: str
    ok: bool


@dataclass
class Context:
    lab: Lab
    load: ClientLoad
    away_s: float  # how long "daemon away" keeps orchestratord stopped
    swarm_size: int
    tasks_rate: float = 1000.0  # the first row's placements a second


def poll(predicate: Callable[[], Any], timeout_s: float, interval_s: float = 0.2) -> float | None:
    """Seconds until `predicate` held, polled from now; None when it did not within `timeout_s`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if predicate():
            return time.monotonic() - start
        time.sleep(interval_s)
    return None


def heartbeat_s(lab: Lab) -> float:
    """The heartbeat interval the lab's orchestratord asks for (a registration's answer is not needed:
    the node view's agents follow it; read from the daemon's settings in the lab's config)."""
    shown = lab.run_in(lab.control, "cat", "/etc/llorch/orchestratord.yml")
    for line in shown.stdout.splitlines():
        if line.startswith("heartbeat_interval_ms:"):
            return int(line.split(":", 1)[1]) / 1000
    return 5.0


def node_timeout_s(lab: Lab) -> float:
    shown = lab.run_in(lab.control, "cat", "/etc/llorch/orchestratord.yml")
    for line in shown.stdout.splitlines():
        if line.startswith("node_timeout_ms:"):
            return int(line.split(":", 1)[1]) / 1000
    return 15.0


def seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:.1f} s"

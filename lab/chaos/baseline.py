"""The first row, before any fault: the client load alone through the gateway, its P50/P95/P99."""

from __future__ import annotations

import time

from common import Context, Row

BASELINE_S = 20


def run(ctx: Context) -> list[Row]:
    start = time.monotonic()
    time.sleep(BASELINE_S)
    end = time.monotonic()
    ctx.load.settled(end)
    window = ctx.load.window(start, end)
    rate = len(window.requests) / BASELINE_S
    return [
        Row(
            f"load alone ({rate:.1f} req/s, {BASELINE_S} s)",
            "every request served",
            window.summary(),
            bool(window.requests) and not window.errors,
        )
    ]

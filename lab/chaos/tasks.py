"""The first row, before any fault: 1,000 tasks a second (placement requests, open loop) for 30 s against the
lab's orchestratord over HTTPS, P50/P95/P99, with a reader credential issued for the run and revoked after it
(what a scheduler would hold: it may read and ask for placements, nothing more)."""

from __future__ import annotations

import time

from _chaos.tasks import run_tasks
from common import Context, Row

TASKS_S = 30


def run(ctx: Context) -> list[Row]:
    lab, rate = ctx.lab, ctx.tasks_rate
    name = f"chaos-tasks-{int(time.time())}"
    issued = lab.api("POST", "/v2/credentials", {"name": name, "scope": "reader", "ttl_s": 3600})
    if issued.status != 201:
        return [Row("tasks", "a reader credential", f"POST /v2/credentials answered {issued.status}", False)]
    try:
        tasks = run_tasks(
            lab.control_url.rstrip("/") + "/v2/placement",
            issued.body["secret"],
            {"model_id": lab.model()},
            rate,
            TASKS_S,
            lab.ssl_context(),
        )
    finally:
        lab.api("DELETE", f"/v2/credentials/{name}")
    answered_rate = tasks.answered / tasks.seconds
    return [
        Row(
            f"{rate:g} tasks/s ({TASKS_S} s, placements, open loop)",
            f"every task answered 200 at >= {0.98 * rate:g}/s; generator on schedule (lag P99 < 50 ms)",
            tasks.summary(),
            not tasks.errors and answered_rate >= 0.98 * rate and tasks.percentile(tasks.lag_ms, 0.99) < 50,
        )
    ]

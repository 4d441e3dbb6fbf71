"""orchestratord away (stopped) for --away-s seconds (60 by default) under a swarm and client load.

Checked: the agents back off with jitter and return spread out, every one within the agent's backoff cap
(backoff_max_s, 30 s) of the daemon answering (the distribution of their return is printed); clients are
never left hanging: with no daemon, nothing answers 503 in the lab (no proxy stands in front of it), so
each request must fail fast, and the first after the return is served.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from _chaos.swarm import Swarm, first_answer_after, node_id
from common import Context, Row, heartbeat_s, poll, seconds

AGENT_BACKOFF_MAX_S = 30.0  # pool-managerd's backoff_max_s default, which the lab keeps
FAIL_FAST_S = 1.0


def run(ctx: Context) -> list[Row]:
    lab, size = ctx.lab, ctx.swarm_size
    beat = heartbeat_s(lab)
    swarm = Swarm(lab.control_url, lab.api_token, size, start_over_s=beat, ca_file=lab.ca_file).start()
    try:
        joined_at = time.monotonic()
        if poll(lambda: len(first_answer_after(swarm.sent, joined_at)) == size, 120, 0.5) is None:
            return [Row("daemon away", "swarm joins", "the swarm did not join in 120 s", False)]
        stopped_at = time.monotonic()
        lab.run_in(lab.control, "systemctl", "stop", "orchestratord")
        time.sleep(ctx.away_s)
        lab.run_in(lab.control, "systemctl", "start", "orchestratord")
        up = poll(lambda: lab.api("GET", "/health", timeout=1).status == 200, 60, 0.1)
        back_at = time.monotonic()
        poll(lambda: len(first_answer_after(swarm.sent, stopped_at)) == size, AGENT_BACKOFF_MAX_S + 2 * beat)
        first = first_answer_after(swarm.sent, stopped_at)
    finally:
        swarm.stop()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda n: lab.api("DELETE", f"/v2/nodes/{node_id(n)}"), range(size)))
    # The clients' view two to four heartbeats after the return: wait until that window has passed (the
    # agents may all be back long before it ends) and its requests have ended.
    time.sleep(max(0.0, back_at + 4 * beat - time.monotonic()))
    ctx.load.settled(back_at + 4 * beat)
    away = ctx.load.window(stopped_at + 1, back_at)  # from a second in: requests in flight at the stop aside
    after = ctx.load.window(back_at + 2 * beat, back_at + 4 * beat)
    hung = [r for r in away.errors if r.seconds > FAIL_FAST_S]
    returns = sorted(t - back_at for t in first.values())

    def at(fraction: float) -> str:
        return f"{returns[min(len(returns) - 1, int(fraction * len(returns)))]:.1f}" if returns else "-"

    everyone = len(returns) == size and returns[-1] <= AGENT_BACKOFF_MAX_S + beat
    return [
        Row(
            f"daemon away {ctx.away_s:g} s ({size} agents)",
            f"agents return jittered, all <= {AGENT_BACKOFF_MAX_S:g} s; "
            f"clients fail fast (< {FAIL_FAST_S:g} s)",
            f"daemon up {seconds(up)} after start; agents back p10/p50/p90/max {at(0.1)}/{at(0.5)}/{at(0.9)}/"
            f"{at(1.0)} s ({len(returns)}/{size}); clients away: {away.summary()}, {len(hung)} slower than "
            f"{FAIL_FAST_S:g} s; 2 heartbeats later: {after.summary()}",
            everyone and not hung and bool(after.requests) and not after.errors,
        )
    ]

"""An open-loop load of placement requests ("tasks"): `rate` a second for `seconds`, each on its own schedule
whatever the answers take, so a slow server shows as latency, never as a lower offered rate."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from dataclasses import dataclass

import aiohttp


@dataclass
class TaskRun:
    offered: int
    answered: int
    errors: dict[str, int]
    seconds: float
    latencies_ms: list[float]
    lag_ms: list[float]  # how late each request left against its schedule: the generator's own health

    def percentile(self, values: list[float], fraction: float) -> float:
        if not values:
            return float("nan")
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]

    def summary(self) -> str:
        errors = ", ".join(f"{n}x {what}" for what, n in sorted(self.errors.items(), key=lambda i: -i[1])[:3])
        p50, p95, p99 = (self.percentile(self.latencies_ms, f) for f in (0.5, 0.95, 0.99))
        return (
            f"{self.answered / self.seconds:.0f} answered/s of {self.offered / self.seconds:.0f} offered, "
            f"{sum(self.errors.values())} err{f' ({errors})' if errors else ''}, P50/P95/P99 "
            f"{p50:.1f}/{p95:.1f}/{p99:.1f} ms, generator lag P99 {self.percentile(self.lag_ms, 0.99):.1f} ms"
        )


async def _run(url: str, token: str, body: dict, rate: float, seconds: float, context, connections: int):
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    data = json.dumps(body).encode()
    latencies, lags, errors = [], [], {}
    answered = 0
    connector = aiohttp.TCPConnector(ssl=context if context else False, limit=connections)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(due: float) -> None:
            nonlocal answered
            sent = time.monotonic()
            lags.append((sent - due) * 1000)
            try:
                async with session.post(url, data=data, headers=headers) as answer:
                    await answer.read()
                    if answer.status == 200:
                        answered += 1
                        latencies.append((time.monotonic() - sent) * 1000)
                    else:
                        errors[f"status {answer.status}"] = errors.get(f"status {answer.status}", 0) + 1
            except (aiohttp.ClientError, OSError, TimeoutError) as error:
                errors[type(error).__name__] = errors.get(type(error).__name__, 0) + 1

        started = time.monotonic()
        total = int(rate * seconds)
        pending = set()
        for number in range(total):
            due = started + number / rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(due))
            pending.add(task)
            task.add_done_callback(pending.discard)
        if pending:
            await asyncio.wait(pending, timeout=15)
        elapsed = max(seconds, time.monotonic() - started)
    return TaskRun(total, answered, errors, elapsed, latencies, lags)


def run_tasks(
    url: str,
    token: str,
    body: dict,
    rate: float,
    seconds: float,
    context: ssl.SSLContext | None = None,
    connections: int = 64,
) -> TaskRun:
    """`rate` POSTs a second of `body` to `url` for `seconds`, over at most `connections` kept-alive ones."""
    return asyncio.run(_run(url, token, body, rate, seconds, context, connections))

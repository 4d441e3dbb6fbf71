"""Client load through the gateway during a chaos run: an open loop of chat completions, each one timed.

Open loop, as bench/_gateway/loadgen.py: request i leaves at start + i / rate whatever became of the ones
before it, so an outage meets the arrivals it would meet in production (no coordinated omission). Each
request is recorded with when it left and ended and what came back (a status, a Retry-After, or the error
that came instead), so every scenario can read what clients saw in its own window: errors, P50/P95/P99.
Runs in its own thread; the key reaches no argv and no log.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import threading
import time
from collections import Counter
from dataclasses import dataclass

import aiohttp

# A served answer holds at least this (a non-streamed chat completion names its choices).
SERVED_MARKER = b'"choices"'


@dataclass(frozen=True)
class Request:
    sent_at: float  # time.monotonic()
    ended_at: float
    status: int | None  # None: no HTTP answer
    outcome: str  # "ok", "status 503 CODE", or the error that came instead of an answer
    retry_after: str | None = None

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"

    @property
    def seconds(self) -> float:
        return self.ended_at - self.sent_at


@dataclass(frozen=True)
class Window:
    """What the clients saw over [start, end): the requests sent in it."""

    requests: list[Request]

    @property
    def errors(self) -> list[Request]:
        return [r for r in self.requests if not r.ok]

    def percentile_ms(self, fraction: float) -> float:
        times = sorted(r.seconds * 1000 for r in self.requests if r.ok)
        if not times:
            return float("nan")
        return times[min(len(times) - 1, int(fraction * len(times)))]

    def summary(self) -> str:
        counted = Counter(r.outcome for r in self.errors)
        errors = ", ".join(f"{n}x {what}" for what, n in counted.most_common(3))
        return (
            f"{len(self.requests)} req, {len(self.errors)} err{f' ({errors})' if errors else ''}, "
            f"P50/P95/P99 {self.percentile_ms(0.5):.0f}/{self.percentile_ms(0.95):.0f}/"
            f"{self.percentile_ms(0.99):.0f} ms"
        )


class ClientLoad:
    """`rate` chat completions a second to `url`/v1/chat/completions with `key`, until stopped."""

    def __init__(
        self,
        url: str,
        key: str,
        model: str,
        rate: float,
        ssl_context: ssl.SSLContext | None = None,
        max_tokens: int = 4,
        timeout_s: float = 60,
    ):
        self.requests: list[Request] = []  # appended by the load's loop, read by other threads
        self._sent_at: list[float] = []  # every request's departure, ended or not
        self._url = url.rstrip("/") + "/v1/chat/completions"
        self._headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        self._body = json.dumps(
            {"model": model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": "Chaos?"}]}
        ).encode()
        self._rate = rate
        self._ssl = ssl_context
        self._timeout_s = timeout_s
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="client-load", daemon=True)
        self._stopping: asyncio.Event | None = None

    async def _one(self, session: aiohttp.ClientSession) -> None:
        sent = time.monotonic()
        self._sent_at.append(sent)
        status, retry_after = None, None
        try:
            async with session.post(self._url, data=self._body, headers=self._headers) as answer:
                status, retry_after = answer.status, answer.headers.get("Retry-After")
                raw = await answer.content.read(1 << 20)
            if status == 200 and SERVED_MARKER in raw:
                outcome = "ok"
            else:
                try:
                    code = json.loads(raw).get("error", {}).get("code") or ""
                except (ValueError, AttributeError):
                    code = ""
                outcome = f"status {status} {code}".strip()
        except TimeoutError:
            outcome = f"no answer in {self._timeout_s:g} s"
        except (aiohttp.ClientError, OSError) as error:
            outcome = type(error).__name__
        self.requests.append(Request(sent, time.monotonic(), status, outcome, retry_after))

    async def _main(self) -> None:
        self._stopping = asyncio.Event()
        timeout = aiohttp.ClientTimeout(total=self._timeout_s)
        connector = aiohttp.TCPConnector(ssl=self._ssl) if self._ssl else aiohttp.TCPConnector()
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            started, number, pending = time.monotonic(), 0, set()
            while not self._stopping.is_set():
                due = started + number / self._rate
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), max(0.0, due - time.monotonic()))
                if self._stopping.is_set():
                    break
                task = asyncio.create_task(self._one(session))
                pending.add(task)
                task.add_done_callback(pending.discard)
                number += 1
            if pending:
                await asyncio.wait(pending, timeout=self._timeout_s)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main())
        self._loop.close()

    def start(self) -> ClientLoad:
        self._thread.start()
        return self

    def stop(self) -> None:
        while self._stopping is None:  # the loop has not begun yet
            time.sleep(0.01)
        self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(self._timeout_s + 10)

    def window(self, start: float, end: float) -> Window:
        return Window([r for r in list(self.requests) if start <= r.sent_at < end])

    def settled(self, until: float, timeout_s: float = 70) -> None:
        """Wait until every request sent before `until` has ended, so that a window's figures are whole."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            left = sum(t < until for t in list(self._sent_at))
            if sum(r.sent_at < until for r in list(self.requests)) >= left:
                return
            time.sleep(0.2)

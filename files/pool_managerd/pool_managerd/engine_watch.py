"""Watching each pool's engine: its own answers, read on a short interval, off the heartbeat's path.

Every `interval` the watcher reads each engine's health, and for a healthy one its slots, metrics and (once
per start) version, all at once and each within a time and a byte bound. Heartbeats only take the last
reading, so a hung engine never delays one; it shows as `dead` once a read runs past its timeout.

States (the contract's ENGINE_STATES): dead (no answer, or an answer that is no health status), loading
(health 503), ready (healthy, an idle slot), busy (healthy, every slot processing). An engine whose health
is 200 but whose slots cannot be read (a wrong key: 401) reports busy with no free slot: it answers, but
nothing says a request would find a slot, so placement skips it and a drain keeps waiting.

One log line per change between serving (ready or busy) and not serving, naming the pool, the engine and
the cause; ready <-> busy changes with the load and are logged at debug level only.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from .contract import ENGINE_SERVING_STATES, shown
from .control import TooLarge, read_bounded
from .engine_config import EngineFile
from .engines import EngineAnswerError, adapter_for
from .wire import EngineStatus

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineReading:
    """What a heartbeat reports of one pool's engine."""

    status: EngineStatus
    slots_total: int
    slots_free: int

    @property
    def serving(self) -> bool:
        return self.status.state in ENGINE_SERVING_STATES


class Unusable(Exception):
    """An engine answer the watcher cannot use; the message says why in a few words."""


class EngineWatch:
    """The last reading of one pool's engine, and the poll that renews it."""

    def __init__(self, engine: EngineFile, on_serving_change: Callable[[], None] | None = None):
        self.engine = engine
        # Called when the engine starts or stops serving: the agent sends a heartbeat at once, so the
        # registry learns it within one watch interval rather than up to a heartbeat later.
        self.on_serving_change = on_serving_change
        self.adapter = adapter_for(engine.kind)
        self.state: str | None = None  # None until the first poll: reported as dead
        self.cause = "not read yet"
        self.slots_free = engine.parallel
        self.version: str | None = None
        self.requests_deferred: int | None = None
        self.slots_problem = ""  # why /slots of a healthy engine cannot be read; "" while it can

    def reading(self) -> EngineReading:
        state = self.state or "dead"
        serving = state in ENGINE_SERVING_STATES
        return EngineReading(
            status=EngineStatus(
                kind=self.engine.kind,
                state=state,
                model_id=self.engine.model_id,
                url=self.engine.url,
                version=self.version,
                requests_deferred=self.requests_deferred if serving else None,
            ),
            slots_total=self.engine.parallel,
            # An engine that does not serve has nothing in flight: every slot is free, so that a drain's
            # "free == total means idle" holds for a dead engine too.
            slots_free=self.slots_free if serving else self.engine.parallel,
        )

    async def _get(
        self, session: aiohttp.ClientSession, path: str, limit: int, timeout: aiohttp.ClientTimeout
    ) -> tuple[int, bytes]:
        async with session.get(self.engine.url + path, allow_redirects=False, timeout=timeout) as response:
            if response.headers.get("Content-Encoding", "identity").lower() != "identity":
                raise Unusable("a compressed answer (not asked for)")
            try:
                return response.status, await read_bounded(response, limit)
            except TooLarge as error:
                raise Unusable(str(error)) from None

    async def poll(self, session: aiohttp.ClientSession, timeout_s: float) -> None:
        """Read the engine once and move to the state its answers say; never raises for what it reads."""
        limits = self.adapter.limits
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        try:
            status, _body = await self._get(session, self.adapter.health_path, limits.health_bytes, timeout)
        except TimeoutError:
            self._enter("dead", "no answer within the timeout: hung or overloaded")
            return
        except aiohttp.ClientConnectorError as error:
            self._enter("dead", f"cannot connect ({error.os_error.strerror or error.os_error})")
            return
        except (aiohttp.ClientError, OSError, ValueError, Unusable) as error:
            self._enter("dead", f"{type(error).__name__}: {shown(str(error), 120)}")
            return
        health = self.adapter.health(status)
        if health == "loading":
            self._enter("loading", f"{self.adapter.health_path} answers HTTP {status}: loading its model")
            return
        if health != "healthy":
            self._enter("dead", f"{self.adapter.health_path} answers HTTP {status}")
            return
        was_serving = self.state in ENGINE_SERVING_STATES
        reads = [
            self._read(session, self.adapter.slots_path, limits.slots_bytes, timeout, self.adapter.slots),
            self._read(
                session, self.adapter.metrics_path, limits.metrics_bytes, timeout, self.adapter.metrics
            ),
        ]
        if not was_serving:  # a (re)started engine may be another build: read its version again
            reads.append(
                self._read(
                    session, self.adapter.props_path, limits.props_bytes, timeout, self.adapter.version
                )
            )
        (slots, slots_problem), (metrics, metrics_problem), *props = await asyncio.gather(*reads)
        if metrics is None:
            log.debug("engine of pool %s: metrics unreadable (%s)", self.engine.pool_id, metrics_problem)
        self.requests_deferred = metrics.requests_deferred if metrics is not None else None
        if props:
            self.version = props[0][0]
        if slots_problem != self.slots_problem:  # one line when it starts and one when it ends
            if slots_problem:
                log.warning(
                    "engine of pool %s: healthy but its slots cannot be read (%s); reporting no free slot",
                    self.engine.pool_id,
                    slots_problem,
                )
            else:
                log.info("engine of pool %s: its slots can be read again", self.engine.pool_id)
            self.slots_problem = slots_problem
        if slots is None:
            self.slots_free = 0
            self._enter("busy", f"healthy but its slots cannot be read ({slots_problem}); no free slot")
            return
        self.slots_free = min(slots.idle, self.engine.parallel)
        if slots.idle == 0:
            self._enter("busy", f"every one of its {slots.total} slots is processing")
        else:
            self._enter("ready", f"healthy, {slots.idle} of {slots.total} slots idle")

    async def _read(
        self, session: aiohttp.ClientSession, path: str, limit: int, timeout: aiohttp.ClientTimeout, parse
    ) -> tuple[Any, str]:
        """(parse(body), "") of a 200 answer, or (None, why there is none)."""
        try:
            status, body = await self._get(session, path, limit, timeout)
        except TimeoutError:
            return None, f"{path}: no answer within the timeout"
        except (aiohttp.ClientError, OSError, ValueError, Unusable) as error:
            return None, f"{path}: {type(error).__name__}: {shown(str(error), 120)}"
        if status == 401:
            return None, f"{path} answers HTTP 401: the engine refuses the agent's key (engine_api_key_file)"
        if status != 200:
            return None, f"{path} answers HTTP {status}"
        try:
            return parse(body), ""
        except EngineAnswerError as error:
            return None, str(error)

    def _enter(self, state: str, cause: str) -> None:
        before = self.state
        self.state, self.cause = state, cause
        if state == before:
            return
        serving_before = before in ENGINE_SERVING_STATES
        serving_now = state in ENGINE_SERVING_STATES
        what = (
            f"engine of pool {self.engine.pool_id} ({self.engine.kind}, model {self.engine.model_id!r}, "
            f"{self.engine.url}): {before or 'not read yet'} -> {state}"
        )
        if serving_before != serving_now and self.on_serving_change is not None:
            self.on_serving_change()
        if serving_before and serving_now:  # follows the load: not worth a line at info level
            log.debug("%s (%s)", what, cause)
        elif serving_now:
            version = f", version {self.version}" if self.version else ""
            log.info("%s (%s%s); pool serves", what, cause, version)
        elif state == "loading" and not serving_before:  # on its way up
            log.info("%s (%s); pool not ready yet", what, cause)
        else:
            log.warning("%s (%s); pool not ready", what, cause)


def poll_interval_s(configured_s: float, heartbeat_s: float | None) -> float:
    """The watch interval: the configured one, but never above half the heartbeat interval, so a reading
    is at most half a heartbeat old when it is sent."""
    return configured_s if heartbeat_s is None else min(configured_s, heartbeat_s / 2)


async def watch_engines(
    watches: list[EngineWatch],
    key: str,
    configured_interval_s: float,
    timeout_s: float,
    heartbeat_s: Callable[[], float | None],
) -> None:
    """Poll every engine each interval, all at once, until cancelled. `heartbeat_s()` is the agent's
    current heartbeat interval (None before the first registration)."""
    session = aiohttp.ClientSession(
        # Uncompressed only: a small compressed answer must not inflate past the bound in one chunk.
        headers={"Authorization": f"Bearer {key}", "Accept-Encoding": "identity"},
        auto_decompress=False,
        connector=aiohttp.TCPConnector(limit_per_host=4),
    )
    try:
        while True:
            interval = poll_interval_s(configured_interval_s, heartbeat_s())
            # A read never outlasts the interval: a hung engine is dead within two intervals, one heartbeat.
            timeout = min(timeout_s, interval)
            await asyncio.gather(*(watch.poll(session, timeout) for watch in watches))
            await asyncio.sleep(interval)
    finally:
        await session.close()

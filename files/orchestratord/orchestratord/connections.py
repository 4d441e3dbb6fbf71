"""The connection guard: how many connections the daemon holds, and how long one may stay that has not
sent a complete authenticated request.

Without it, ~1,100 idle connections that never send a byte take every file descriptor a unit gets by
default (1024): the daemon stops accepting its own nodes and asyncio logs a traceback per failed accept.
So:
- at start the soft RLIMIT_NOFILE is raised (up to the hard limit) to hold max_connections and the
  daemon's own files; where the hard limit is lower, max_connections shrinks to fit, said in one line;
- a connection that has not presented the token within connection_idle_timeout_ms of opening is closed;
  once a request on it passed the token check, aiohttp's keep-alive timeout applies instead;
- at max_connections, a new connection makes room by closing the oldest not yet authenticated one, so a
  flood of idle sockets cannot lock out real clients; only when every connection is authenticated is
  the newcomer itself closed;
- all of it is logged at most once per LOG_INTERVAL_S, with counts, never once per connection.

aiohttp has no hook per connection, so the guard wraps the server's connection_made/connection_lost:
the one place the daemon reaches past aiohttp's public surface, kept here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import time
from collections.abc import Callable

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

log = logging.getLogger(__name__)

LOG_INTERVAL_S = 60.0
# Descriptors the daemon needs besides connections: the listening socket, SQLite and its WAL, logs,
# the event loop's own, the executor thread's.
RESERVED_FILES = 64


def fit_file_limit(max_connections: int) -> int:
    """Raise the soft open-files limit to hold max_connections; returns the connections that fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max_connections + RESERVED_FILES
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new_soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != resource.RLIM_INFINITY and soft < wanted:
        fitting = max(1, soft - RESERVED_FILES)
        log.warning(
            "open files limited to %d (LimitNOFILE): max_connections lowered from %d to %d",
            soft,
            max_connections,
            fitting,
        )
        return fitting
    return max_connections


class ConnectionGuard:
    def __init__(
        self, max_connections: int, idle_timeout_ms: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_connections = max_connections
        self.idle_timeout_s = idle_timeout_ms / 1000
        self.clock = clock
        self.open_count = 0
        # Connections without an authenticated request yet, oldest first (dicts keep insertion order).
        self.untrusted: dict[RequestHandler, float] = {}
        self._evicted = self._refused = self._timed_out = 0
        self._logged_at = -LOG_INTERVAL_S
        self._reaper: asyncio.Task | None = None
        # Per connection, what to call when its client goes: the gateway's cancel of the request's work.
        self.watchers: dict[RequestHandler, Callable[[], object]] = {}

    def watch(self, connection: RequestHandler, on_lost: Callable[[], object]) -> None:
        """Call `on_lost` if the connection closes before `unwatch`: aiohttp does not cancel a handler
        whose client left (and turning that on for every route would cancel registrations mid-write)."""
        self.watchers[connection] = on_lost

    def unwatch(self, connection: RequestHandler) -> None:
        self.watchers.pop(connection, None)

    def trust(self, connection: RequestHandler) -> None:
        """Called when a request passed the token check: its connection is now the keep-alive timeout's."""
        if self.untrusted:
            self.untrusted.pop(connection, None)

    # --- attached to the server

    def attach(self, server: web.Server) -> None:
        self.max_connections = fit_file_limit(self.max_connections)
        made, lost = server.connection_made, server.connection_lost

        def connection_made(handler: RequestHandler, transport: asyncio.Transport) -> None:
            made(handler, transport)
            self.open_count += 1
            self.untrusted[handler] = self.clock()
            if self.open_count > self.max_connections:
                self._make_room()

        def connection_lost(handler: RequestHandler, exc: BaseException | None = None) -> None:
            lost(handler, exc)
            self.open_count -= 1
            self.untrusted.pop(handler, None)
            if self.watchers:
                on_lost = self.watchers.pop(handler, None)
                if on_lost is not None:
                    on_lost()

        server.connection_made = connection_made  # type: ignore[method-assign]
        server.connection_lost = connection_lost  # type: ignore[method-assign]

    def _make_room(self) -> None:
        # The oldest untrusted one goes; that is the newcomer only when every other one is trusted.
        oldest, newest = next(iter(self.untrusted)), next(reversed(self.untrusted))
        self._close(oldest)
        if oldest is newest:
            self._refused += 1
        else:
            self._evicted += 1
        self._report()

    def _close(self, handler: RequestHandler) -> None:
        # At once, not after "the current request": such a connection has shown no token, and one that
        # trickles a request byte by byte is what this is for.
        del self.untrusted[handler]
        handler.force_close()

    def start(self) -> None:
        self._reaper = asyncio.get_running_loop().create_task(self._reap_forever())

    async def stop(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper

    async def _reap_forever(self) -> None:
        interval_s = min(1.0, self.idle_timeout_s / 4)
        while True:
            await asyncio.sleep(interval_s)
            self.reap()

    def reap(self) -> None:
        """Close untrusted connections past the idle timeout; looks only at the oldest ones."""
        deadline = self.clock() - self.idle_timeout_s
        while self.untrusted:
            handler, opened_at = next(iter(self.untrusted.items()))
            if opened_at > deadline:
                break
            self._close(handler)
            self._timed_out += 1
        if self._timed_out:
            self._report()

    def _report(self) -> None:
        now = self.clock()
        if now - self._logged_at < LOG_INTERVAL_S:
            return
        self._logged_at = now
        parts = []
        if self._evicted or self._refused:
            parts.append(
                f"at max_connections ({self.max_connections}): closed {self._evicted} unauthenticated "
                f"connection(s) to make room, refused {self._refused}"
            )
        if self._timed_out:
            parts.append(
                f"closed {self._timed_out} connection(s) that sent no authenticated request within "
                f"connection_idle_timeout_ms ({self.idle_timeout_s * 1000:.0f})"
            )
        log.warning(
            "connections: %s (next report in %.0f s at the earliest)", "; ".join(parts), LOG_INTERVAL_S
        )
        self._evicted = self._refused = self._timed_out = 0

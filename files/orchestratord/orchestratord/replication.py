"""Several orchestratord replicas on one PostgreSQL database: each keeps its view of the others' writes.

Each replica reads what was committed since it last looked (store_pg.py's change log and heartbeat
numbers) about once per db_poll_interval_ms, and at once when a NOTIFY on its dedicated LISTEN connection
says something was committed. The NOTIFY is only a hint: a lost one costs at most one interval, a lost
connection is opened again, and the poll alone is enough.

Liveness stays on each replica's own monotonic clock. A heartbeat row another replica wrote says only
that the node was heard (its number advanced): this replica counts the node as heard when it reads the
row. While this replica cannot read the database, it cannot see those rows either, so it stops counting
silence (Registry.pause_liveness) until a read works again: a database gap never sends nodes offline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import asyncpg

from .registry import Registry
from .store import StoreError, StoreUnavailable
from .store_pg import CHANGES_KEPT_S, PostgresStore

log = logging.getLogger(__name__)

# Work per read, bounded: a replica far behind catches up over several reads, each a few milliseconds.
MAX_CHANGES_PER_READ = 1000
MAX_BEATS_PER_READ = 20_000
LISTEN_RETRY_S = 5.0
PRUNE_INTERVAL_S = 60.0


class Replication:
    def __init__(self, registry: Registry, store: PostgresStore, poll_interval_ms: int) -> None:
        self.registry = registry
        self.store = store
        self.poll_interval_s = poll_interval_ms / 1000
        # A read that has not answered within this long pauses liveness while it goes on waiting.
        self.read_deadline_s = max(0.5, min(self.poll_interval_s, 2.0))
        self.change_cursor = 0
        self.beat_cursor = 0
        self.wake = asyncio.Event()
        self.listener: asyncpg.Connection | None = None
        self._listen_after = 0.0
        self._listen_failed = False
        self._read_failed: str | None = None
        self.last_read_ok = time.monotonic()
        self._pruned_at = time.monotonic()

    async def open(self) -> None:
        """The store, the cursors, then everything committed: what commits in between is read again."""
        await self.store.open()
        self.change_cursor, self.beat_cursor = await self.store.cursors()
        await self.registry.load()
        self.last_read_ok = time.monotonic()

    async def close(self) -> None:
        if self.listener is not None:
            listener, self.listener = self.listener, None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(listener.close(), 2.0)

    async def run(self) -> None:
        while True:
            await self._keep_listening()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), self.poll_interval_s)
            self.wake.clear()
            try:
                await self._read_until_caught_up()
            except Exception as exc:  # a record this version cannot take in: keep following the rest
                log.error(
                    "taking in the other replicas' changes failed: %s", " ".join(str(exc).split())[:300]
                )
            if time.monotonic() - self._pruned_at >= PRUNE_INTERVAL_S:
                self._pruned_at = time.monotonic()
                with contextlib.suppress(StoreUnavailable):
                    await self.store.prune_changes()

    # --- the wake-up hint

    async def _keep_listening(self) -> None:
        if self.listener is not None:
            if not self.listener.is_closed():
                return
            self.listener = None
            log.warning("the LISTEN connection to %s was lost: opening it again", self.store.description)
        if time.monotonic() < self._listen_after:
            return
        try:
            self.listener = await self.store.listen(self.wake.set)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            self.listener = None
            self._listen_after = time.monotonic() + LISTEN_RETRY_S
            if not self._listen_failed:
                log.warning(
                    "cannot LISTEN on %s (%s): other replicas' changes show at the next poll, within %d ms",
                    self.store.description,
                    " ".join(str(exc).split())[:200] or type(exc).__name__,
                    self.poll_interval_s * 1000,
                )
            self._listen_failed = True
            return
        if self._listen_failed:
            log.info("listening for other replicas' changes again")
        self._listen_failed = False

    # --- reading and applying

    async def _read_until_caught_up(self) -> None:
        more = True
        while more:
            read = asyncio.ensure_future(self._read_once())
            done, _pending = await asyncio.wait({read}, timeout=self.read_deadline_s)
            if not done:
                self._paused("the database does not answer")
            try:
                more = await read
            except (StoreUnavailable, StoreError) as exc:
                self._paused(str(exc))
                return
            self._resumed()

    async def _read_once(self) -> bool:
        registry = self.registry
        # Local registrations, drains, deletions and credential changes wait meanwhile: each commits
        # and updates memory as one step, so a record read here is never older than memory.
        async with registry.writing, registry.credentials.writing:
            if time.monotonic() - self.last_read_ok > CHANGES_KEPT_S / 2:
                await self._reload()
                return False
            batch = await self.store.changes_since(
                self.change_cursor, self.beat_cursor, MAX_CHANGES_PER_READ, MAX_BEATS_PER_READ
            )
            for name, credential in batch.credentials.items():
                registry.credentials.apply_stored(name, credential)
            for node_id, row in batch.nodes.items():
                registry.apply_stored(node_id, row)
            own = self.store.replica_id
            for beat in batch.beats:
                if beat.by != own:
                    registry.apply_remote_heartbeat(beat.node_id, beat.pools, beat.last_heartbeat_at)
            self.change_cursor, self.beat_cursor = batch.change_cursor, batch.beat_cursor
        self.last_read_ok = time.monotonic()
        return batch.more

    async def _reload(self) -> None:
        """After a gap longer than the change log keeps: every record again, the missing ones deleted."""
        log.warning("read nothing from %s for a long while: reloading every record", self.store.description)
        registry = self.registry
        change_cursor, _beats_now = await self.store.cursors()
        credentials = {row.name: row for row in await self.store.load_credentials()}
        nodes = {row.node_id: row for row in await self.store.load_all()}
        for name in set(registry.credentials.by_name) - set(credentials):
            registry.credentials.apply_stored(name, None)
        for name, row in credentials.items():
            registry.credentials.apply_stored(name, row)
        for node_id in set(registry.nodes) - set(nodes):
            registry.apply_stored(node_id, None)
        for node_id, row in nodes.items():
            registry.apply_stored(node_id, row)
        registry.resort_contacts()
        # The heartbeat cursor stays where it was: the rows written since are the heartbeats taken during
        # the gap, which the next read takes in (older ones must not count as fresh).
        self.change_cursor = change_cursor
        self.last_read_ok = time.monotonic()

    def _paused(self, reason: str) -> None:
        if self._read_failed is None:
            log.error(
                "cannot read the other replicas' changes from %s (%s): node liveness is paused (no node "
                "goes offline for silence) until a read works again",
                self.store.description,
                " ".join(reason.split())[:300],
            )
        self._read_failed = reason
        self.registry.pause_liveness()

    def _resumed(self) -> None:
        if self._read_failed is not None:
            log.warning("reading the other replicas' changes works again: node liveness resumes")
            self._read_failed = None
        self.registry.resume_liveness()

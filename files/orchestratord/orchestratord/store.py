"""Durable node records behind one small interface (`Store`), and its default: SQLite (WAL).

PostgreSQL (store_pg.py) follows the same interface for a control plane whose database lives elsewhere.
In SqliteStore every call runs on one dedicated thread that owns the connection, so the event loop never
waits on disk and writes are applied in the order they were asked for.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS nodes (
    node_id TEXT PRIMARY KEY,
    registration BLOB NOT NULL,
    registered_at TEXT NOT NULL,
    drain INTEGER NOT NULL DEFAULT 0,
    last_heartbeat_at TEXT,
    pools BLOB
)
"""

# Forward migrations after the first table: each runs at every open and is a no-op once applied.
MIGRATIONS = (
    # The credentials an admin issued and the nodes' own (credentials.py). Secrets are never stored: only
    # the SHA-256 digest each request's secret is looked up by. Times are unix seconds (wall clock).
    """
    CREATE TABLE IF NOT EXISTS credentials (
        name TEXT PRIMARY KEY,
        scope TEXT NOT NULL,
        node_id TEXT,
        digest BLOB NOT NULL UNIQUE,
        expires_at INTEGER,
        uses_left INTEGER,
        created_at INTEGER NOT NULL
    )
    """,
)


class StoreError(Exception):
    """The database cannot be opened; the message names the path. Restarting may help (a mount not yet
    there, a permission fixed meanwhile)."""


class StoreRefused(StoreError):
    """Restarting cannot help, a person must act (a database whose schema is newer than this version, a
    password the server refuses). The daemon exits with EXIT_PERSON_MUST_ACT so its unit stops restarting
    it (RestartPreventExitStatus)."""


class StoreDamaged(StoreRefused):
    """The database file is there but damaged or empty: restarting cannot help, a person must act."""


class StoreUnavailable(Exception):
    """A write failed (a full disk, an I/O error): the request is answered 503 and nothing changed."""


class CredentialSpent(Exception):
    """A credential change that spends one use of a credential found it gone, replaced or used up in the
    database (another replica spent it first): nothing was changed."""


# What a damaged file raises when read (sqlite3.DatabaseError covers "malformed", "not a database").
_DAMAGE_HINT = (
    "restore it from a backup, or move it aside to start with an empty registry (the nodes register "
    "again at their next heartbeat)"
)


@dataclass
class StoredNode:
    node_id: str
    registration: bytes  # the registration body as JSON
    registered_at: str
    drain: bool
    last_heartbeat_at: str | None
    pools: bytes | None  # the last heartbeat's pool list as JSON
    # Seconds since the last heartbeat (or the registration) by the database's own clock, where the store
    # has one clock for every replica (PostgreSQL); None: the age comes from last_heartbeat_at and the
    # daemon's wall clock (SQLite, one daemon).
    silent_s: float | None = None


@dataclass
class CredentialRow:
    name: str
    scope: str
    node_id: str | None  # the node a node, recovery or node-bound join credential acts for
    digest: bytes  # sha256 of the secret; the secret itself is never stored
    expires_at: int | None  # unix seconds; None: never
    uses_left: int | None  # None: unlimited
    created_at: int


@dataclass
class HeartbeatRow:
    node_id: str
    last_heartbeat_at: str
    pools: bytes


class Store(Protocol):
    """What the registry needs from a database. Registrations, drains and deletions are committed before
    their call returns; heartbeats are written in one transaction per batch; writes are applied in the
    order they were asked for; a write that fails raises StoreUnavailable and changes nothing."""

    description: str  # names the database for log lines (a path, or host and database), never a secret

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def ping(self) -> bool: ...
    async def load_all(self) -> list[StoredNode]: ...
    async def upsert_node(self, node_id: str, registration: bytes, registered_at: str) -> None: ...
    async def update_drain(self, node_id: str, drain: bool) -> None: ...
    async def delete_node(self, node_id: str) -> None: ...
    async def write_heartbeats(self, rows: list[HeartbeatRow]) -> None: ...
    async def load_credentials(self) -> list[CredentialRow]: ...

    def reload_tls(self) -> None:
        """SIGHUP: the database's TLS trust read again (PostgreSQL's db_ca_file; nothing for SQLite)."""

    async def write_credentials(
        self, delete: list[str], put: list[CredentialRow], spend: tuple[str, bytes] | None = None
    ) -> int | None:
        """Deletes the named rows, then inserts or replaces `put`, in one transaction. With `spend`
        (name, digest), that credential must still be in the database with that secret and a use left:
        one use is taken in the same transaction (its uses left are returned), else CredentialSpent."""


CREDENTIAL_COLUMNS = "name, scope, node_id, digest, expires_at, uses_left, created_at"


def credential_values(row: CredentialRow) -> tuple:
    return (row.name, row.scope, row.node_id, row.digest, row.expires_at, row.uses_left, row.created_at)


class SqliteStore:
    """load all, upsert node, update drain, delete node, write heartbeats in a batch."""

    def __init__(self, db_path: str) -> None:
        self.db_path = db_path
        self.description = db_path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")
        self._db: sqlite3.Connection | None = None
        self.write_error: str | None = None  # why the last write failed, until one works again

    async def _run(self, func, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, func, *args)

    async def _write(self, func, *args) -> None:
        """A write; a failure is StoreUnavailable (logged once until writes work again), never a crash."""
        try:
            await self._run(func, *args)
        except (OSError, sqlite3.Error) as exc:
            if self.write_error is None:
                log.error(
                    "writes to the database at %s fail (%s): they are answered 503 and /ready says 503 "
                    "until a write works again",
                    self.db_path,
                    exc,
                )
            self.write_error = str(exc)
            raise StoreUnavailable(f"the database cannot take writes ({exc}); nothing was changed") from None
        if self.write_error is not None:
            log.warning("writes to the database at %s work again", self.db_path)
            self.write_error = None

    # --- lifecycle

    async def open(self) -> None:
        await self._run(self._open)

    def _open(self) -> None:
        path = Path(self.db_path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.exists() and path.stat().st_size == 0:
                # SQLite would take it as a new, empty database and every node record would be gone
                # without a word: an empty file is what a truncation or a full disk leaves, not a start.
                raise StoreDamaged(
                    f"the database at db_path {self.db_path} is an empty file (0 bytes); {_DAMAGE_HINT}"
                )
            self._db = sqlite3.connect(self.db_path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: a 2xx for a registration or a drain means the record is on disk.
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.execute(SCHEMA)
            for migration in MIGRATIONS:
                self._db.execute(migration)
            # Every page, before any is trusted: a damaged page found later would fail one request after
            # another. Milliseconds for ten thousand nodes.
            problem = self._db.execute("PRAGMA quick_check(1)").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError):
                raise StoreError(f"cannot open the database at db_path {self.db_path}: {exc}") from None
            raise StoreDamaged(
                f"the database at db_path {self.db_path} is damaged ({exc}); {_DAMAGE_HINT}"
            ) from None
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the database at db_path {self.db_path}: {exc}") from None
        if problem != "ok":
            problem = " ".join(problem.split())[:200]  # SQLite's report runs over lines: one log line
            raise StoreDamaged(
                f"the database at db_path {self.db_path} is damaged ({problem}); {_DAMAGE_HINT}"
            )

    def reload_tls(self) -> None:
        """A file on this host: no TLS to reload."""

    async def close(self) -> None:
        await self._run(self._close)
        self._executor.shutdown(wait=True)

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    # --- the interface

    async def ping(self) -> bool:
        """True when the database reads and the last write worked: a daemon whose writes fail is not ready."""
        if self.write_error is not None:
            raise StoreUnavailable(f"writes fail: {self.write_error}")
        return await self._run(self._ping)

    def _ping(self) -> bool:
        assert self._db is not None
        # Reads the table, not just the connection, so a damaged or vanished file shows.
        self._db.execute("SELECT count(*) FROM nodes").fetchone()
        return True

    async def load_all(self) -> list[StoredNode]:
        return await self._run(self._load_all)

    def _load_all(self) -> list[StoredNode]:
        assert self._db is not None
        try:
            rows = self._db.execute(
                "SELECT node_id, registration, registered_at, drain, last_heartbeat_at, pools FROM nodes"
            ).fetchall()
        except sqlite3.DatabaseError as exc:
            raise StoreDamaged(
                f"the database at db_path {self.db_path} is damaged ({exc}); {_DAMAGE_HINT}"
            ) from None
        return [
            StoredNode(r[0], bytes(r[1]), r[2], bool(r[3]), r[4], bytes(r[5]) if r[5] else None) for r in rows
        ]

    async def upsert_node(self, node_id: str, registration: bytes, registered_at: str) -> None:
        await self._write(self._upsert_node, node_id, registration, registered_at)

    def _upsert_node(self, node_id: str, registration: bytes, registered_at: str) -> None:
        assert self._db is not None
        # A new registration forgets the old pool readings; the operator's drain stays.
        self._db.execute(
            "INSERT INTO nodes (node_id, registration, registered_at) VALUES (?, ?, ?) "
            "ON CONFLICT(node_id) DO UPDATE SET registration = excluded.registration, "
            "registered_at = excluded.registered_at, last_heartbeat_at = NULL, pools = NULL",
            (node_id, registration, registered_at),
        )

    async def update_drain(self, node_id: str, drain: bool) -> None:
        await self._write(self._update_drain, node_id, drain)

    def _update_drain(self, node_id: str, drain: bool) -> None:
        assert self._db is not None
        self._db.execute("UPDATE nodes SET drain = ? WHERE node_id = ?", (int(drain), node_id))

    async def delete_node(self, node_id: str) -> None:
        await self._write(self._delete_node, node_id)

    def _delete_node(self, node_id: str) -> None:
        assert self._db is not None
        self._db.execute("DELETE FROM nodes WHERE node_id = ?", (node_id,))

    async def write_heartbeats(self, rows: list[HeartbeatRow]) -> None:
        await self._write(self._write_heartbeats, rows)

    def _write_heartbeats(self, rows: list[HeartbeatRow]) -> None:
        assert self._db is not None
        # One transaction, one fsync, however many nodes reported in the last second. UPDATE, not
        # upsert: a node deleted since its heartbeat stays deleted.
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany(
                "UPDATE nodes SET last_heartbeat_at = ?, pools = ? WHERE node_id = ?",
                [(row.last_heartbeat_at, row.pools, row.node_id) for row in rows],
            )

    async def load_credentials(self) -> list[CredentialRow]:
        return await self._run(self._load_credentials)

    def _load_credentials(self) -> list[CredentialRow]:
        assert self._db is not None
        try:
            rows = self._db.execute(f"SELECT {CREDENTIAL_COLUMNS} FROM credentials").fetchall()
        except sqlite3.DatabaseError as exc:
            raise StoreDamaged(
                f"the database at db_path {self.db_path} is damaged ({exc}); {_DAMAGE_HINT}"
            ) from None
        return [CredentialRow(r[0], r[1], r[2], bytes(r[3]), r[4], r[5], r[6]) for r in rows]

    async def write_credentials(
        self, delete: list[str], put: list[CredentialRow], spend: tuple[str, bytes] | None = None
    ) -> int | None:
        spent: list[int | None] = []
        await self._write(self._write_credentials, delete, put, spend, spent)
        return spent[0] if spent else None

    def _write_credentials(
        self,
        delete: list[str],
        put: list[CredentialRow],
        spend: tuple[str, bytes] | None,
        spent: list[int | None],
    ) -> None:
        assert self._db is not None
        # One transaction: a join's used-up token and the node's new credential commit together.
        with self._db:
            self._db.execute("BEGIN")
            if spend is not None:
                left = self._db.execute(
                    "UPDATE credentials SET uses_left = uses_left - 1 WHERE name = ? AND digest = ? "
                    "AND (uses_left IS NULL OR uses_left > 0) RETURNING uses_left",
                    spend,
                ).fetchone()
                if left is None:
                    raise CredentialSpent(spend[0])
                spent.append(left[0])
            self._db.executemany("DELETE FROM credentials WHERE name = ?", [(name,) for name in delete])
            self._db.executemany(
                f"INSERT OR REPLACE INTO credentials ({CREDENTIAL_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [credential_values(row) for row in put],
            )

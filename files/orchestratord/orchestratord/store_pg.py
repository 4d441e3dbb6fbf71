"""Durable node records in PostgreSQL: the same interface and semantics as SqliteStore (store.py).

asyncpg, with a small bounded pool. Writes go out one at a time, in the order they were asked for (the
registry relies on that order, as it does with SQLite's single thread); reads and the readiness check
take another connection. Every connect, acquire and statement is bounded in time, so a database that is
away or starved answers 503 STORE_UNAVAILABLE within seconds instead of holding requests.

The schema is migrated forward at open: MIGRATIONS is the list, schema_version records what was applied.
Each migration runs in its own transaction under an advisory lock, so replicas starting together apply
it once, one after the other; a database newer than this code is refused, never used.

Replicas (replication.py) learn what the others wrote from the database itself. Every registration,
drain, deletion and credential change appends a row to `changes`, and every heartbeat batch stamps its
rows' `beat_seq`, both from one sequence, in the same transaction as the write. Those transactions take
one advisory lock (ORDER_LOCK_KEY) first, so they commit in the order of their numbers: a reader that has
seen number n has seen everything below n, and "what is new since n" is a range scan. A NOTIFY on commit
wakes the other replicas early; without it they find the same rows at their next poll.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import ssl
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg

from .config import DatabaseTarget
from .store import (
    CREDENTIAL_COLUMNS,
    CredentialRow,
    CredentialSpent,
    HeartbeatRow,
    StoredNode,
    StoreError,
    StoreRefused,
    StoreUnavailable,
    credential_values,
)

log = logging.getLogger(__name__)

# Per replica: writes use one at a time, so a few cover the reads, the readiness check and a reconnect.
POOL_MAX_SIZE = 4
CONNECT_TIMEOUT_S = 5.0
STATEMENT_TIMEOUT_S = 10.0  # a heartbeat batch of 10,000 nodes takes well under a second
# The server ends a session of this daemon left idle inside a transaction this long: a replica whose event
# loop stalls mid-write (it happened: 27.6 s while it indexed 10,000 nodes, bench/replicas.py) then fails its
# own write instead of holding ORDER_LOCK_KEY, and with it every other replica's writes, for as long.
IDLE_IN_TRANSACTION_MS = 5_000
ACQUIRE_TIMEOUT_S = 5.0
# pg_advisory_xact_lock's key for migrations: any constant other tools on the database do not use.
MIGRATION_LOCK_KEY = 0x6C6C6F7263680001  # "llorch" + 1
# Taken by every write other replicas must see, for its transaction: they commit in sequence order.
ORDER_LOCK_KEY = 0x6C6C6F7263680002
CHANGES_CHANNEL = "llorch_changes"  # NOTIFY's channel: a wake-up hint, never the change itself
# How long a change stays in the log: a replica that read nothing for half of it reloads everything.
CHANGES_KEPT_S = 600

# Version n is MIGRATIONS[n - 1]; append only, never edit one that has shipped.
MIGRATIONS: list[str] = [
    # 1: the node records, one row per node, the same columns as the SQLite store's table.
    """
    CREATE TABLE nodes (
        node_id TEXT PRIMARY KEY,
        registration BYTEA NOT NULL,
        registered_at TEXT NOT NULL,
        drain BOOLEAN NOT NULL DEFAULT false,
        last_heartbeat_at TEXT,
        pools BYTEA
    )
    """,
    # 2: credentials (credentials.py): digests of secrets, never the secrets; times in unix seconds.
    """
    CREATE TABLE credentials (
        name TEXT PRIMARY KEY,
        scope TEXT NOT NULL,
        node_id TEXT,
        digest BYTEA NOT NULL UNIQUE,
        expires_at BIGINT,
        uses_left INTEGER,
        created_at BIGINT NOT NULL
    )
    """,
    # 3: replicas. The change log and its sequence; per node, the number of its last heartbeat batch
    # (beat_seq), the replica that wrote it, and the database's own time of it and of the registration
    # (one clock for every replica, read only as an age).
    """
    CREATE SEQUENCE change_seq;
    CREATE TABLE changes (
        seq BIGINT PRIMARY KEY,
        kind TEXT NOT NULL,
        key TEXT NOT NULL,
        at TIMESTAMPTZ NOT NULL DEFAULT now()
    );
    ALTER TABLE nodes
        ADD COLUMN beat_seq BIGINT,
        ADD COLUMN heartbeat_by TEXT,
        ADD COLUMN heartbeat_db_at TIMESTAMPTZ,
        ADD COLUMN registered_db_at TIMESTAMPTZ;
    CREATE INDEX nodes_beat_seq ON nodes (beat_seq);
    """,
]

NODE_COLUMNS = (
    "node_id, registration, registered_at, drain, last_heartbeat_at, pools, "
    "extract(epoch FROM now() - coalesce(heartbeat_db_at, registered_db_at))::float8"
)


# What a failure to reach or use the database raises: the server away, a timeout, a connection dropped
# mid-statement, a server that refuses (starting up, shutting down, out of connections, read-only).
_UNAVAILABLE = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


@dataclass
class RemoteBeat:
    """One node's heartbeat batch row written since a replica last looked."""

    node_id: str
    pools: bytes
    last_heartbeat_at: str
    by: str | None  # the replica that wrote it


@dataclass
class ChangeBatch:
    """What changed since a replica's cursors, read in one snapshot."""

    nodes: dict[str, StoredNode | None]  # changed node records; None: deleted
    credentials: dict[str, CredentialRow | None]  # changed credentials; None: deleted
    beats: list[RemoteBeat]
    change_cursor: int
    beat_cursor: int
    more: bool  # a limit was reached: read again at once


def _stored_node(r) -> StoredNode:
    return StoredNode(
        r[0], bytes(r[1]), r[2], bool(r[3]), r[4], bytes(r[5]) if r[5] is not None else None, r[6]
    )


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]


def client_ssl(target: DatabaseTarget) -> ssl.SSLContext | str:
    """asyncpg's `ssl`: db_url's sslmode as is, or with db_ca_file a context that trusts that CA alone
    (verify-full also checks db_url's host against the certificate's names). StoreRefused when the file
    cannot serve as a CA: a person must fix it, a restart would not."""
    if target.ca_file is None:
        return target.sslmode
    try:
        context = ssl.create_default_context(cafile=target.ca_file)
    except ssl.SSLError as exc:
        raise StoreRefused(
            f"db_ca_file {target.ca_file} holds no usable CA certificate ({exc.reason or exc})"
        ) from None
    except OSError as exc:
        raise StoreRefused(f"db_ca_file {target.ca_file} cannot be read: {exc.strerror or exc}") from None
    context.check_hostname = target.sslmode == "verify-full"
    return context


class PostgresStore:
    """load all, upsert node, update drain, delete node, write heartbeats in a batch."""

    def __init__(self, target: DatabaseTarget, password: str | None) -> None:
        self.target = target
        self.description = str(target)
        self._password = password
        self._pool: asyncpg.Pool | None = None
        self._ssl: ssl.SSLContext | str = target.sslmode  # open() loads db_ca_file into it
        self._expiring: asyncio.Task | None = None  # the pool's connections replaced after reload_tls
        # FIFO: asyncio.Lock wakes waiters in the order they came, so writes keep the registry's order.
        self._write_lock = asyncio.Lock()
        self.write_error: str | None = None  # why the last write failed, until one works again
        # Names this process in the heartbeat rows it writes, so it can tell its own from the others'.
        self.replica_id = secrets.token_hex(6)

    # --- lifecycle

    async def open(self) -> None:
        self._ssl = client_ssl(self.target)
        try:
            self._pool = await asyncpg.create_pool(
                # No floor: asyncpg would keep reconnecting to a database that is away in the background,
                # logging a traceback each time; a call that needs a connection opens it and says why not.
                min_size=0,
                max_size=POOL_MAX_SIZE,
                **self._connect_args(),
            )
            await self._migrate()
        except StoreError:
            await self._close_pool()
            raise
        except (asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError) as exc:
            await self._close_pool()
            raise StoreRefused(
                f"the database {self.description} refuses the login ({_one_line(exc)}); check the user in "
                "db_url and the password in db_password_file"
            ) from None
        except ssl.SSLCertVerificationError as exc:
            await self._close_pool()
            raise StoreRefused(
                f"the database {self.description} shows a certificate that db_ca_file "
                f"{self.target.ca_file} does not vouch for ({exc.verify_message or _one_line(exc)}); "
                "check db_ca_file and db_url's host"
            ) from None
        except _UNAVAILABLE as exc:
            await self._close_pool()
            raise StoreError(f"cannot open the database {self.description}: {_one_line(exc)}") from None

    async def _migrate(self) -> None:
        assert self._pool is not None
        known = len(MIGRATIONS)
        async with self._pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_KEY)
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_version ("
                    "version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
                )
                found = await self._version(conn)
            if found > known:
                raise StoreRefused(
                    f"database schema version {found} is newer than this orchestratord ({known}); "
                    f"upgrade orchestratord, or point db_url at another database ({self.description})"
                )
            if found < known:
                log.info(
                    "migrating the database %s from schema version %d to %d", self.description, found, known
                )
            for version in range(found + 1, known + 1):
                # One transaction per migration under the lock: a replica starting meanwhile waits, then
                # finds the version applied and skips it.
                async with conn.transaction():
                    await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_KEY)
                    if await self._version(conn) >= version:
                        continue
                    await conn.execute(MIGRATIONS[version - 1])
                    await conn.execute("INSERT INTO schema_version (version) VALUES ($1)", version)
                log.info("database schema version %d applied", version)

    @staticmethod
    async def _version(conn: asyncpg.Connection) -> int:
        return await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_version")

    async def close(self) -> None:
        await self._close_pool()

    async def _close_pool(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), CONNECT_TIMEOUT_S)
            except _UNAVAILABLE:
                pool.terminate()

    # --- failures: one log line per transition

    def _failed(self, exc: BaseException) -> StoreUnavailable:
        if isinstance(exc, asyncpg.ReadOnlySQLTransactionError | asyncpg.InterfaceError):
            # A server that turned read-only (a fail-over made it a standby) or a connection that broke:
            # drop the pooled connections so the next call connects afresh, to the new primary if any.
            assert self._pool is not None
            self._pool.expire_connections()
        reason = _one_line(exc)
        if self.write_error is None:
            log.error(
                "writes to the database %s fail (%s): they are answered 503 and /ready says 503 until a "
                "write works again",
                self.description,
                reason,
            )
        self.write_error = reason
        return StoreUnavailable(f"the database cannot take writes ({reason}); nothing was changed")

    def _worked(self) -> None:
        if self.write_error is not None:
            log.warning("writes to the database %s work again", self.description)
            self.write_error = None

    async def _write(self, kind: str, keys: list[str], query: str, *args) -> None:
        """One statement and its entries in the change log, committed together before it returns, after
        every write asked for earlier."""
        assert self._pool is not None
        async with self._write_lock:
            try:
                async with self._pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn, conn.transaction():
                    await conn.execute("SELECT pg_advisory_xact_lock($1)", ORDER_LOCK_KEY)
                    await conn.execute(query, *args)
                    await self._log_changes(conn, kind, keys)
            except _UNAVAILABLE as exc:
                raise self._failed(exc) from None
            self._worked()

    @staticmethod
    async def _log_changes(conn: asyncpg.Connection, kind: str, keys: list[str]) -> None:
        """Under ORDER_LOCK_KEY, in the write's transaction: the NOTIFY goes out with the commit."""
        await conn.execute(
            "INSERT INTO changes (seq, kind, key) SELECT nextval('change_seq'), $1, key "
            "FROM unnest($2::text[]) AS key",
            kind,
            keys,
        )
        await conn.execute("SELECT pg_notify($1, '')", CHANGES_CHANNEL)

    # --- the interface

    async def ping(self) -> bool:
        """True when the database takes writes now: reachable, not a read-only standby, the table there.
        `SELECT 1` would pass on a standby that fail-over left behind."""
        assert self._pool is not None
        try:
            async with self._pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
                await conn.fetchval("SELECT 1 FROM nodes LIMIT 1")  # the table, not just the server
                read_only = await conn.fetchval(
                    "SELECT pg_is_in_recovery() OR current_setting('transaction_read_only') = 'on'"
                )
        except _UNAVAILABLE as exc:
            raise self._failed(exc) from None
        if read_only:
            raise self._failed(asyncpg.ReadOnlySQLTransactionError("the database is read-only (a standby)"))
        # Writability shown: a database that came back is ready again without waiting for a write.
        self._worked()
        return True

    async def _read_all(self, query: str, what: str) -> list:
        """Every row of a start-up read; a database away is a StoreError naming what could not be read."""
        assert self._pool is not None
        try:
            async with self._pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
                return await conn.fetch(query)
        except _UNAVAILABLE as exc:
            raise StoreError(f"cannot read {what} from {self.description}: {_one_line(exc)}") from None

    async def load_all(self) -> list[StoredNode]:
        rows = await self._read_all(f"SELECT {NODE_COLUMNS} FROM nodes", "the node records")
        return [_stored_node(r) for r in rows]

    async def upsert_node(self, node_id: str, registration: bytes, registered_at: str) -> None:
        # A new registration forgets the old pool readings; the operator's drain stays.
        await self._write(
            "node",
            [node_id],
            "INSERT INTO nodes (node_id, registration, registered_at, registered_db_at) "
            "VALUES ($1, $2, $3, now()) "
            "ON CONFLICT (node_id) DO UPDATE SET registration = excluded.registration, "
            "registered_at = excluded.registered_at, registered_db_at = now(), last_heartbeat_at = NULL, "
            "pools = NULL, heartbeat_db_at = NULL",
            node_id,
            registration,
            registered_at,
        )

    async def update_drain(self, node_id: str, drain: bool) -> None:
        await self._write("node", [node_id], "UPDATE nodes SET drain = $1 WHERE node_id = $2", drain, node_id)

    async def delete_node(self, node_id: str) -> None:
        await self._write("node", [node_id], "DELETE FROM nodes WHERE node_id = $1", node_id)

    async def write_heartbeats(self, rows: list[HeartbeatRow]) -> None:
        # One transaction and one commit for the whole batch; arrays keep it one round trip at any size.
        # UPDATE, not upsert: a node deleted since its heartbeat stays deleted. Each row gets the next
        # number of the change sequence: how other replicas learn the node was heard, with no clock.
        assert self._pool is not None
        async with self._write_lock:
            try:
                async with self._pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn, conn.transaction():
                    await conn.execute("SELECT pg_advisory_xact_lock($1)", ORDER_LOCK_KEY)
                    await conn.execute(
                        "UPDATE nodes SET last_heartbeat_at = batch.at, pools = batch.pools, "
                        "beat_seq = nextval('change_seq'), heartbeat_by = $4, heartbeat_db_at = now() "
                        "FROM unnest($1::text[], $2::text[], $3::bytea[]) AS batch(node_id, at, pools) "
                        "WHERE nodes.node_id = batch.node_id",
                        [row.node_id for row in rows],
                        [row.last_heartbeat_at for row in rows],
                        [row.pools for row in rows],
                        self.replica_id,
                    )
                    await conn.execute("SELECT pg_notify($1, '')", CHANGES_CHANNEL)
            except _UNAVAILABLE as exc:
                raise self._failed(exc) from None
            self._worked()

    async def load_credentials(self) -> list[CredentialRow]:
        rows = await self._read_all(f"SELECT {CREDENTIAL_COLUMNS} FROM credentials", "the credentials")
        return [CredentialRow(r[0], r[1], r[2], bytes(r[3]), r[4], r[5], r[6]) for r in rows]

    async def write_credentials(
        self, delete: list[str], put: list[CredentialRow], spend: tuple[str, bytes] | None = None
    ) -> int | None:
        """Deletes then upserts in one transaction, after every write asked for earlier. `spend` takes
        one use in the database itself: replicas holding the same join secret cannot both spend its last
        use (the row lock orders them; the second finds none left)."""
        assert self._pool is not None
        left = None
        async with self._write_lock:
            try:
                async with self._pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn, conn.transaction():
                    await conn.execute("SELECT pg_advisory_xact_lock($1)", ORDER_LOCK_KEY)
                    if spend is not None:
                        row = await conn.fetchrow(
                            "UPDATE credentials SET uses_left = uses_left - 1 "
                            "WHERE name = $1 AND digest = $2 AND (uses_left IS NULL OR uses_left > 0) "
                            "RETURNING uses_left",
                            *spend,
                        )
                        if row is None:
                            raise CredentialSpent(spend[0])
                        left = row[0]
                    if delete:
                        await conn.execute("DELETE FROM credentials WHERE name = ANY($1::text[])", delete)
                    if put:
                        await conn.executemany(
                            f"INSERT INTO credentials ({CREDENTIAL_COLUMNS}) "
                            "VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (name) DO UPDATE SET "
                            "scope = excluded.scope, node_id = excluded.node_id, digest = excluded.digest, "
                            "expires_at = excluded.expires_at, uses_left = excluded.uses_left, "
                            "created_at = excluded.created_at",
                            [credential_values(row) for row in put],
                        )
                    changed = [*delete, *(row.name for row in put), *([spend[0]] if spend else [])]
                    await self._log_changes(conn, "credential", changed)
            except _UNAVAILABLE as exc:
                raise self._failed(exc) from None
            self._worked()
        return left

    # --- replicas: what the others wrote (replication.py)

    async def cursors(self) -> tuple[int, int]:
        """The newest change and heartbeat numbers committed now. Read before a full load: what commits
        meanwhile is read again by the next poll, and applying a record twice changes nothing."""
        assert self._pool is not None
        try:
            async with self._pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
                row = await conn.fetchrow(
                    "SELECT (SELECT coalesce(max(seq), 0) FROM changes), "
                    "(SELECT coalesce(max(beat_seq), 0) FROM nodes)"
                )
        except _UNAVAILABLE as exc:
            raise StoreError(f"cannot read the change log of {self.description}: {_one_line(exc)}") from None
        return row[0], row[1]

    async def changes_since(
        self, change_cursor: int, beat_cursor: int, max_changes: int, max_beats: int
    ) -> ChangeBatch:
        """The records changed and the heartbeat rows written after the cursors, in one snapshot and at
        most max_changes and max_beats of them (the rest at the next call). Raises StoreUnavailable."""
        assert self._pool is not None
        try:
            async with (
                self._pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn,
                conn.transaction(isolation="repeatable_read", readonly=True),
            ):
                changed = await conn.fetch(
                    "SELECT seq, kind, key FROM changes WHERE seq > $1 ORDER BY seq LIMIT $2",
                    change_cursor,
                    max_changes,
                )
                node_ids = sorted({r[2] for r in changed if r[1] == "node"})
                names = sorted({r[2] for r in changed if r[1] == "credential"})
                nodes: dict[str, StoredNode | None] = dict.fromkeys(node_ids)
                credentials: dict[str, CredentialRow | None] = dict.fromkeys(names)
                if node_ids:
                    for r in await conn.fetch(
                        f"SELECT {NODE_COLUMNS} FROM nodes WHERE node_id = ANY($1::text[])", node_ids
                    ):
                        nodes[r[0]] = _stored_node(r)
                if names:
                    for r in await conn.fetch(
                        f"SELECT {CREDENTIAL_COLUMNS} FROM credentials WHERE name = ANY($1::text[])", names
                    ):
                        credentials[r[0]] = CredentialRow(r[0], r[1], r[2], bytes(r[3]), r[4], r[5], r[6])
                beats = await conn.fetch(
                    "SELECT node_id, pools, last_heartbeat_at, heartbeat_by, beat_seq FROM nodes "
                    "WHERE beat_seq > $1 ORDER BY beat_seq LIMIT $2",
                    beat_cursor,
                    max_beats,
                )
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"cannot read the change log: {_one_line(exc)}") from None
        return ChangeBatch(
            nodes=nodes,
            credentials=credentials,
            # A registration since the batch cleared the readings: nothing to take in from that row.
            beats=[
                RemoteBeat(r[0], bytes(r[1]), r[2], r[3])
                for r in beats
                if r[1] is not None and r[2] is not None
            ],
            change_cursor=changed[-1][0] if changed else change_cursor,
            beat_cursor=beats[-1][4] if beats else beat_cursor,
            more=len(changed) == max_changes or len(beats) == max_beats,
        )

    async def prune_changes(self) -> None:
        """Drop change-log rows older than CHANGES_KEPT_S (by the database's clock)."""
        assert self._pool is not None
        try:
            async with self._pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
                await conn.execute(
                    "DELETE FROM changes WHERE at < now() - make_interval(secs => $1)", float(CHANGES_KEPT_S)
                )
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"cannot prune the change log: {_one_line(exc)}") from None

    def _connect_args(self) -> dict:
        """What every pooled connection is opened with (asyncpg's connect arguments)."""
        return {
            "host": self.target.host,
            "port": self.target.port,
            "user": self.target.user,
            "database": self.target.database,
            "password": self._password,
            "ssl": self._ssl,
            "timeout": CONNECT_TIMEOUT_S,
            "command_timeout": STATEMENT_TIMEOUT_S,
            "server_settings": {
                "application_name": "orchestratord",
                "idle_in_transaction_session_timeout": str(IDLE_IN_TRANSACTION_MS),
            },
        }

    def reload_tls(self) -> None:
        """SIGHUP: db_ca_file read again, for the connections opened from now on; the open ones are replaced
        as they are released (a rotated cluster CA, docs/tls.md#rotation). A file that no longer loads: one
        ERROR line, and the trust held so far stays."""
        if self.target.ca_file is None or self._pool is None:
            return
        try:
            fresh = client_ssl(self.target)
        except StoreRefused as exc:
            log.error("db_ca_file reload refused, the database's certificate checked as before: %s", exc)
            return
        self._ssl = fresh
        self._pool.set_connect_args(**self._connect_args())
        self._expiring = asyncio.get_running_loop().create_task(self._pool.expire_connections())
        log.info(
            "db_ca_file %s reloaded: new database connections trust what it holds now", self.target.ca_file
        )

    async def listen(self, wake: Callable[[], None]) -> asyncpg.Connection:
        """A dedicated connection outside the pool, LISTENing for commits of other replicas; `wake` is
        called on each. A pooler in transaction mode would drop the LISTEN: this connects to db_url's
        server directly, and polling covers whatever a lost connection misses."""
        conn = await asyncpg.connect(
            host=self.target.host,
            port=self.target.port,
            user=self.target.user,
            database=self.target.database,
            password=self._password,
            ssl=self._ssl,
            timeout=CONNECT_TIMEOUT_S,
            command_timeout=STATEMENT_TIMEOUT_S,
            server_settings={"application_name": "orchestratord-listen"},
        )
        try:
            await conn.add_listener(CHANGES_CHANNEL, lambda *_args: wake())
            # A lost connection wakes the replica too: it reads what it may have missed and listens again.
            conn.add_termination_listener(lambda _conn: wake())
        except BaseException:
            conn.terminate()
            raise
        return conn

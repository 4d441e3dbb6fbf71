"""The app factory: the route table behind one middleware; the registry and background work in cleanup_ctx."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import time
from collections.abc import AsyncIterator

from aiohttp import web

from .auth import BearerAuth
from .client_keys import ClientKeys
from .config import Settings, database_target
from .connections import ConnectionGuard
from .engine_keys import EngineKeys
from .gateway import Gateway
from .limits import Limits
from .metrics import Metrics
from .middleware import add_guarded_routes
from .openapi import build_document
from .page import CERTIFICATE_EXPIRY, page_routes
from .recent_errors import RecentErrors
from .registry import Registry
from .routes import CONNECTIONS, GATEWAY, METRICS, OPENAPI, RECENT_ERRORS, REGISTRY, routes
from .store import SqliteStore, Store, StoreRefused, StoreUnavailable
from .tls import ServerTls
from .views import count_by_status, pools_ready

log = logging.getLogger(__name__)

FLUSH_INTERVAL_S = 1.0  # heartbeats reach the disk about once a second, in one transaction
SETTLE_INTERVAL_S = 5.0  # the placement index takes in readings at least this often without reads


async def _write_back(registry: Registry) -> None:
    while True:
        await asyncio.sleep(FLUSH_INTERVAL_S)
        try:
            await registry.flush()
        except StoreUnavailable:  # logged once by the store; liveness goes on, the next flush retries
            pass
        except Exception as exc:
            log.error("writing heartbeats to the database failed: %s", exc)


async def _sweep(registry: Registry) -> None:
    # Often enough that an offline node is logged and leaves the index soon after its timeout.
    interval_s = min(1.0, registry.node_timeout_s / 4)
    settled_at = time.monotonic()
    while True:
        await asyncio.sleep(interval_s)
        registry.sweep()
        # Every read settles pending readings anyway; this only bounds what the first decision after a
        # quiet spell has to catch up on, while letting each node's heartbeats coalesce in between.
        if time.monotonic() - settled_at >= SETTLE_INTERVAL_S:
            registry.settle()
            settled_at = time.monotonic()


def build_store(settings: Settings, db_password: str | None) -> Store:
    """SQLite at db_path, or PostgreSQL when db_url is set (asyncpg imported only then: SQLite needs
    nothing installed)."""
    if settings.db_url is None:
        return SqliteStore(settings.db_path)
    try:
        from .store_pg import PostgresStore
    except ImportError as exc:
        raise StoreRefused(
            f"db_url is set but the PostgreSQL driver is missing ({exc}): install orchestratord[postgresql]"
        ) from None
    return PostgresStore(database_target(settings), db_password)


def _replication(store: Store, registry: Registry, settings: Settings):
    """PostgreSQL may be shared by several replicas: each then keeps up with the others' writes.
    SQLite belongs to one daemon: nothing to follow, nothing added to its path."""
    if isinstance(store, SqliteStore):
        return None
    from .replication import Replication

    return Replication(registry, store, settings.db_poll_interval_ms)


def create_app(
    settings: Settings,
    token: str,
    client_keys: ClientKeys | None = None,
    db_password: str | None = None,
    server_tls: ServerTls | None = None,
) -> web.Application:
    store = build_store(settings, db_password)
    registry = Registry(
        store,
        settings.node_timeout_ms,
        settings.heartbeat_interval_ms,
        Limits(settings),
        node_credential_ttl_s=settings.node_credential_ttl_s,
        node_recovery_ttl_s=settings.node_recovery_ttl_s,
    )
    registry.routes.queue_max = settings.gateway_queue_max
    registry.routes.set_aside_after = settings.gateway_set_aside_after
    registry.routes.engine_backlog = settings.gateway_engine_backlog
    metrics = (
        Metrics(
            lambda: count_by_status(registry),
            lambda: pools_ready(registry),
            lambda: registry.heartbeat_writeback_passes,
            registry.routes,
            None if server_tls is None else server_tls.expiry,
        )
        if settings.metrics_enabled
        else None
    )
    connections = ConnectionGuard(settings.max_connections, settings.connection_idle_timeout_ms)
    app = web.Application(client_max_size=settings.max_body_bytes)
    app[REGISTRY] = registry
    app[METRICS] = metrics
    app[OPENAPI] = json.dumps(build_document(settings.metrics_enabled)).encode()
    app[CONNECTIONS] = connections
    # The page's GET /v2/certificates: the days left on what this daemon serves (none on plain HTTP).
    app[CERTIFICATE_EXPIRY] = None if server_tls is None else server_tls.expiry
    recent_errors = app[RECENT_ERRORS] = RecentErrors()
    gateway = app[GATEWAY] = Gateway(
        settings, registry, EngineKeys(settings.engine_keys_dir), metrics, recent_errors, connections
    )
    add_guarded_routes(
        app, [*routes, *page_routes], BearerAuth(token), client_keys or ClientKeys(), metrics, connections
    )

    replication = _replication(store, registry, settings)

    async def state(app: web.Application) -> AsyncIterator[None]:
        if replication is None:
            await registry.open()
        else:
            await replication.open()
        # Move what start-up built (the app, the restored nodes) out of the collector's regular passes.
        gc.freeze()
        tasks = [asyncio.create_task(_write_back(registry)), asyncio.create_task(_sweep(registry))]
        if replication is not None:
            tasks.append(asyncio.create_task(replication.run()))
        yield
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if replication is not None:
            await replication.close()
        await registry.close()

    app.cleanup_ctx.append(state)
    app.cleanup_ctx.append(gateway.session_context)
    return app

"""The app factory: routes wrapped for auth, errors and timing; the store and background work in cleanup."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import time
from collections.abc import AsyncIterator

from aiohttp import web

from . import schemas
from .auth import BearerAuth
from .config import Settings
from .connections import ConnectionGuard
from .limits import Limits
from .metrics import Metrics
from .openapi import build_document
from .registry import Registry
from .routes import CONNECTIONS, ENDPOINTS, METRICS, OPENAPI, REGISTRY, ApiError, Endpoint
from .store import SqliteStore, StoreUnavailable

log = logging.getLogger(__name__)

FLUSH_INTERVAL_S = 1.0  # heartbeats reach the disk about once a second, in one transaction
SETTLE_INTERVAL_S = 5.0  # the placement index takes in readings at least this often without reads

HTTP_CODES = {
    400: "INVALID_PARAMS",
    401: "UNAUTHORIZED",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    413: "PAYLOAD_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
}


def _envelope(status: int, code: str, message: str, headers=None) -> web.Response:
    return web.Response(
        body=schemas.encode(schemas.Error(code=code, message=message)),
        status=status,
        content_type="application/json",
        headers=headers,
    )


UNAUTHORIZED = (401, "UNAUTHORIZED", "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})


def _error_response(exc: Exception, request: web.Request) -> web.Response:
    if isinstance(exc, ApiError):
        return _envelope(exc.status, exc.code, exc.message, exc.headers)
    if isinstance(exc, StoreUnavailable):  # logged once by the store when writes start failing
        return _envelope(503, "STORE_UNAVAILABLE", str(exc))
    if isinstance(exc, web.HTTPException) and exc.status >= 400:  # aiohttp's own, e.g. 413 from read()
        code = HTTP_CODES.get(exc.status, "HTTP_ERROR")
        message = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
        return _envelope(exc.status, code, message)
    log.error("unexpected error on %s %s", request.method, request.path, exc_info=exc)
    return _envelope(500, "INTERNAL", "internal error; see the daemon's log")


def _guarded(endpoint: Endpoint, auth: BearerAuth, metrics: Metrics | None, connections: ConnectionGuard):
    """The handler wrapped in what every request gets: auth, query check, the error envelope, timing.

    A wrapper per route rather than an aiohttp middleware: in aiohttp 3.14 any middleware adds two
    coroutine layers to every request, which measured as a tenth of a heartbeat's whole CPU cost.
    """
    handler, method, template = endpoint.handler, endpoint.method, endpoint.path
    needs_token, accepted_query = endpoint.auth, endpoint.query

    async def guarded(request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        try:
            if needs_token:
                if not auth.allows(request.headers.get("Authorization")):
                    raise ApiError(*UNAUTHORIZED)
                connections.trust(request.protocol)
            if request.query_string:
                # A misspelt filter (?stauts=offline) must not silently answer everything.
                for name in request.query:
                    if name not in accepted_query:
                        raise ApiError(400, "INVALID_PARAMS", f"unknown query parameter - at `{name}`")
            response = await handler(request)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            response = _error_response(exc, request)
        if metrics is not None:
            metrics.observe_request(method, template, time.perf_counter() - started)
        return response

    return guarded


def _unmatched(fallback: web.AbstractResource, auth: BearerAuth, metrics: Metrics | None):
    """Every request no route took: 404, or 405 with Allow when the path exists for other methods."""

    async def unmatched(request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        allowed: set[str] = set()
        for resource in request.app.router.resources():
            if resource is not fallback:
                _, methods = await resource.resolve(request)
                allowed |= methods
        if request.path.startswith("/v2/") and not auth.allows(request.headers.get("Authorization")):
            response = _envelope(*UNAUTHORIZED)
        elif allowed:
            methods = ", ".join(sorted(allowed))
            response = _envelope(
                405,
                "METHOD_NOT_ALLOWED",
                f"{request.method} not allowed here; use {methods}",
                {"Allow": methods},
            )
        else:
            response = _envelope(404, "NOT_FOUND", f"no route for {request.path}")
        if metrics is not None:
            metrics.observe_request(request.method, "unmatched", time.perf_counter() - started)
        return response

    return unmatched


def add_endpoints(
    app: web.Application, auth: BearerAuth, metrics: Metrics | None, connections: ConnectionGuard
) -> None:
    for endpoint in ENDPOINTS:
        guarded = _guarded(endpoint, auth, metrics, connections)
        if endpoint.method == "GET":
            app.router.add_get(endpoint.path, guarded)
        else:
            app.router.add_route(endpoint.method, endpoint.path, guarded)
    # Last: tried only after every route above (aiohttp resolves the most specific path first).
    fallback = app.router.add_resource("/{unmatched_path:.*}")
    fallback.add_route("*", _unmatched(fallback, auth, metrics))


async def _flush_heartbeats(registry: Registry) -> None:
    rows = registry.take_dirty()
    if rows:
        try:
            await registry.store.write_heartbeats(rows)
        except Exception:
            registry.keep_dirty(rows)  # a node that falls silent now must still reach the disk
            raise


async def _write_back(registry: Registry) -> None:
    while True:
        await asyncio.sleep(FLUSH_INTERVAL_S)
        try:
            await _flush_heartbeats(registry)
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


def create_app(settings: Settings, token: str) -> web.Application:
    store = SqliteStore(settings.db_path)
    registry = Registry(store, settings.node_timeout_ms, settings.heartbeat_interval_ms, Limits(settings))
    metrics = Metrics(registry.count_by_status, registry.pools_ready) if settings.metrics_enabled else None
    app = web.Application(client_max_size=settings.max_body_bytes)
    app[REGISTRY] = registry
    app[METRICS] = metrics
    app[OPENAPI] = json.dumps(build_document(settings.metrics_enabled)).encode()
    app[CONNECTIONS] = guard = ConnectionGuard(settings.max_connections, settings.connection_idle_timeout_ms)
    add_endpoints(app, BearerAuth(token), metrics, guard)

    async def state(app: web.Application) -> AsyncIterator[None]:
        await store.open()
        await registry.load()
        # Move what start-up built (the app, the restored nodes) out of the collector's regular passes.
        gc.freeze()
        tasks = [asyncio.create_task(_write_back(registry)), asyncio.create_task(_sweep(registry))]
        yield
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await _flush_heartbeats(registry)
        await store.close()

    app.cleanup_ctx.append(state)
    return app

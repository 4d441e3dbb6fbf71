"""The app factory: one middleware for auth, errors and timing; the store and background work in cleanup."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator

from aiohttp import web

from . import schemas
from .auth import BearerAuth
from .config import Settings
from .metrics import Metrics
from .openapi import build_document
from .registry import Registry
from .routes import METRICS, OPENAPI, REGISTRY, ApiError, routes
from .store import SqliteStore

log = logging.getLogger(__name__)

FLUSH_INTERVAL_S = 1.0  # heartbeats reach the disk about once a second, in one transaction

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


def _check_query(request: web.Request) -> None:
    # A misspelt filter (?stauts=offline) must not silently answer everything.
    allowed = getattr(request.match_info.route.handler, "query_params", ())
    for name in request.query:
        if name not in allowed:
            raise ApiError(400, "INVALID_PARAMS", f"unknown query parameter - at `{name}`")


def make_middleware(auth: BearerAuth, metrics: Metrics | None):
    @web.middleware
    async def middleware(request: web.Request, handler) -> web.StreamResponse:
        started = time.perf_counter()
        try:
            if request.path.startswith("/v2/") and not auth.allows(request.headers.get("Authorization")):
                response = _envelope(
                    401, "UNAUTHORIZED", "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"}
                )
            else:
                if request.query:
                    _check_query(request)
                response = await handler(request)
        except ApiError as exc:
            response = _envelope(exc.status, exc.code, exc.message)
        except web.HTTPException as exc:  # aiohttp's own 404, 405, 413 ...
            if exc.status < 400:
                raise
            code = HTTP_CODES.get(exc.status, "HTTP_ERROR")
            message = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
            headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            response = _envelope(exc.status, code, message, headers)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("unexpected error on %s %s", request.method, request.path)
            response = _envelope(500, "INTERNAL", "internal error; see the daemon's log")
        if metrics is not None:
            route = request.match_info.route.resource
            template = route.canonical if route is not None else "unmatched"
            metrics.observe_request(request.method, template, time.perf_counter() - started)
        return response

    return middleware


async def _flush_heartbeats(registry: Registry) -> None:
    rows = registry.take_dirty()
    if rows:
        await registry.store.write_heartbeats(rows)


async def _write_back(registry: Registry) -> None:
    while True:
        await asyncio.sleep(FLUSH_INTERVAL_S)
        try:
            await _flush_heartbeats(registry)
        except Exception as exc:  # a full disk must not stop liveness tracking; the next flush retries
            log.error("writing heartbeats to the database failed: %s", exc)


async def _sweep(registry: Registry) -> None:
    # Often enough that an offline node is logged and leaves the index soon after its timeout.
    interval_s = min(1.0, registry.node_timeout_s / 4)
    while True:
        await asyncio.sleep(interval_s)
        registry.sweep()


def create_app(settings: Settings, token: str) -> web.Application:
    store = SqliteStore(settings.db_path)
    registry = Registry(store, settings.node_timeout_ms, settings.heartbeat_interval_ms)
    metrics = Metrics(registry.count_by_status, registry.pools_ready) if settings.metrics_enabled else None
    app = web.Application(
        client_max_size=settings.max_body_bytes, middlewares=[make_middleware(BearerAuth(token), metrics)]
    )
    app[REGISTRY] = registry
    app[METRICS] = metrics
    app[OPENAPI] = json.dumps(build_document(settings.metrics_enabled)).encode()
    app.add_routes(routes)

    async def state(app: web.Application) -> AsyncIterator[None]:
        await store.open()
        await registry.load()
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

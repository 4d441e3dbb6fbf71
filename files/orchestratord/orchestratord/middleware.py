"""The one middleware every request goes through: the token, the query check, the error envelope, timing.

Errors become the envelope here and only here: an ApiError from a handler, aiohttp's own HTTP errors
(413 from read(), 404 and 405 from the router) and a store that cannot write. Anything else is a bug: it
is logged with its traceback and answered 500 in the envelope.
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web

from . import schemas
from .auth import BearerAuth
from .bodies import ApiError
from .connections import ConnectionGuard
from .metrics import Metrics
from .routes import RULES, Rule
from .store import StoreUnavailable

log = logging.getLogger(__name__)

HTTP_CODES = {
    400: "INVALID_PARAMS",
    401: "UNAUTHORIZED",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    413: "PAYLOAD_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
}
UNAUTHORIZED = (401, "UNAUTHORIZED", "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})
NEEDS_TOKEN = Rule()


def envelope(status: int, code: str, message: str, headers=None) -> web.Response:
    return web.Response(
        body=schemas.encode(schemas.Error(code=code, message=message)),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def _error_response(exc: Exception, request: web.Request) -> web.Response:
    if isinstance(exc, ApiError):
        return envelope(exc.status, exc.code, exc.message, exc.headers)
    if isinstance(exc, StoreUnavailable):  # logged once by the store when writes start failing
        return envelope(503, "STORE_UNAVAILABLE", str(exc))
    if isinstance(exc, web.HTTPMethodNotAllowed):
        methods = ", ".join(sorted(exc.allowed_methods))
        return envelope(
            405, "METHOD_NOT_ALLOWED", f"{exc.method} not allowed here; use {methods}", {"Allow": methods}
        )
    if isinstance(exc, web.HTTPNotFound):
        return envelope(404, "NOT_FOUND", f"no route for {request.path}")
    if isinstance(exc, web.HTTPException) and exc.status >= 400:  # aiohttp's own, e.g. 413 from read()
        code = HTTP_CODES.get(exc.status, "HTTP_ERROR")
        message = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
        return envelope(exc.status, code, message)
    log.error("unexpected error on %s %s", request.method, request.path, exc_info=exc)
    return envelope(500, "INTERNAL", "internal error; see the daemon's log")


def guard(auth: BearerAuth, metrics: Metrics | None, connections: ConnectionGuard):
    @web.middleware
    async def guarded(request: web.Request, handler) -> web.StreamResponse:
        started = time.perf_counter()
        match_info = request.match_info
        unmatched = match_info.http_exception is not None  # the router's 404 or 405, raised by handler
        try:
            if unmatched:
                # Under /v2/ the token comes first even here: whether a path exists is not told to
                # someone without it.
                if request.path.startswith("/v2/") and not auth.allows(request.headers.get("Authorization")):
                    raise ApiError(*UNAUTHORIZED)
            else:
                rule = RULES.get(match_info.handler, NEEDS_TOKEN)
                if rule.auth:
                    if not auth.allows(request.headers.get("Authorization")):
                        raise ApiError(*UNAUTHORIZED)
                    connections.trust(request.protocol)
                if request.query_string:
                    # A misspelt filter (?stauts=offline) must not silently answer everything.
                    for name in request.query:
                        if name not in rule.query:
                            raise ApiError(400, "INVALID_PARAMS", f"unknown query parameter - at `{name}`")
            response = await handler(request)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            response = _error_response(exc, request)
        if metrics is not None:
            template = "unmatched" if unmatched else match_info.route.resource.canonical
            metrics.observe_request(request.method, template, time.perf_counter() - started)
        return response

    return guarded

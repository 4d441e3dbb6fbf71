"""What every request goes through, one guard per route: the token, the query check, the envelope, timing.

Errors become the envelope here and only here: an ApiError from a handler, aiohttp's own HTTP errors
(413 from read(), 404 and 405 from the router) and a store that cannot write. Anything else is a bug: it
is logged with its traceback and answered 500 in the envelope.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable

from aiohttp import web

from . import access, schemas
from .auth import BearerAuth
from .bodies import ApiError
from .client_keys import ClientKeys
from .connections import ConnectionGuard
from .credentials import CredentialBook, bearer_digest
from .metrics import Metrics
from .openai_errors import CLIENT, openai_error
from .routes import CREDENTIAL, REGISTRY, RULES, Rule
from .store import StoreUnavailable

log = logging.getLogger(__name__)

HTTP_CODES = {
    400: "INVALID_PARAMS",
    401: "UNAUTHORIZED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    413: "PAYLOAD_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
}
UNAUTHORIZED = (401, "UNAUTHORIZED", "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})
NEEDS_ADMIN = Rule()


def _client_refusal(client_keys: ClientKeys) -> web.Response:
    # /v1 answers in OpenAI's error shape, which its clients parse.
    message = "invalid API key" if len(client_keys) else "no client keys configured"
    return openai_error(
        401, "authentication_error", "invalid_api_key", message, {"WWW-Authenticate": "Bearer"}
    )


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
    if isinstance(exc, access.Forbidden):
        # One line per refusal, naming who tried what: a stolen credential at work shows in the log.
        credential = request.get(CREDENTIAL)
        who = credential.described() if credential is not None else "an unknown credential"
        log.warning("refused %s %s for %s: %s", request.method, request.path, who, exc.refusal.code)
        return envelope(403, exc.refusal.code, exc.refusal.message)
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


def _usable_credential(book: CredentialBook, authorization: str | None):
    """The request's /v2 credential, or the 401 that refuses it (unknown, revoked, expired, used up)."""
    digest = bearer_digest(authorization)
    credential = None if digest is None else book.by_digest.get(digest)
    if credential is None:
        raise ApiError(*UNAUTHORIZED)
    if credential.expires_at is not None or credential.uses_left is not None:
        reason = credential.unusable(time.time())
        if reason is not None:
            raise ApiError(401, "UNAUTHORIZED", reason, {"WWW-Authenticate": "Bearer"})
    return credential


def _guarded(
    route: web.RouteDef,
    book: CredentialBook,
    client_keys: ClientKeys,
    metrics: Metrics | None,
    connections: ConnectionGuard,
):
    """The route's handler wrapped in what every request gets: the credential its rule names, the query
    check, the envelope, timing. Its rule and metrics label are looked up once here, not per request."""
    handler, method, template = route.handler, route.method, route.path
    rule = RULES.get(handler, NEEDS_ADMIN)
    needs_client_key, accepted_query = rule.auth == "client", rule.query
    need = None if rule.auth in ("client", "none") else rule.auth

    async def guarded(request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        try:
            if need is not None:
                credential = _usable_credential(book, request.headers.get("Authorization"))
                request[CREDENTIAL] = credential
                # The one decision (access.py): the scope against the route, and a node-bound credential
                # against the node in the path.
                refused = access.refusal(
                    need,
                    credential.scope,
                    credential.node_id,
                    credential.name,
                    request.match_info.get("node_id"),
                )
                if refused is not None:
                    raise access.Forbidden(refused)
                connections.trust(request.protocol)
            elif needs_client_key:
                client = client_keys.name_of(request.headers.get("Authorization"))
                if client is None:
                    return _client_refusal(client_keys)
                request[CLIENT] = client
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


def _unmatched(fallback: web.AbstractResource, book: CredentialBook, metrics: Metrics | None):
    """Every request no route took: 404, or 405 with Allow when the path exists for other methods."""

    async def unmatched(request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        allowed: set[str] = set()
        for resource in request.app.router.resources():
            if resource is not fallback:
                _match, methods = await resource.resolve(request)
                allowed |= methods
        # Under /v2/ a credential comes first even here: whether a path exists is not told to someone
        # without one.
        refused = None
        if request.path.startswith("/v2/"):
            try:
                _usable_credential(book, request.headers.get("Authorization"))
            except ApiError as exc:
                refused = envelope(exc.status, exc.code, exc.message, exc.headers)
        if refused is not None:
            response = refused
        elif allowed:
            methods = ", ".join(sorted(allowed))
            response = envelope(
                405,
                "METHOD_NOT_ALLOWED",
                f"{request.method} not allowed here; use {methods}",
                {"Allow": methods},
            )
        else:
            response = envelope(404, "NOT_FOUND", f"no route for {request.path}")
        if metrics is not None:
            metrics.observe_request(request.method, "unmatched", time.perf_counter() - started)
        return response

    return unmatched


def add_guarded_routes(
    app: web.Application,
    routes: Iterable[web.AbstractRouteDef],
    auth: BearerAuth,
    client_keys: ClientKeys,
    metrics: Metrics | None,
    connections: ConnectionGuard,
) -> None:
    """Every route with its guard, then one fallback resource that answers what no route took. The
    token_file token joins the registry's credential book as the built-in admin, `cluster-admin`.

    A wrapper per route, not an aiohttp middleware: bench/heartbeat.py measured aiohttp's middleware
    machinery alone at about 5 points of the heartbeat ratio (docs/performance.md), beyond the 3 points an
    idiom may cost. This is the one hand-made fast path of the daemon.
    """
    book = app[REGISTRY].credentials
    book.add_builtin_admin(auth.digest)
    for route in routes:
        assert isinstance(route, web.RouteDef)
        web.RouteDef(
            route.method, route.path, _guarded(route, book, client_keys, metrics, connections), route.kwargs
        ).register(app.router)
    # Last: tried only after every route above (aiohttp resolves the most specific path first).
    fallback = app.router.add_resource("/{unmatched_path:.*}")
    fallback.add_route("*", _unmatched(fallback, book, metrics))

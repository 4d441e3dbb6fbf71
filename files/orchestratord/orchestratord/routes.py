"""The route table: each handler decodes its body with one schema, asks the registry, encodes the answer."""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
from aiohttp import web

from . import __version__, schemas
from .connections import ConnectionGuard
from .limits import ClusterFull
from .metrics import CONTENT_TYPE
from .registry import NodeNotFound, NoPlacement, Registry
from .store import StoreUnavailable

log = logging.getLogger(__name__)

JSON = "application/json"
ID_RE = re.compile(schemas.ID_PATTERN)
STATUSES = ("registering", "online", "draining", "offline")

REGISTRY = web.AppKey("registry", Registry)
METRICS = web.AppKey("metrics", object)  # a metrics.Metrics, or None when turned off
OPENAPI = web.AppKey("openapi", bytes)
CONNECTIONS = web.AppKey("connections", ConnectionGuard)

_decoders = {
    schemas.Registration: msgspec.json.Decoder(schemas.Registration),
    schemas.Heartbeat: msgspec.json.Decoder(schemas.Heartbeat),
    schemas.DrainRequest: msgspec.json.Decoder(schemas.DrainRequest),
    schemas.PlacementRequest: msgspec.json.Decoder(schemas.PlacementRequest),
}


class ApiError(Exception):
    """An answer in the error envelope; the wrapper around every route turns it into a response."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


def json_response(value: Any, status: int = 200) -> web.Response:
    return web.Response(body=schemas.encode(value), status=status, content_type=JSON)


def _whole_floats_as_ints(value: Any) -> Any:
    """4.0 -> 4 throughout a decoded JSON value, in place; a loop, not recursion, however deep the value."""
    if isinstance(value, float):
        return int(value) if value.is_integer() else value
    pending = [value]
    while pending:
        container = pending.pop()
        if isinstance(container, list):
            items = enumerate(container)
        elif isinstance(container, dict):
            items = container.items()
        else:
            continue
        for key, item in items:
            if isinstance(item, float):
                if item.is_integer():
                    container[key] = int(item)  # replaces a value: the container keeps its size
            elif isinstance(item, list | dict):
                pending.append(item)
    return value


def _refusal(exc: Exception, schema: type) -> ApiError:
    """The 400 for a body that does not decode, whichever decoder met the problem first."""
    if isinstance(exc, msgspec.ValidationError):
        return ApiError(400, "INVALID_PARAMS", f"invalid {schema.__name__}: {exc}")
    if isinstance(exc, UnicodeDecodeError):  # msgspec checks the bytes of each string it reads
        detail = f"byte 0x{exc.object[exc.start]:02x} at offset {exc.start}"
        return ApiError(400, "INVALID_PARAMS", f"malformed JSON body: not UTF-8 text, {detail}")
    if isinstance(exc, RecursionError):  # msgspec's own depth guard: arrays in arrays thousands deep
        return ApiError(400, "INVALID_PARAMS", f"invalid {schema.__name__}: body nested too deeply")
    return ApiError(400, "INVALID_PARAMS", f"malformed JSON body: {exc}")


# What decoding a peer's bytes may raise; anything else is a bug in the daemon and stays a 500.
DECODE_ERRORS = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)


async def decode_body(request: web.Request, schema: type) -> Any:
    body = await request.read()
    try:
        if not body.isascii():
            # JSON is UTF-8 (RFC 8259); msgspec checks only the strings it keeps, not those it skips.
            body.decode()
        return _decoders[schema].decode(body)
    except msgspec.ValidationError as exc:
        if "got `float`" not in str(exc):
            raise _refusal(exc, schema) from None
    except DECODE_ERRORS as exc:
        raise _refusal(exc, schema) from None
    # JSON Schema counts 4.0 as an integer, so the published document promises to accept it; the fast
    # strict decoder does not, so such bodies take this slower path. Strings are still no numbers. The
    # strict decoder stopped at the first float: the rest of the body may still be malformed, hold
    # numbers out of range or bytes that are not UTF-8, so this path refuses all the same errors.
    try:
        return msgspec.convert(_whole_floats_as_ints(msgspec.json.decode(body)), schema, strict=True)
    except DECODE_ERRORS as exc:
        raise _refusal(exc, schema) from None


def check(rule, body):
    try:
        return rule(body)
    except schemas.ValidationProblem as exc:
        raise ApiError(400, "INVALID_PARAMS", str(exc)) from None


def node_id_of(request: web.Request) -> str:
    node_id = request.match_info["node_id"]
    if not ID_RE.match(node_id):
        raise ApiError(400, "INVALID_PARAMS", f"node_id must match {schemas.ID_PATTERN} - at `node_id`")
    return node_id


def not_found(node_id: str) -> ApiError:
    return ApiError(404, "NODE_NOT_FOUND", f"no node {node_id!r} is registered")


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str  # the route template, also the metrics label
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    auth: bool  # needs the bearer token
    query: tuple[str, ...]  # accepted query parameters; any other is refused


ENDPOINTS: list[Endpoint] = []  # the one route table


def endpoint(method: str, path: str, *, auth: bool = True, query: tuple[str, ...] = ()):
    def register(handler):
        ENDPOINTS.append(Endpoint(method, path, handler, auth, query))
        return handler

    return register


@endpoint("GET", "/health", auth=False)
async def health(request: web.Request) -> web.Response:
    return json_response(schemas.Health(status="ok", version=__version__))


@endpoint("GET", "/ready", auth=False)
async def ready(request: web.Request) -> web.Response:
    try:
        if await request.app[REGISTRY].store.ping():
            return json_response(schemas.Ready(status="ready"))
    except StoreUnavailable as exc:  # the store logged it once when writes began to fail
        raise ApiError(503, "DATABASE_UNAVAILABLE", f"the database does not take writes: {exc}") from None
    except Exception as exc:  # any database failure means not ready
        log.warning("readiness check failed: %s", exc)
    raise ApiError(503, "DATABASE_UNAVAILABLE", "the database does not answer")


@endpoint("GET", "/openapi.json", auth=False)
async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=request.app[OPENAPI], content_type=JSON)


@endpoint("GET", "/metrics", auth=False)
async def metrics(request: web.Request) -> web.Response:
    metrics = request.app[METRICS]
    if metrics is None:
        raise ApiError(404, "NOT_FOUND", "metrics are turned off (metrics_enabled: false)")
    return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE})


@endpoint("POST", "/v2/nodes/register")
async def register(request: web.Request) -> web.Response:
    body = check(schemas.check_registration, await decode_body(request, schemas.Registration))
    registry = request.app[REGISTRY]
    check(registry.limits.check_registration, body)
    try:
        answer = await registry.register(body)
    except ClusterFull as exc:
        raise ApiError(409, "CLUSTER_FULL", str(exc)) from None
    if request.app[METRICS] is not None:
        request.app[METRICS].registrations += 1
    return json_response(answer)


@endpoint("POST", "/v2/nodes/{node_id}/heartbeat")
async def heartbeat(request: web.Request) -> web.Response:
    app = request.app
    registry, metrics = app[REGISTRY], app[METRICS]
    node_id = request.match_info["node_id"]
    if node_id not in registry.nodes:  # a registered id already passed the pattern: skip it on the hot path
        node_id_of(request)
    try:
        body = check(schemas.check_heartbeat, await decode_body(request, schemas.Heartbeat))
        answer = registry.heartbeat(node_id, body)  # checks the body against the node's registration
    except ApiError:
        if metrics is not None:
            metrics.heartbeats["invalid"] += 1
        raise
    except schemas.ValidationProblem as exc:
        if metrics is not None:
            metrics.heartbeats["invalid"] += 1
        raise ApiError(400, "INVALID_PARAMS", str(exc)) from None
    except NodeNotFound:
        if metrics is not None:
            metrics.heartbeats["unknown_node"] += 1
        raise not_found(node_id) from None
    if metrics is not None:
        metrics.heartbeats["ok"] += 1
    return json_response(answer)


@endpoint("GET", "/v2/nodes", query=("status",))
async def list_nodes(request: web.Request) -> web.Response:
    status = request.query.get("status")
    if status is not None and status not in STATUSES:
        raise ApiError(400, "INVALID_PARAMS", f"status must be one of {', '.join(STATUSES)} - at `status`")
    return json_response(request.app[REGISTRY].list_nodes(status))


@endpoint("GET", "/v2/nodes/{node_id}")
async def get_node(request: web.Request) -> web.Response:
    node_id = node_id_of(request)
    registry = request.app[REGISTRY]
    try:
        node = registry.get(node_id)
    except NodeNotFound:
        raise not_found(node_id) from None
    return json_response(registry.view(node, registry.clock()))


@endpoint("POST", "/v2/nodes/{node_id}/drain")
async def drain(request: web.Request) -> web.Response:
    node_id = node_id_of(request)
    body = await decode_body(request, schemas.DrainRequest)
    try:
        return json_response(await request.app[REGISTRY].set_drain(node_id, body.drain))
    except NodeNotFound:
        raise not_found(node_id) from None


@endpoint("DELETE", "/v2/nodes/{node_id}")
async def delete_node(request: web.Request) -> web.Response:
    node_id = node_id_of(request)
    try:
        await request.app[REGISTRY].delete(node_id)
    except NodeNotFound:
        raise not_found(node_id) from None
    return web.Response(status=204)


@endpoint("GET", "/v2/catalog/availability")
async def availability(request: web.Request) -> web.Response:
    return json_response(request.app[REGISTRY].availability())


@endpoint("GET", "/v2/catalog/models")
async def catalog_models(request: web.Request) -> web.Response:
    return json_response(request.app[REGISTRY].catalog_models())


@endpoint("POST", "/v2/placement")
async def placement(request: web.Request) -> web.Response:
    metrics = request.app[METRICS]
    try:
        body = await decode_body(request, schemas.PlacementRequest)
    except ApiError:
        if metrics is not None:
            metrics.placements["invalid"] += 1
        raise
    try:
        answer = request.app[REGISTRY].place(body)
    except NoPlacement as exc:
        if metrics is not None:
            metrics.placements[exc.code.lower()] += 1
        raise ApiError(503, exc.code, exc.message) from None
    if metrics is not None:
        metrics.placements["placed"] += 1
    return json_response(answer)

"""The route table: each handler decodes its body with one schema, asks the registry, encodes the answer.

Auth, the query check, the error envelope and timing are the middleware's (middleware.py); what it needs
to know per route (token or not, which query parameters) is declared here next to the route, in RULES.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Literal

from aiohttp import web

from . import __version__, schemas, views
from .bodies import ApiError, check, decode_body, json_response
from .connections import ConnectionGuard
from .contract import NODE_STATUSES
from .gateway import Gateway
from .limits import ClusterFull
from .metrics import CONTENT_TYPE
from .placement import NoPlacement
from .recent_errors import RecentErrors
from .registry import NodeNotFound, Registry
from .store import StoreUnavailable

log = logging.getLogger(__name__)

ID_RE = re.compile(schemas.ID_PATTERN)

REGISTRY = web.AppKey("registry", Registry)
METRICS = web.AppKey("metrics", object)  # a metrics.Metrics, or None when turned off
OPENAPI = web.AppKey("openapi", bytes)
CONNECTIONS = web.AppKey("connections", ConnectionGuard)
GATEWAY = web.AppKey("gateway", Gateway)
RECENT_ERRORS = web.AppKey("recent_errors", RecentErrors)

routes = web.RouteTableDef()


# Who may call a route: the cluster token (/v2/*), a client key (/v1/*, the gateway), or anyone. Neither
# credential opens the other's routes.
Auth = Literal["token", "client", "none"]


@dataclass(frozen=True, slots=True)
class Rule:
    auth: Auth = "token"
    query: tuple[str, ...] = ()  # accepted query parameters; any other is refused


RULES: dict[object, Rule] = {}  # handler -> its rule; a handler without one needs the token


def rule(*, auth: Auth = "token", query: tuple[str, ...] = ()):
    def declare(handler):
        RULES[handler] = Rule(auth, query)
        return handler

    return declare


def node_id_of(request: web.Request) -> str:
    node_id = request.match_info["node_id"]
    if not ID_RE.match(node_id):
        raise ApiError(400, "INVALID_PARAMS", f"node_id must match {schemas.ID_PATTERN} - at `node_id`")
    return node_id


def not_found(node_id: str) -> ApiError:
    return ApiError(404, "NODE_NOT_FOUND", f"no node {node_id!r} is registered")


@routes.get("/health")
@rule(auth="none")
async def health(request: web.Request) -> web.Response:
    return json_response(schemas.Health(status="ok", version=__version__))


@routes.get("/ready")
@rule(auth="none")
async def ready(request: web.Request) -> web.Response:
    try:
        if await request.app[REGISTRY].ready():
            return json_response(schemas.Ready(status="ready"))
    except StoreUnavailable as exc:  # the store logged it once when writes began to fail
        raise ApiError(503, "DATABASE_UNAVAILABLE", f"the database does not take writes: {exc}") from None
    except Exception as exc:  # any database failure means not ready
        log.warning("readiness check failed: %s", exc)
    raise ApiError(503, "DATABASE_UNAVAILABLE", "the database does not answer")


@routes.get("/openapi.json")
@rule(auth="none")
async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=request.app[OPENAPI], content_type="application/json")


@routes.get("/metrics")
@rule(auth="none")
async def metrics(request: web.Request) -> web.Response:
    metrics = request.app[METRICS]
    if metrics is None:
        raise ApiError(404, "NOT_FOUND", "metrics are turned off (metrics_enabled: false)")
    return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE})


@routes.post("/v2/nodes/register")
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


@routes.post("/v2/nodes/{node_id}/heartbeat")
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


@routes.get("/v2/nodes")
@rule(query=("status",))
async def list_nodes(request: web.Request) -> web.Response:
    status = request.query.get("status")
    if status is not None and status not in NODE_STATUSES:
        raise ApiError(
            400, "INVALID_PARAMS", f"status must be one of {', '.join(NODE_STATUSES)} - at `status`"
        )
    return json_response(views.list_nodes(request.app[REGISTRY], status))


@routes.get("/v2/nodes/{node_id}")
async def get_node(request: web.Request) -> web.Response:
    node_id = node_id_of(request)
    registry = request.app[REGISTRY]
    try:
        node = registry.get(node_id)
    except NodeNotFound:
        raise not_found(node_id) from None
    return json_response(views.node_view(registry, node, registry.clock()))


@routes.post("/v2/nodes/{node_id}/drain")
async def drain(request: web.Request) -> web.Response:
    node_id = node_id_of(request)
    body = await decode_body(request, schemas.DrainRequest)
    registry = request.app[REGISTRY]
    try:
        node = await registry.set_drain(node_id, body.drain)
    except NodeNotFound:
        raise not_found(node_id) from None
    return json_response(views.node_view(registry, node, registry.clock()))


@routes.delete("/v2/nodes/{node_id}")
async def delete_node(request: web.Request) -> web.Response:
    node_id = node_id_of(request)
    try:
        await request.app[REGISTRY].delete(node_id)
    except NodeNotFound:
        raise not_found(node_id) from None
    return web.Response(status=204)


@routes.get("/v2/catalog/availability")
async def availability(request: web.Request) -> web.Response:
    return json_response(views.availability(request.app[REGISTRY]))


@routes.get("/v2/catalog/models")
async def catalog_models(request: web.Request) -> web.Response:
    return json_response(views.catalog_models(request.app[REGISTRY]))


@routes.post("/v2/placement")
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
        request.app[RECENT_ERRORS].record("placement", body.model_id, exc.code, exc.message)
        raise ApiError(503, exc.code, exc.message) from None
    if metrics is not None:
        metrics.placements["placed"] += 1
    return json_response(answer)


@routes.get("/v2/placement/errors")
async def placement_errors(request: web.Request) -> web.Response:
    return json_response(request.app[RECENT_ERRORS].view())


# --- the client endpoint (gateway.py): client keys, OpenAI's shapes


@routes.get("/v1/models")
@rule(auth="client")
async def client_models(request: web.Request) -> web.Response:
    return web.Response(body=request.app[GATEWAY].models(), content_type="application/json")


@routes.post("/v1/chat/completions")
@rule(auth="client")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await request.app[GATEWAY].forward(request, "/v1/chat/completions")


@routes.post("/v1/completions")
@rule(auth="client")
async def completions(request: web.Request) -> web.StreamResponse:
    return await request.app[GATEWAY].forward(request, "/v1/completions")

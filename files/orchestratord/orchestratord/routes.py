"""The route table: each handler decodes its body with one schema, asks the registry, encodes the answer.

Auth, the query check, the error envelope and timing are the middleware's (middleware.py); what it needs
to know per route (token or not, which query parameters) is declared here next to the route, in RULES.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import Literal

import msgspec
from aiohttp import web

from . import __version__, access, bodies, schemas, views
from .bodies import ApiError, check, decode_body, json_response
from .connections import ConnectionGuard
from .contract import NODE_STATUSES
from .credentials import Credential, CredentialError, rfc3339
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

# The credential the middleware found for the request (credentials.Credential), for handlers and logs.
CREDENTIAL = "llorch.credential"

routes = web.RouteTableDef()

# The bodies of the credential routes, decoded like every other (bodies.decode_body).
bodies._decoders.update(
    {schema: msgspec.json.Decoder(schema) for schema in (schemas.CredentialRequest, schemas.JoinRequest)}
)


# Who may call a route: what a /v2 credential must meet (access.Need: its scope, decided in access.py),
# a client key (/v1/*, the gateway), or anyone. Neither kind of credential opens the other's routes.
Auth = Literal[access.Need, "client", "none"]


@dataclass(frozen=True, slots=True)
class Rule:
    auth: Auth = "admin"  # a route that forgot to say is an admin's alone
    query: tuple[str, ...] = ()  # accepted query parameters; any other is refused


RULES: dict[object, Rule] = {}  # handler -> its rule; a handler without one needs an admin


def rule(*, auth: Auth = "admin", query: tuple[str, ...] = ()):
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
@rule(auth="node")
async def register(request: web.Request) -> web.Response:
    body = check(schemas.check_registration, await decode_body(request, schemas.Registration))
    credential: Credential = request[CREDENTIAL]
    # The path names no node: the body's node_id is checked against the credential's binding here.
    refused = access.refusal("node", credential.scope, credential.node_id, credential.name, body.node_id)
    if refused is not None:
        raise access.Forbidden(refused)
    registry = request.app[REGISTRY]
    check(registry.limits.check_registration, body)
    try:
        answer = await registry.register(body, credential)
    except ClusterFull as exc:
        raise ApiError(409, "CLUSTER_FULL", str(exc)) from None
    if request.app[METRICS] is not None:
        request.app[METRICS].registrations += 1
    return json_response(answer)


@routes.post("/v2/nodes/{node_id}/heartbeat")
@rule(auth="node")
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
    credential: Credential = request[CREDENTIAL]
    if credential.scope == "node":
        book, now = registry.credentials, time.time()
        credential.last_used_at = now  # a rotation waits for the agent's first heartbeat with its new token
        if book.renewal_due(credential, now):  # about once per half a token's life, or asked (rotate)
            answer.credential = await book.renew(credential)
    return json_response(answer)


@routes.get("/v2/nodes")
@rule(auth="reader", query=("status",))
async def list_nodes(request: web.Request) -> web.Response:
    status = request.query.get("status")
    if status is not None and status not in NODE_STATUSES:
        raise ApiError(
            400, "INVALID_PARAMS", f"status must be one of {', '.join(NODE_STATUSES)} - at `status`"
        )
    return json_response(views.list_nodes(request.app[REGISTRY], status))


@routes.get("/v2/nodes/{node_id}")
@rule(auth="reader")
async def get_node(request: web.Request) -> web.Response:
    node_id = node_id_of(request)
    registry = request.app[REGISTRY]
    try:
        node = registry.get(node_id)
    except NodeNotFound:
        raise not_found(node_id) from None
    return json_response(views.node_view(registry, node, registry.clock()))


@routes.post("/v2/nodes/{node_id}/drain")
@rule(auth="operator")
async def drain(request: web.Request) -> web.Response:
    node_id = node_id_of(request)
    body = await decode_body(request, schemas.DrainRequest)
    registry = request.app[REGISTRY]
    try:
        node = await registry.set_drain(node_id, body.drain, request[CREDENTIAL])
    except NodeNotFound:
        raise not_found(node_id) from None
    return json_response(views.node_view(registry, node, registry.clock()))


@routes.delete("/v2/nodes/{node_id}")
@rule(auth="operator_or_node")
async def delete_node(request: web.Request) -> web.Response:
    node_id = node_id_of(request)
    try:
        await request.app[REGISTRY].delete(node_id, request[CREDENTIAL])
    except NodeNotFound:
        raise not_found(node_id) from None
    return web.Response(status=204)


@routes.get("/v2/catalog/availability")
@rule(auth="reader")
async def availability(request: web.Request) -> web.Response:
    return json_response(views.availability(request.app[REGISTRY]))


@routes.get("/v2/catalog/models")
@rule(auth="reader")
async def catalog_models(request: web.Request) -> web.Response:
    return json_response(views.catalog_models(request.app[REGISTRY]))


@routes.post("/v2/placement")
@rule(auth="reader")
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
@rule(auth="reader")
async def placement_errors(request: web.Request) -> web.Response:
    return json_response(request.app[RECENT_ERRORS].view())


# --- credentials (credentials.py; who may do what: access.py)


def _credential_error(exc: CredentialError) -> ApiError:
    return ApiError(exc.status, exc.code, exc.message)


def _credential_view(credential: Credential, now: float) -> schemas.CredentialView:
    return schemas.CredentialView(
        name=credential.name,
        scope=credential.scope,
        node_id=credential.node_id,
        expires_at=None if credential.expires_at is None else rfc3339(credential.expires_at),
        uses_left=credential.uses_left,
        created_at=rfc3339(credential.created_at),
        usable=credential.unusable(now) is None,
        last_used_at=None if credential.last_used_at is None else rfc3339(credential.last_used_at),
    )


@routes.post("/v2/credentials")
@rule(auth="admin")
async def issue_credential(request: web.Request) -> web.Response:
    try:
        body = await decode_body(request, schemas.CredentialRequest)
    except ApiError as exc:  # the union's own name says nothing to a person
        raise ApiError(exc.status, exc.code, exc.message.replace("Union", "CredentialRequest", 1)) from None
    scope = body.__struct_config__.tag
    uses, node_id = getattr(body, "uses", None), getattr(body, "node_id", None)
    book = request.app[REGISTRY].credentials
    try:
        credential, secret = await book.issue(
            body.name, scope, body.ttl_s, uses, node_id, request[CREDENTIAL]
        )
    except CredentialError as exc:
        raise _credential_error(exc) from None
    expires_at = None if credential.expires_at is None else rfc3339(credential.expires_at)
    issued = schemas.CredentialIssued(
        name=credential.name, scope=credential.scope, secret=secret, expires_at=expires_at
    )
    return json_response(issued, status=201)


@routes.get("/v2/credentials")
@rule(auth="admin")
async def list_credentials(request: web.Request) -> web.Response:
    now = time.time()
    views_ = [_credential_view(c, now) for c in request.app[REGISTRY].credentials.listing()]
    return json_response(schemas.CredentialList(credentials=views_, count=len(views_)))


@routes.delete(r"/v2/credentials/{name:[\s\S]+}")  # node credentials' names hold a '/'
@rule(auth="admin")
async def revoke_credential(request: web.Request) -> web.Response:
    try:
        await request.app[REGISTRY].credentials.revoke(request.match_info["name"], request[CREDENTIAL])
    except CredentialError as exc:
        raise _credential_error(exc) from None
    return web.Response(status=204)


@routes.post("/v2/nodes/{node_id}/credential/rotate")
@rule(auth="admin")
async def rotate_node_credential(request: web.Request) -> web.Response:
    node_id = node_id_of(request)
    book = request.app[REGISTRY].credentials
    try:
        recovery, secret = await book.rotate(node_id, request[CREDENTIAL])
    except CredentialError as exc:
        raise _credential_error(exc) from None
    expires_at = None if recovery.expires_at is None else rfc3339(recovery.expires_at)
    answer = schemas.CredentialIssued(
        name=recovery.name, scope=recovery.scope, secret=secret, expires_at=expires_at
    )
    return json_response(answer)


@routes.post("/v2/join")
@rule(auth="join")
async def join(request: web.Request) -> web.Response:
    body = await decode_body(request, schemas.JoinRequest)
    credential: Credential = request[CREDENTIAL]
    refused = access.refusal("join", credential.scope, credential.node_id, credential.name, body.node_id)
    if refused is not None:
        raise access.Forbidden(refused)
    try:
        answer = await request.app[REGISTRY].credentials.join(credential, body.node_id)
    except CredentialError as exc:
        raise _credential_error(exc) from None
    return json_response(answer)


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

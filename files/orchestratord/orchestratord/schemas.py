"""The daemon's schemas: every request body is decoded by one of these or by a struct of the wire contract
(wire.py, shared with the agent), and /openapi.json is generated from them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

import msgspec
from msgspec import Meta

from .contract import ID_PATTERN, MODEL_ID_PATTERN
from .wire import (
    Bytes,
    Capabilities,
    EngineKind,
    EngineState,
    EngineStatus,
    GpuInfo,
    Heartbeat,
    HeartbeatAnswer,
    Id,
    JoinAnswer,
    JoinRequest,
    ModelId,
    NodeCredential,
    NodeStatus,
    PoolSpec,
    PoolStatus,
    RegisterAnswer,
    Registration,
    ValidationProblem,
    Wire,
    check_heartbeat,
    check_registration,
)

__all__ = [
    "ID_PATTERN",
    "MODEL_ID_PATTERN",
    "Capabilities",
    "EngineStatus",
    "GpuInfo",
    "Heartbeat",
    "HeartbeatAnswer",
    "JoinAnswer",
    "JoinRequest",
    "NodeCredential",
    "PoolSpec",
    "PoolStatus",
    "RegisterAnswer",
    "Registration",
    "ValidationProblem",
    "check_heartbeat",
    "check_registration",
]

Strategy = Literal["least-loaded", "round-robin", "random"]


class DrainRequest(Wire):
    drain: bool


class PlacementRequest(Wire):
    model_id: ModelId | None = None
    vram_bytes: Bytes | None = None
    strategy: Strategy = "least-loaded"


TtlS = Annotated[int, Meta(ge=1, le=10 * 365 * 86400, description="seconds; absent: never expires")]
CredentialName = Annotated[Id, Meta(description="the id rule; shown in every log line of what it does")]


class AccessCredentialRequest(Wire, tag_field="scope", forbid_unknown_fields=True):
    """POST /v2/credentials for a person or a program: reader, operator or admin."""

    name: CredentialName
    ttl_s: TtlS | None = None


class ReaderCredentialRequest(AccessCredentialRequest, tag="reader"):
    pass


class OperatorCredentialRequest(AccessCredentialRequest, tag="operator"):
    pass


class AdminCredentialRequest(AccessCredentialRequest, tag="admin"):
    pass


class JoinCredentialRequest(Wire, tag_field="scope", tag="join", forbid_unknown_fields=True):
    """POST /v2/credentials for joining nodes: `uses` joins within ttl_s, bound to node_id when given."""

    name: CredentialName
    ttl_s: Annotated[int, Meta(ge=1, le=7 * 86400, description="seconds, at most 7 days")] = 3600
    uses: Annotated[int, Meta(ge=1, le=10_000)] = 1
    node_id: Id | None = None


# One body, told apart by its `scope` (access.ISSUABLE_SCOPES): each scope's fields are in its schema, so
# what the published document accepts is what the daemon accepts. Unknown fields are refused here, unlike
# the agents' bodies: a person who writes `uses` on a reader means something the daemon would not do.
# typing.Union, not `|`: the body decoder names the schema in its 400s, and only this spelling has a name.
CredentialRequest = Union[  # noqa: UP007
    ReaderCredentialRequest, OperatorCredentialRequest, AdminCredentialRequest, JoinCredentialRequest
]


class CredentialIssued(Wire):
    name: str
    scope: str
    secret: Annotated[str, Meta(description="the secret, shown this once: it is stored nowhere")]
    expires_at: Annotated[str | None, Meta(description="RFC 3339 UTC; null: never")]


class CredentialView(Wire):
    name: str
    scope: str
    node_id: str | None
    expires_at: str | None
    uses_left: int | None
    created_at: str
    usable: Annotated[bool, Meta(description="false once expired or used up")]
    last_used_at: Annotated[
        str | None,
        Meta(description="a node credential's last heartbeat on this replica since it started; null: none"),
    ] = None


class CredentialList(Wire):
    credentials: list[CredentialView]
    count: int


# --- answers --------------------------------------------------------------------------------------


class Error(Wire):
    code: str
    message: str


class Health(Wire):
    status: str
    version: str


class Ready(Wire):
    status: str


class PoolView(Wire):
    pool_id: str
    gpus: list[int]
    ready: bool
    draining: bool
    slots_total: int
    slots_free: int
    vram_total_bytes: int
    vram_free_bytes: int
    engine: EngineStatus | None
    models_available: list[str]


class Node(Wire):
    node_id: str
    machine_id: str | None
    address: str
    version: str | None
    status: NodeStatus
    drain: Annotated[bool, Meta(description="true while an operator has drained the node")]
    registered_at: str
    last_heartbeat_at: str | None
    capabilities: Capabilities
    pools: list[PoolView]
    models: Annotated[list[str], Meta(description="models staged on the node (its pools' models_available)")]
    served: Annotated[
        list[str], Meta(description="models its pools' engines are set up to serve, whatever their state")
    ]


class NodeList(Wire):
    nodes: list[Node]
    count: int


class AvailabilityPool(Wire):
    pool_id: str
    ready: Annotated[bool, Meta(description="ready and not draining: the pool could take work")]
    models: Annotated[list[str], Meta(description="models staged for the pool")]
    engine: Annotated[EngineStatus | None, Meta(description="the pool's engine; null: it serves nothing")]


class AvailabilityNode(Wire):
    node_id: str
    address: str
    online: bool
    models: Annotated[list[str], Meta(description="models staged on the node")]
    served: Annotated[list[str], Meta(description="models its engines are set up to serve, any state")]
    pools: list[AvailabilityPool]


class Availability(Wire):
    nodes: dict[str, AvailabilityNode]
    total_models: int
    replicated_models: list[str]
    single_node_models: list[str]


class CatalogEngine(Wire):
    """One engine set up to serve a model, on an online node, in whatever state it reports."""

    node_id: str
    pool_id: str
    kind: EngineKind
    state: EngineState
    url: str
    serving: Annotated[
        bool, Meta(description="ready or busy, in a ready pool that is not draining: it serves now")
    ]


class CatalogModel(Wire):
    model_id: str
    nodes: Annotated[list[str], Meta(description="online nodes where the model is staged")]
    replicas: Annotated[int, Meta(description="how many online nodes stage it")]
    pools_ready: Annotated[int, Meta(description="pools whose engine serves it now (see engines.serving)")]
    slots_free: Annotated[int, Meta(description="idle slots of those engines")]
    engines: Annotated[
        list[CatalogEngine],
        Meta(description="every engine on an online node set up to serve it, by (node_id, pool_id)"),
    ] = []
    served: Annotated[
        bool, Meta(description="at least one engine serves it now; false: staged (or loading) only")
    ] = False


class CatalogModels(Wire):
    models: list[CatalogModel]


class Placement(Wire):
    node_id: str
    pool_id: str
    address: Annotated[str, Meta(description="the node agent's address, as it registered")]
    strategy: Strategy
    engine_url: Annotated[str, Meta(description="the chosen pool's engine: where the request goes")]
    engine_kind: EngineKind
    model_id: Annotated[str, Meta(description="the model the chosen engine serves")]


class CertificateDays(Wire):
    certificate: Annotated[
        str, Meta(description='"server" (the one this daemon serves) or "ca" (the cluster CA)')
    ]
    not_after: Annotated[str, Meta(description="RFC 3339 UTC")]
    days_left: Annotated[int, Meta(description="whole days, rounded down; negative once expired")]
    warn: Annotated[bool, Meta(description="days_left < warn_days")]


class Certificates(Wire):
    certificates: Annotated[list[CertificateDays], Meta(description="empty on plain HTTP (the lab switch)")]
    warn_days: int


def encode(value: Any) -> bytes:
    return msgspec.json.encode(value)

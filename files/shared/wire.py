"""The wire structs that orchestratord and pool-managerd exchange: the agent encodes its registration and
heartbeats with them and decodes the answers with them; the daemon decodes requests with them and generates
/openapi.json from them. One file, linked into both packages (files/shared/wire.py).

Unknown fields are ignored rather than refused, so an agent one version ahead of the daemon can still
register, and a daemon one version ahead can still answer an older agent; every declared field is checked
for type and range.
"""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta, Struct

from .contract import (
    ENGINE_KINDS,
    ENGINE_STATES,
    ENGINE_URL_PATTERN,
    ENGINE_URL_RULE,
    ID_PATTERN,
    ID_RULE,
    MODEL_ID_PATTERN,
    MODEL_ID_RULE,
    NODE_ID_RULE,
    NODE_STATUSES,
    valid_node_id,
)

Id = Annotated[str, Meta(pattern=ID_PATTERN, description=ID_RULE)]
ModelId = Annotated[str, Meta(pattern=MODEL_ID_PATTERN, description=MODEL_ID_RULE)]
Bytes = Annotated[int, Meta(ge=0, le=2**62, description="a byte count")]
Count = Annotated[int, Meta(ge=0, le=1_000_000)]
GpuIndex = Annotated[int, Meta(ge=0, le=1024)]
# Free text never carries control characters: it ends up in logs and in tables people read.
ShortText = Annotated[
    str, Meta(pattern=r"^[^\x00-\x1f\x7f]{0,256}(?!\n)$", description="printable, up to 256")
]
Address = Annotated[
    str, Meta(pattern=r"^[^\x00-\x1f\x7f]{1,512}(?!\n)$", description="where the node's agent listens")
]
Timestamp = Annotated[
    str,
    Meta(
        pattern=r"^[0-9]{4}-[01][0-9]-[0-3][0-9][Tt ][0-2][0-9]:[0-5][0-9]:[0-6][0-9](\.[0-9]{1,9})?"
        r"([Zz]|[+-][0-2][0-9]:[0-5][0-9])(?!\n)$",
        description="RFC 3339 time of the agent's clock (informational)",
    ),
]
NodeStatus = Literal[NODE_STATUSES]
EngineKind = Literal[ENGINE_KINDS]
EngineState = Literal[ENGINE_STATES]
EngineUrl = Annotated[str, Meta(pattern=ENGINE_URL_PATTERN, description=ENGINE_URL_RULE)]


class Wire(Struct, gc=False):
    """Base of every wire struct. They hold only strings, numbers and lists of such or of other structs,
    so they can never form a cycle: keeping them out of the garbage collector's sight makes its passes
    over thousands of node records cheap."""


class ValidationProblem(ValueError):
    """A body that decoded but breaks a rule across fields; carries the JSON path of the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{message} - at `{field}`")
        self.field = field


# --- requests -------------------------------------------------------------------------------------


class GpuInfo(Wire):
    index: GpuIndex
    name: ShortText
    vram_total_bytes: Bytes
    compute_capability: ShortText
    driver_version: ShortText
    uuid: ShortText | None = None


class Capabilities(Wire):
    gpus: Annotated[list[GpuInfo], Meta(max_length=1024)]
    cpu_cores: Count
    ram_total_bytes: Bytes
    cuda_version: ShortText | None = None


class PoolSpec(Wire):
    pool_id: Id
    gpus: Annotated[list[GpuIndex], Meta(max_length=1024)]
    slots_total: Count


class Registration(Wire):
    node_id: Id
    address: Address
    pools: Annotated[list[PoolSpec], Meta(max_length=256)]
    capabilities: Capabilities
    machine_id: ShortText | None = None
    version: ShortText | None = None


class EngineStatus(Wire):
    """What a pool's engine serves and how it stands, as the agent last read it off the engine itself.

    `state` is one of ENGINE_STATES (the contract says what each means); only `ready` and `busy` serve.
    `url` is where clients of the pool reach the engine (placement answers it); `model_id` the model it
    was started with, which must be one the node has staged and verified.
    """

    kind: EngineKind
    state: EngineState
    model_id: ModelId
    url: EngineUrl
    version: ShortText | None = None
    # Requests the engine has queued for want of a free slot (llama-server's requests_deferred), when read.
    requests_deferred: Count | None = None


class PoolStatus(Wire):
    pool_id: Id
    ready: bool
    draining: bool
    slots_total: Count
    slots_free: Count
    vram_total_bytes: Bytes
    vram_free_bytes: Bytes
    # None for a pool with no engine configured: such a pool holds GPUs and staged models but serves nothing.
    engine: EngineStatus | None = None
    models_available: Annotated[list[ModelId], Meta(max_length=4096)] = []


class Heartbeat(Wire):
    # The agent's clock is reported but never trusted for liveness: the daemon's own clock decides.
    # Checked by shape only (a pattern the published schema states too), as nothing computes with it.
    timestamp: Timestamp
    pools: Annotated[list[PoolStatus], Meta(max_length=256)]


def check_registration(body: Registration) -> Registration:
    if not valid_node_id(body.node_id):
        raise ValidationProblem("$.node_id", f"node_id {body.node_id!r} is refused: {NODE_ID_RULE}")
    seen: set[str] = set()
    for number, pool in enumerate(body.pools):
        if pool.pool_id in seen:
            raise ValidationProblem(f"$.pools[{number}].pool_id", f"duplicate pool_id {pool.pool_id!r}")
        seen.add(pool.pool_id)
    return body


def check_heartbeat(body: Heartbeat) -> Heartbeat:
    seen: set[str] = set()
    for number, pool in enumerate(body.pools):
        if pool.slots_free > pool.slots_total:
            raise ValidationProblem(
                f"$.pools[{number}].slots_free",
                f"slots_free ({pool.slots_free}) must not exceed slots_total ({pool.slots_total})",
            )
        if pool.vram_free_bytes > pool.vram_total_bytes:
            raise ValidationProblem(
                f"$.pools[{number}].vram_free_bytes",
                f"vram_free_bytes ({pool.vram_free_bytes}) must not exceed vram_total_bytes "
                f"({pool.vram_total_bytes})",
            )
        if pool.pool_id in seen:
            raise ValidationProblem(f"$.pools[{number}].pool_id", f"duplicate pool_id {pool.pool_id!r}")
        seen.add(pool.pool_id)
    return body


# --- joining: a bootstrap (join) secret buys a credential bound to one node_id ------------------------

# What a secret looks like on the wire: `secrets.token_urlsafe(32)` behind a scope prefix (`lln_`, ...).
# The prefix only tells a person what a leaked string is; the daemon never trusts it.
Secret = Annotated[
    str, Meta(pattern=r"^[A-Za-z0-9_-]{32,256}$", description="a credential's secret; shown once")
]
ExpiresAt = Annotated[str, Meta(description="RFC 3339 UTC time after which the secret is refused")]


class JoinRequest(Wire):
    """POST /v2/join, authorised by a join secret or the node's recovery secret."""

    node_id: Id


class NodeCredential(Wire):
    """A node's own bearer secret, bound to its node_id, and when it stops working."""

    node_token: Secret
    expires_at: ExpiresAt


class JoinAnswer(Wire):
    node_id: str
    credential_name: Annotated[str, Meta(description="node/<node_id>: the name logs give the node token")]
    node_token: Secret
    expires_at: ExpiresAt
    # Single-use and bound to the node: lets a node that was off past its token's expiry join again alone.
    recovery_token: Secret


class RegisterAnswer(Wire):
    node_id: str
    status: NodeStatus
    heartbeat_interval_ms: int
    node_timeout_ms: int
    # First 16 hex of sha256 of the registration as the daemon stored it: the same on every replica.
    # Empty from a daemon that predates it.
    generation: str = ""


class HeartbeatAnswer(Wire, omit_defaults=True):  # no `credential: null` on every heartbeat
    next_heartbeat_ms: int
    drain: bool
    # The generation of the registration the daemon holds; an agent that registered another one (someone
    # replaced the record, or a replica restored an older one) registers again.
    generation: str = ""
    # A renewed node token, sent when less than half of the current one's life is left; the old one stays
    # valid until its own expiry, so an agent that misses this answer renews at the next heartbeat.
    credential: NodeCredential | None = None

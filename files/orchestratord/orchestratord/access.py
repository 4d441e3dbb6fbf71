"""Who may do what: the one place that decides scope x route x node_id.

Every /v2 route declares what it needs (`Need`, in routes.py's RULES); every credential has one scope.
The middleware asks `refusal()` once per request with the route's need and the node_id in its path; the
registration route asks again with the node_id of its body (the path has none).

  reader    GET /v2/*, POST /v2/placement
  operator  reader's, and drain, undrain, delete nodes
  admin     everything, credentials too (issue, list, revoke, rotate a node's), and may act for any node
            (the token_file token: `cluster-admin`)
  node      register, heartbeat and deregister its own node_id only
  join      POST /v2/join only (a general one, or one bound to a node_id)
  recovery  POST /v2/join for its own node_id only, once

Client keys (/v1) are another book altogether (client_keys.py): none of them opens a /v2 route.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# What a route needs. "node": the node routes (register, heartbeat, deregister), taken by the node's own
# credential or an admin; "operator_or_node": deregistering is the node's own act as well as an operator's.
Need = Literal["reader", "operator", "admin", "node", "operator_or_node", "join"]
Scope = Literal["reader", "operator", "admin", "node", "join", "recovery"]

SCOPES: tuple[str, ...] = ("reader", "operator", "admin", "node", "join", "recovery")
# Scopes an admin may issue through POST /v2/credentials; node and recovery credentials come from a join.
ISSUABLE_SCOPES: tuple[str, ...] = ("reader", "operator", "admin", "join")

# Which scopes meet each need, before any node binding is looked at.
_MEETS: dict[str, frozenset[str]] = {
    "reader": frozenset({"reader", "operator", "admin"}),
    "operator": frozenset({"operator", "admin"}),
    "admin": frozenset({"admin"}),
    "node": frozenset({"node", "admin"}),
    "operator_or_node": frozenset({"operator", "admin", "node"}),
    "join": frozenset({"join", "recovery", "admin"}),
}

# What each scope may do, for the refusal's message: a person reading a 403 learns what to use instead.
MAY: dict[str, str] = {
    "reader": "may only read /v2 and ask for placements",
    "operator": "may read, drain, undrain and delete nodes, not manage credentials",
    "admin": "may do everything",
    "node": "may only register, heartbeat and deregister its own node",
    "join": "may only join (POST /v2/join)",
    "recovery": "may only join its own node again (POST /v2/join)",
}


@dataclass(frozen=True, slots=True)
class Refusal:
    code: str  # FORBIDDEN, or NODE_IDENTITY_CHANGED
    message: str


def describe(name: str, scope: str, node_id: str | None) -> str:
    """How messages and logs name a credential: `operator 'alice'`, `node 'node/gpu-1'`."""
    return f"{scope} {name!r}" if node_id is None else f"{scope} {name!r} (bound to node {node_id})"


def refusal(need: str, scope: str, bound_node: str | None, name: str, node_id: str | None) -> Refusal | None:
    """None when a credential of `scope` (bound to `bound_node`, if a node or join credential) may act on
    a route that needs `need` for `node_id` (the node the request is about, if any); else why not."""
    if scope not in _MEETS[need]:
        return Refusal("FORBIDDEN", f"credential {describe(name, scope, bound_node)} {MAY[scope]}")
    bound = scope in ("node", "recovery") or (scope == "join" and bound_node is not None)
    if bound and node_id is not None and node_id != bound_node:
        return Refusal(
            "FORBIDDEN",
            f"credential {describe(name, scope, bound_node)} may not act for node {node_id}: it {MAY[scope]}",
        )
    return None


def identity_refusal(name: str, node_id: str, what: str, before: str | None, after: str | None) -> Refusal:
    """A node credential re-registering its node with another address or machine id: only an admin (or
    deleting the node first) may change who a node is."""
    return Refusal(
        "NODE_IDENTITY_CHANGED",
        f"credential {name!r} may not change the {what} of node {node_id} ({before!r} -> {after!r}): "
        "an operator deletes the node first, or an admin registers it",
    )


class Forbidden(Exception):
    """A refusal raised below the routes (the registry's identity check); answered 403."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.message)
        self.refusal = refusal

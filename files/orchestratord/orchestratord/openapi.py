"""The OpenAPI 3 document, generated from the same msgspec structs that decode the requests."""

from __future__ import annotations

from typing import Any

import msgspec

from . import __version__, schemas

REF = "#/components/schemas/{name}"

# The rules JSON Schema cannot state, in words.
REGISTER_RULES = (
    "Pool ids are unique; at most max_pools_per_node pools (400 past it). A new node past max_nodes is "
    "refused with 409 CLUSTER_FULL; a registered node may always register again."
)
HEARTBEAT_RULES = (
    "Every pool must be one the node registered, once; slots_free <= slots_total and vram_free_bytes <= "
    "vram_total_bytes; at most max_pools_per_node pools and max_models_per_node distinct models over all "
    "pools. Each rule broken is a 400 naming the field."
)

ERROR_ANSWERS = {
    "400": "Invalid body or parameter; the message names the field",
    "401": "Missing, unknown, revoked, expired or used-up bearer credential; the message says which",
    "403": "FORBIDDEN: the credential's scope does not allow this, or it is bound to another node; "
    "NODE_IDENTITY_CHANGED: a node credential changing its node's address or machine_id; NODE_ID_TAKEN: a "
    "general join credential for a node that has a credential already",
    "404": "No such node (or credential)",
    "409": "CLUSTER_FULL: a new node would pass max_nodes; CREDENTIAL_EXISTS: the name is taken",
    "413": "Body larger than max_body_bytes",
    "503": "STORE_UNAVAILABLE: the database cannot take writes (e.g. a full disk); nothing changed",
}


def _json(ref: str, description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": REF.format(name=ref)}}},
    }


def _errors(*codes: str) -> dict[str, Any]:
    return {code: _json("Error", ERROR_ANSWERS[code]) for code in codes}


def _body(name: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": {"$ref": REF.format(name=name)}}}}


NODE_ID_PARAM = {
    "name": "node_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": schemas.ID_PATTERN},
}


OPENAI_ERROR = {"description": "OpenAI's error shape: {error: {message, type, param, code}}"}


def _client_routes() -> dict[str, Any]:
    """/v1/*: OpenAI's shapes, passed through to the engines (docs/gateway.md); needs a client key."""
    client_key = [{"clientKey": []}]
    passed_through = {
        "200": {
            "description": "The engine's answer, passed through (JSON, or text/event-stream when streaming)"
        },
        **{code: OPENAI_ERROR for code in ("400", "401", "404", "413", "429", "502", "503", "504")},
    }
    body = {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["model"],
                    "properties": {
                        "model": {"type": "string", "pattern": schemas.MODEL_ID_PATTERN},
                        "stream": {"type": "boolean"},
                    },
                    "additionalProperties": True,
                }
            }
        },
    }
    return {
        "/v1/models": {
            "get": {
                "summary": "Models some serving engine serves",
                "security": client_key,
                "responses": {
                    "200": {"description": "{object: list, data: [{id, object, created, owned_by}]}"},
                    "401": OPENAI_ERROR,
                },
            }
        },
        "/v1/chat/completions": {
            "post": {
                "summary": "Chat completion",
                "security": client_key,
                "requestBody": body,
                "responses": passed_through,
            }
        },
        "/v1/completions": {
            "post": {
                "summary": "Text completion",
                "security": client_key,
                "requestBody": body,
                "responses": passed_through,
            }
        },
    }


SCOPES_NOTE = (
    "Scopes: reader (GET /v2/*, POST /v2/placement), operator (reader's, drain, undrain, delete), admin "
    "(everything), node (register, heartbeat, deregister its own node), join (POST /v2/join). See "
    "docs/credentials.md."
)


def _credential_routes() -> dict[str, Any]:
    name_param = {
        "name": "name",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "minLength": 1, "maxLength": 300},
    }
    return {
        "/v2/credentials": {
            "post": {
                "summary": "Issue a credential (admin); its secret is in this answer only",
                "description": SCOPES_NOTE,
                "requestBody": _body("CredentialRequest"),
                "responses": {
                    "201": _json("CredentialIssued", "Issued"),
                    **_errors("400", "401", "403", "409", "413", "503"),
                },
            },
            "get": {
                "summary": "The credentials, without secrets (admin)",
                "responses": {"200": _json("CredentialList", "By name"), **_errors("401", "403")},
            },
        },
        "/v2/credentials/{name}": {
            "delete": {
                "summary": "Revoke a credential (admin), effective at once",
                "parameters": [name_param],
                "responses": {"204": {"description": "Revoked"}, **_errors("401", "403", "404", "503")},
            }
        },
        "/v2/nodes/{node_id}/credential/rotate": {
            "post": {
                "summary": "Rotate a node's credentials (admin): its node token is renewed at its next "
                "heartbeat, its recovery credential replaced now",
                "description": "The answer holds the new recovery secret, this once, for the node's "
                "credential_dir; the node's current token becomes node/<id>/old at the renewal. See "
                "docs/credentials.md#rotation.",
                "parameters": [NODE_ID_PARAM],
                "responses": {
                    "200": _json("CredentialIssued", "The new recovery credential"),
                    **_errors("400", "401", "403", "404", "503"),
                },
            }
        },
        "/v2/join": {
            "post": {
                "summary": "Join a node with a join or recovery secret: its node token and recovery token",
                "requestBody": _body("JoinRequest"),
                "responses": {
                    "200": _json("JoinAnswer", "Joined"),
                    **_errors("400", "401", "403", "413", "503"),
                },
            }
        },
    }


def build_document(metrics_enabled: bool = True) -> dict[str, Any]:
    _schemas, components = msgspec.json.schema_components(
        [
            schemas.Registration,
            schemas.Heartbeat,
            schemas.DrainRequest,
            schemas.PlacementRequest,
            schemas.Error,
            schemas.Health,
            schemas.Ready,
            schemas.RegisterAnswer,
            schemas.HeartbeatAnswer,
            schemas.Node,
            schemas.NodeList,
            schemas.Availability,
            schemas.CatalogModels,
            schemas.Placement,
            schemas.ReaderCredentialRequest,
            schemas.OperatorCredentialRequest,
            schemas.AdminCredentialRequest,
            schemas.JoinCredentialRequest,
            schemas.CredentialIssued,
            schemas.CredentialList,
            schemas.JoinRequest,
            schemas.JoinAnswer,
            schemas.Certificates,
        ],
        ref_template=REF,
    )
    # The credential request is a union told apart by `scope`: one named schema for the route to refer to.
    (components["CredentialRequest"],), _more = msgspec.json.schema_components(
        [schemas.CredentialRequest], ref_template=REF
    )
    secured = [{"bearer": []}]
    paths: dict[str, Any] = {
        "/health": {
            "get": {
                "summary": "Liveness of the daemon",
                "security": [],
                "responses": {"200": _json("Health", "The daemon runs")},
            }
        },
        "/ready": {
            "get": {
                "summary": "Readiness: the database answers",
                "security": [],
                "responses": {
                    "200": _json("Ready", "Ready"),
                    "503": _json("Error", "Database not answering"),
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "security": [],
                "responses": {
                    "200": {"description": "OpenAPI 3 document", "content": {"application/json": {}}}
                },
            }
        },
        "/v2/nodes/register": {
            "post": {
                "summary": "Register a node, or update its registration",
                "description": REGISTER_RULES,
                "requestBody": _body("Registration"),
                "responses": {
                    "200": _json("RegisterAnswer", "Registered"),
                    **_errors("400", "401", "403", "409", "413", "503"),
                },
            }
        },
        "/v2/nodes/{node_id}/heartbeat": {
            "post": {
                "summary": "Report a node's pools; the answer says when to report again and whether to drain",
                "description": HEARTBEAT_RULES,
                "parameters": [NODE_ID_PARAM],
                "requestBody": _body("Heartbeat"),
                "responses": {
                    "200": _json("HeartbeatAnswer", "Recorded"),
                    **_errors("400", "401", "403", "404", "413"),
                },
            }
        },
        "/v2/certificates": {
            "get": {
                "summary": "Days left on the certificate this daemon serves and on the cluster CA (reader)",
                "responses": {
                    "200": _json("Certificates", "Server first, then the CA"),
                    **_errors("401", "403"),
                },
            }
        },
        "/v2/nodes": {
            "get": {
                "summary": "List nodes",
                "parameters": [
                    {
                        "name": "status",
                        "in": "query",
                        "required": False,
                        "schema": {
                            "type": "string",
                            "enum": ["registering", "online", "draining", "offline"],
                        },
                    }
                ],
                "responses": {
                    "200": _json("NodeList", "Nodes, sorted by id"),
                    **_errors("400", "401", "403"),
                },
            }
        },
        "/v2/nodes/{node_id}": {
            "get": {
                "summary": "One node",
                "parameters": [NODE_ID_PARAM],
                "responses": {"200": _json("Node", "The node"), **_errors("400", "401", "403", "404")},
            },
            "delete": {
                "summary": "Deregister a node",
                "parameters": [NODE_ID_PARAM],
                "responses": {
                    "204": {"description": "Deregistered"},
                    **_errors("400", "401", "403", "404", "503"),
                },
            },
        },
        "/v2/nodes/{node_id}/drain": {
            "post": {
                "summary": "Drain (true) or undrain (false) a node; placement skips a draining node",
                "parameters": [NODE_ID_PARAM],
                "requestBody": _body("DrainRequest"),
                "responses": {
                    "200": _json("Node", "The node"),
                    **_errors("400", "401", "403", "404", "413", "503"),
                },
            }
        },
        "/v2/catalog/availability": {
            "get": {
                "summary": "Models per node; replication counted per node, not per pool",
                "responses": {"200": _json("Availability", "Availability"), **_errors("401", "403")},
            }
        },
        "/v2/catalog/models": {
            "get": {
                "summary": "Models on online nodes",
                "responses": {"200": _json("CatalogModels", "Models"), **_errors("401", "403")},
            }
        },
        "/v2/placement": {
            "post": {
                "summary": "Pick a pool for a model",
                "requestBody": _body("PlacementRequest"),
                "responses": {
                    "200": _json("Placement", "The chosen pool"),
                    **_errors("400", "401", "403", "413"),
                    "503": _json("Error", "MODEL_NOT_AVAILABLE or NO_CAPACITY"),
                },
            }
        },
        "/v2/placement/errors": {
            "get": {
                "summary": "The last 100 placement errors (placement and gateway), newest first",
                "responses": {
                    "200": {"description": "{errors: [{at, source, model_id, code, message}], count}"},
                    **_errors("401", "403"),
                },
            }
        },
        **_credential_routes(),
        **_client_routes(),
    }
    if metrics_enabled:
        paths["/metrics"] = {
            "get": {
                "summary": "Prometheus metrics",
                "security": [],
                "responses": {"200": {"description": "Prometheus text", "content": {"text/plain": {}}}},
            }
        }
    return {
        "openapi": "3.1.0",
        "info": {"title": "orchestratord", "version": __version__},
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "clientKey": {"type": "http", "scheme": "bearer", "description": "a client API key"},
            },
        },
        "security": secured,
        "paths": paths,
    }

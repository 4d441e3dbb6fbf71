"""Fuzz the running daemon against its own /openapi.json: no 5xx, every error in the envelope.

Bounded by hypothesis settings so the whole run stays in seconds; nodes are registered first so that
generated heartbeats, drains and placements meet real state as well as unknown ids.
"""

from __future__ import annotations

import json

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import CheckContext, not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.core.failures import CustomFailure
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance
from support import make_daemon
from support_daemon import beat_pools, online_node, pool_reading, serving

MAX_EXAMPLES = 25


@pytest.fixture(scope="module")
def fuzzed_daemon(tmp_path_factory):
    daemon = make_daemon(tmp_path_factory.mktemp("fuzz")).start()
    for node_id in ("gpu-1", "gpu-2", "gpu-3"):
        online_node(daemon, node_id, ["llama"], serve="llama", pools=2)
    # Engines in the states that serve nothing, so the read routes and placement meet them too.
    beat_pools(
        daemon,
        "gpu-3",
        [
            pool_reading(
                "pool-0", ["llama"], slots_free=0, engine=serving("gpu-3", "pool-0", "llama", "busy")
            ),
            pool_reading(
                "pool-1", ["llama"], ready=False, engine=serving("gpu-3", "pool-1", "llama", "dead")
            ),
        ],
    )
    yield daemon
    daemon.stop()
    assert "Traceback" not in daemon.log()


def errors_use_the_envelope(ctx: CheckContext, response, case) -> None:
    """Every 4xx/5xx body is exactly {code, message} with a SCREAMING_SNAKE code."""
    if response.status_code < 400:
        return
    try:
        body = json.loads(response.content)
    except ValueError:
        body = None
    if not (
        isinstance(body, dict)
        and set(body) == {"code", "message"}
        and isinstance(body["code"], str)
        and body["code"].replace("_", "").isalpha()
        and body["code"].isupper()
        and isinstance(body["message"], str)
    ):
        raise CustomFailure(
            operation=case.operation.label,
            title="Error outside the envelope",
            message=f"{response.status_code}: {response.content[:200]!r}",
            exception=AssertionError(),
        )


def operations(daemon) -> list:
    # The token goes through schemathesis' own auth for the document's "bearer" scheme, so that negative
    # cases that leave it out really go without it.
    config = SchemathesisConfig.from_dict({"auth": {"openapi": {"bearer": {"bearer": daemon.token}}}})
    loaded = schemathesis.openapi.from_url(daemon.url + "/openapi.json", config=config)
    # /v1/* answers in OpenAI's error shape and passes bodies to engines: tests/test_gateway*.py cover it.
    operations = [result.ok() for result in loaded.get_all_operations()]
    return [operation for operation in operations if not operation.path.startswith("/v1/")]


def no_server_error(ctx: CheckContext, response, case) -> bool | None:
    """No 5xx, except a 503 that the operation documents (placement: no capacity; ready: no database)."""
    if response.status_code == 503 and "503" in case.operation.definition.raw.get("responses", {}):
        return None
    return not_a_server_error(ctx, response, case)


# Rules across fields, or against the node's registration and the daemon's limits, that JSON Schema cannot
# state; the document describes them in words.
CROSS_FIELD_RULES = (
    "duplicate pool_id",
    "must not exceed slots_total",
    "must not exceed vram_total_bytes",
    "not in the node's registration",
    "max_pools_per_node",
    "max_models_per_node",
)


def accepts_valid_data(ctx: CheckContext, response, case) -> bool | None:
    """schemathesis' positive_data_acceptance, except for a 400 that cites a cross-field rule."""
    if response.status_code == 400 and any(rule in response.text for rule in CROSS_FIELD_RULES):
        return None
    return positive_data_acceptance(ctx, response, case)


def test_the_document_describes_the_engine_of_each_pool(fuzzed_daemon):
    """The fuzzer generates heartbeats from the document: it must know the engine struct and its rules."""
    components = fuzzed_daemon.api("GET", "/openapi.json").body["components"]["schemas"]
    engine = components["EngineStatus"]
    assert set(engine["required"]) == {"kind", "state", "model_id", "url"}
    assert engine["properties"]["state"]["enum"] == sorted(["loading", "ready", "busy", "dead"])
    assert engine["properties"]["url"]["pattern"].startswith("^https?://")
    pool_engine = components["PoolStatus"]["properties"]["engine"]
    assert {"$ref": "#/components/schemas/EngineStatus"} in pool_engine["anyOf"]
    placement = components["Placement"]["properties"]
    assert {"engine_url", "engine_kind", "model_id"} <= set(placement)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_daemon_honours_its_openapi_document(fuzzed_daemon, mode):
    checked = []
    statuses: dict[str, set[int]] = {}

    def record_status(ctx: CheckContext, response, case) -> None:
        statuses.setdefault(case.operation.label, set()).add(response.status_code)

    for operation in operations(fuzzed_daemon):
        raw = operation.definition.raw
        if mode is GenerationMode.NEGATIVE and not (raw.get("parameters") or raw.get("requestBody")):
            continue  # nothing in the request to get wrong

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
            phases=[Phase.explicit, Phase.generate],
        )
        def fuzz(case):
            case.call_and_validate(
                additional_checks=[
                    errors_use_the_envelope,
                    accepts_valid_data,
                    no_server_error,
                    record_status,
                ],
                excluded_checks=[positive_data_acceptance, not_a_server_error],
            )

        fuzz()
        checked.append(operation.label)
    if mode is GenerationMode.POSITIVE:  # the token was sent: valid requests got through
        assert 200 in statuses["POST /v2/nodes/register"], statuses
        assert 200 in statuses["GET /v2/nodes"], statuses
    else:  # invalid requests were refused, for bad input and for a missing token alike
        assert {400, 401} <= statuses["POST /v2/nodes/register"], statuses
    # Every route with an input is fuzzed in both modes; the probes only with valid requests.
    assert len(checked) >= (12 if mode is GenerationMode.POSITIVE else 7), checked

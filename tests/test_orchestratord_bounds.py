"""What a node may claim is bounded: pools and models per node, nodes per cluster. A claim past a bound,
a pool the node never registered or more free VRAM than total is refused naming the field and the limit,
and changes nothing."""

from __future__ import annotations

import pytest
from support import sample_heartbeat, sample_registration
from support_daemon import beat_pools, online_node, place, pool_reading

LIMITS = {"max_nodes": 3, "max_pools_per_node": 4, "max_models_per_node": 10}


@pytest.fixture
def bounded(daemon_factory):
    return daemon_factory(**LIMITS)


def heartbeat(daemon, node_id, pools):
    return daemon.api(
        "POST", f"/v2/nodes/{node_id}/heartbeat", {"timestamp": "2026-01-01T00:00:00Z", "pools": pools}
    )


def assert_refused(answer, field: str, *words: str) -> None:
    assert answer.status == 400, answer.text
    assert answer.body["code"] == "INVALID_PARAMS"
    for word in (field, *words):
        assert word in answer.body["message"], answer.body["message"]


def test_registration_with_more_pools_than_the_limit_is_400(bounded):
    answer = bounded.api("POST", "/v2/nodes/register", sample_registration("gpu-1", pools=5))
    assert_refused(answer, "$.pools", "max_pools_per_node (4)")
    assert bounded.api("GET", "/v2/nodes/gpu-1").status == 404


def test_registration_at_the_pool_limit_is_accepted(bounded):
    online_node(bounded, "gpu-1", ["llama"], serve="llama", pools=4)


def test_heartbeat_with_more_distinct_models_than_the_limit_is_400(bounded):
    online_node(bounded, "gpu-1", ["llama"], serve="llama", pools=2)
    models = [f"model-{n}" for n in range(8)]  # with a, b, c: 11 distinct
    answer = heartbeat(
        bounded,
        "gpu-1",
        [pool_reading("pool-0", [*models[:3], "a", "b", "c"]), pool_reading("pool-1", models)],
    )
    assert_refused(answer, "$.pools[1].models_available", "max_models_per_node (10)")
    assert bounded.api("GET", "/v2/nodes/gpu-1").body["models"] == ["llama"]  # nothing changed


def test_the_same_models_in_every_pool_count_once(bounded):
    online_node(bounded, "gpu-1", ["llama"], serve="llama", pools=4)
    models = [f"model-{n}" for n in range(10)]
    beat_pools(bounded, "gpu-1", [pool_reading(f"pool-{n}", models) for n in range(4)])
    assert bounded.api("GET", "/v2/nodes/gpu-1").body["models"] == sorted(models)


def test_heartbeat_with_a_pool_the_node_never_registered_is_400(bounded):
    online_node(bounded, "gpu-1", ["llama"], serve="llama", pools=1)
    ghost = pool_reading("ghost", ["llama"], slots_total=1_000_000, slots_free=1_000_000)
    answer = heartbeat(bounded, "gpu-1", [pool_reading("pool-0", ["llama"], slots_free=1), ghost])
    assert_refused(answer, "$.pools[1].pool_id", "'ghost'", "registration")
    assert place(bounded, model_id="llama").body["pool_id"] == "pool-0"


def test_heartbeat_with_more_free_vram_than_total_is_400(bounded):
    registration = online_node(bounded, "gpu-1", ["llama"], serve="llama", pools=1)
    body = sample_heartbeat(registration, ["llama"], vram_total_bytes=10, vram_free_bytes=11)
    answer = bounded.api("POST", "/v2/nodes/gpu-1/heartbeat", body)
    assert_refused(answer, "$.pools[0].vram_free_bytes", "vram_total_bytes (10)")


def test_a_new_node_past_max_nodes_is_409_and_known_nodes_still_register(bounded):
    for node_id in ("gpu-1", "gpu-2", "gpu-3"):
        online_node(bounded, node_id, ["llama"], serve="llama")
    answer = bounded.api("POST", "/v2/nodes/register", sample_registration("gpu-4"))
    assert answer.status == 409, answer.text
    assert answer.body["code"] == "CLUSTER_FULL"
    assert "max_nodes (3)" in answer.body["message"]
    assert bounded.api("POST", "/v2/nodes/register", sample_registration("gpu-2")).status == 200
    assert bounded.api("DELETE", "/v2/nodes/gpu-1").status == 204
    assert bounded.api("POST", "/v2/nodes/register", sample_registration("gpu-4")).status == 200


def test_the_defaults_hold_a_big_node(daemon):
    # 8 GPUs split into 7 MIG slices each, and a full model manifest (the contract's MAX_MANIFEST_ENTRIES,
    # 4096) spread over the pools.
    online_node(daemon, "gpu-1", ["llama"], serve="llama", pools=56)
    models = [f"org/model-{n}" for n in range(4096)]
    pools = [pool_reading(f"pool-{n}", models[n::56]) for n in range(56)]
    beat_pools(daemon, "gpu-1", pools)
    assert len(daemon.api("GET", "/v2/nodes/gpu-1").body["models"]) == 4096

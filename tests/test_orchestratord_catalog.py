"""The catalog counts models per node, never per pool, and only on online nodes."""

from __future__ import annotations

from support import sample_registration
from support_daemon import beat_pools, online_node, pool_reading


def test_model_in_two_pools_of_one_node_is_a_single_node_model(daemon):
    daemon.api("POST", "/v2/nodes/register", sample_registration("gpu-1", pools=2))
    beat_pools(daemon, "gpu-1", [pool_reading("pool-0", ["llama"]), pool_reading("pool-1", ["llama"])])
    availability = daemon.api("GET", "/v2/catalog/availability").body
    assert availability["single_node_models"] == ["llama"]
    assert availability["replicated_models"] == []
    assert availability["total_models"] == 1
    node = availability["nodes"]["gpu-1"]
    assert node["online"] is True
    assert node["models"] == ["llama"]
    assert node["address"] == "http://gpu-1.lab:8080"
    assert node["pools"] == [
        {"pool_id": "pool-0", "ready": True, "models": ["llama"]},
        {"pool_id": "pool-1", "ready": True, "models": ["llama"]},
    ]


def test_model_on_two_nodes_is_replicated(daemon):
    online_node(daemon, "gpu-1", ["llama", "mistral"])
    online_node(daemon, "gpu-2", ["llama", "qwen"], pools=2)
    availability = daemon.api("GET", "/v2/catalog/availability").body
    assert availability["replicated_models"] == ["llama"]
    assert availability["single_node_models"] == ["mistral", "qwen"]
    assert availability["total_models"] == 3
    assert availability["nodes"]["gpu-2"]["models"] == ["llama", "qwen"]


def test_drained_node_does_not_count(daemon):
    online_node(daemon, "gpu-1", ["llama"])
    online_node(daemon, "gpu-2", ["llama"])
    daemon.api("POST", "/v2/nodes/gpu-2/drain", {"drain": True})
    availability = daemon.api("GET", "/v2/catalog/availability").body
    assert availability["nodes"]["gpu-2"]["online"] is False
    assert availability["replicated_models"] == []
    assert availability["single_node_models"] == ["llama"]


def test_catalog_models_counts_replicas_pools_and_slots(daemon):
    daemon.api("POST", "/v2/nodes/register", sample_registration("gpu-1", pools=2))
    beat_pools(
        daemon,
        "gpu-1",
        [pool_reading("pool-0", ["llama"], slots_free=3), pool_reading("pool-1", ["llama"], slots_free=1)],
    )
    daemon.api("POST", "/v2/nodes/register", sample_registration("gpu-2", pools=2))
    beat_pools(
        daemon,
        "gpu-2",
        [pool_reading("pool-0", ["llama", "qwen"]), pool_reading("pool-1", ["qwen"], ready=False)],
    )
    models = daemon.api("GET", "/v2/catalog/models").body["models"]
    assert models == [
        {"model_id": "llama", "nodes": ["gpu-1", "gpu-2"], "replicas": 2, "pools_ready": 3, "slots_free": 8},
        {"model_id": "qwen", "nodes": ["gpu-2"], "replicas": 1, "pools_ready": 1, "slots_free": 4},
    ]


def test_model_ids_with_a_publisher_prefix_are_accepted(daemon):
    online_node(daemon, "gpu-1", ["meta-llama/Llama-3.1-8B-Instruct"])
    models = daemon.api("GET", "/v2/catalog/models").body["models"]
    assert [model["model_id"] for model in models] == ["meta-llama/Llama-3.1-8B-Instruct"]

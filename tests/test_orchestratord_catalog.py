"""The catalog counts models per node, never per pool, and only on online nodes; it tells a model its
engines serve from one that is merely staged."""

from __future__ import annotations

from support import sample_registration
from support_daemon import beat_pools, engine_url, online_node, pool_reading, serving


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
    assert node["served"] == []
    assert node["pools"] == [
        {"pool_id": "pool-0", "ready": True, "models": ["llama"], "engine": None},
        {"pool_id": "pool-1", "ready": True, "models": ["llama"], "engine": None},
    ]


def test_availability_shows_each_pools_engine(daemon):
    online_node(daemon, "gpu-1", ["llama", "qwen"], pools=2, serve="qwen")
    node = daemon.api("GET", "/v2/catalog/availability").body["nodes"]["gpu-1"]
    assert node["models"] == ["llama", "qwen"]
    assert node["served"] == ["qwen"]
    assert [pool["engine"]["url"] for pool in node["pools"]] == [
        engine_url("gpu-1", "pool-0"),
        engine_url("gpu-1", "pool-1"),
    ]
    assert {pool["engine"]["state"] for pool in node["pools"]} == {"ready"}


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


def engine(node_id: str, pool_id: str, model: str, state: str = "ready", serving_now: bool = True) -> dict:
    return {
        "node_id": node_id,
        "pool_id": pool_id,
        "kind": "llama.cpp",
        "state": state,
        "url": engine_url(node_id, pool_id),
        "serving": serving_now,
    }


def test_catalog_models_tells_served_from_staged(daemon):
    daemon.api("POST", "/v2/nodes/register", sample_registration("gpu-1", pools=2))
    beat_pools(
        daemon,
        "gpu-1",
        [
            pool_reading("pool-0", ["llama"], slots_free=3, engine=serving("gpu-1", "pool-0", "llama")),
            pool_reading(
                "pool-1", ["llama"], slots_free=0, engine=serving("gpu-1", "pool-1", "llama", "busy")
            ),
        ],
    )
    daemon.api("POST", "/v2/nodes/register", sample_registration("gpu-2", pools=3))
    beat_pools(
        daemon,
        "gpu-2",
        [
            # qwen: staged with llama, its engine still loading its model (pool not ready yet).
            pool_reading(
                "pool-0", ["llama", "qwen"], ready=False, engine=serving("gpu-2", "pool-0", "qwen", "loading")
            ),
            pool_reading("pool-1", ["qwen"], ready=False, engine=serving("gpu-2", "pool-1", "qwen", "dead")),
            pool_reading("pool-2", ["mistral"], engine=None),  # staged, no engine at all
        ],
    )
    models = daemon.api("GET", "/v2/catalog/models").body["models"]
    assert models == [
        {
            "model_id": "llama",
            "nodes": ["gpu-1", "gpu-2"],
            "replicas": 2,
            "pools_ready": 2,
            "slots_free": 3,
            "engines": [engine("gpu-1", "pool-0", "llama"), engine("gpu-1", "pool-1", "llama", "busy")],
            "served": True,
        },
        {
            "model_id": "mistral",
            "nodes": ["gpu-2"],
            "replicas": 1,
            "pools_ready": 0,
            "slots_free": 0,
            "engines": [],
            "served": False,
        },
        {
            "model_id": "qwen",
            "nodes": ["gpu-2"],
            "replicas": 1,
            "pools_ready": 0,
            "slots_free": 0,
            "engines": [
                engine("gpu-2", "pool-0", "qwen", "loading", serving_now=False),
                engine("gpu-2", "pool-1", "qwen", "dead", serving_now=False),
            ],
            "served": False,
        },
    ]
    # The node view says the same per node: staged models and what its engines serve.
    node = daemon.api("GET", "/v2/nodes/gpu-2").body
    assert (node["models"], node["served"]) == (["llama", "mistral", "qwen"], ["qwen"])
    assert [pool["engine"] and pool["engine"]["state"] for pool in node["pools"]] == ["loading", "dead", None]


def test_a_drained_pool_serves_nothing_in_the_catalog(daemon):
    daemon.api("POST", "/v2/nodes/register", sample_registration("gpu-1", pools=2))
    draining = pool_reading("pool-0", ["llama"], draining=True, engine=serving("gpu-1", "pool-0", "llama"))
    beat_pools(daemon, "gpu-1", [draining, pool_reading("pool-1", [])])  # one pool left: node online
    [model] = daemon.api("GET", "/v2/catalog/models").body["models"]
    assert (model["served"], model["pools_ready"], model["engines"][0]["serving"]) == (False, 0, False)
    assert model["engines"][0]["state"] == "ready"  # the engine is fine; the pool takes no work


def test_model_ids_with_a_publisher_prefix_are_accepted(daemon):
    online_node(daemon, "gpu-1", ["meta-llama/Llama-3.1-8B-Instruct"])
    models = daemon.api("GET", "/v2/catalog/models").body["models"]
    assert [model["model_id"] for model in models] == ["meta-llama/Llama-3.1-8B-Instruct"]

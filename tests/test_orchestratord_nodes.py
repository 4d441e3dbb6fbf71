"""Nodes: register, heartbeat, list, get, drain, delete — over real HTTP."""

from __future__ import annotations

import sqlite3

from support import sample_heartbeat, sample_registration
from support_daemon import beat, beat_pools, online_node, pool_reading, status_of


def test_register_answers_status_and_timings(daemon):
    answer = daemon.api("POST", "/v2/nodes/register", sample_registration("gpu-1"))
    assert answer.status == 200
    generation = answer.body.pop("generation")
    assert answer.body == {
        "node_id": "gpu-1",
        "status": "registering",
        "heartbeat_interval_ms": 200,
        "node_timeout_ms": 3000,
    }
    assert len(generation) == 16 and int(generation, 16) >= 0


def test_first_heartbeat_brings_a_node_online(daemon):
    registration = sample_registration("gpu-1", pools=2)
    daemon.api("POST", "/v2/nodes/register", registration)
    assert status_of(daemon, "gpu-1") == "registering"
    generation = daemon.api("POST", "/v2/nodes/register", registration).body["generation"]
    assert beat(daemon, registration, ["llama-3-8b"]) == {
        "next_heartbeat_ms": 200,
        "drain": False,
        "generation": generation,
    }
    node = daemon.api("GET", "/v2/nodes/gpu-1").body
    assert node["status"] == "online"
    assert node["models"] == ["llama-3-8b"]
    assert node["address"] == registration["address"]
    assert node["machine_id"] == "machine-gpu-1"
    assert node["capabilities"]["gpus"][1]["index"] == 1
    assert [pool["pool_id"] for pool in node["pools"]] == ["pool-0", "pool-1"]
    assert node["pools"][1]["gpus"] == [1]
    assert node["pools"][0]["slots_free"] == 4
    assert node["registered_at"].endswith("Z") and node["last_heartbeat_at"].endswith("Z")


def test_list_filters_on_status(daemon):
    online_node(daemon, "gpu-b")
    online_node(daemon, "gpu-a")
    daemon.api("POST", "/v2/nodes/register", sample_registration("gpu-new"))
    online_node(daemon, "gpu-drained")
    daemon.api("POST", "/v2/nodes/gpu-drained/drain", {"drain": True})

    everything = daemon.api("GET", "/v2/nodes").body
    assert everything["count"] == 4
    assert [node["node_id"] for node in everything["nodes"]] == ["gpu-a", "gpu-b", "gpu-drained", "gpu-new"]
    online = daemon.api("GET", "/v2/nodes?status=online").body
    assert [node["node_id"] for node in online["nodes"]] == ["gpu-a", "gpu-b"]
    assert online["count"] == 2
    assert [n["node_id"] for n in daemon.api("GET", "/v2/nodes?status=registering").body["nodes"]] == [
        "gpu-new"
    ]
    assert [n["node_id"] for n in daemon.api("GET", "/v2/nodes?status=draining").body["nodes"]] == [
        "gpu-drained"
    ]
    assert daemon.api("GET", "/v2/nodes?status=offline").body == {"nodes": [], "count": 0}


def test_registering_again_updates_the_record_and_keeps_the_drain(daemon):
    registration = online_node(daemon, "gpu-1")
    daemon.api("POST", "/v2/nodes/gpu-1/drain", {"drain": True})
    registration["address"] = "http://10.0.0.9:8080"
    registration["version"] = "0.2.0"
    assert daemon.api("POST", "/v2/nodes/register", registration).status == 200
    node = daemon.api("GET", "/v2/nodes/gpu-1").body
    assert node["address"] == "http://10.0.0.9:8080"
    assert node["version"] == "0.2.0"
    assert node["drain"] is True
    assert daemon.api("GET", "/v2/nodes").body["count"] == 1
    answer = beat(daemon, registration)
    assert (answer["next_heartbeat_ms"], answer["drain"]) == (200, True)


def test_heartbeat_from_unknown_node_is_404(daemon):
    registration = sample_registration("ghost")
    answer = daemon.api("POST", "/v2/nodes/ghost/heartbeat", sample_heartbeat(registration))
    assert answer.status == 404
    assert answer.body["code"] == "NODE_NOT_FOUND"
    assert "ghost" in answer.body["message"]


def test_get_unknown_node_is_404(daemon):
    answer = daemon.api("GET", "/v2/nodes/nobody")
    assert answer.status == 404
    assert answer.body["code"] == "NODE_NOT_FOUND"


def test_drain_and_undrain(daemon):
    registration = online_node(daemon, "gpu-1")
    drained = daemon.api("POST", "/v2/nodes/gpu-1/drain", {"drain": True})
    assert drained.status == 200
    assert drained.body["status"] == "draining" and drained.body["drain"] is True
    assert beat(daemon, registration)["drain"] is True
    undrained = daemon.api("POST", "/v2/nodes/gpu-1/drain", {"drain": False})
    assert undrained.body["status"] == "online" and undrained.body["drain"] is False
    assert beat(daemon, registration)["drain"] is False


def test_drain_of_unknown_node_is_404(daemon):
    answer = daemon.api("POST", "/v2/nodes/nobody/drain", {"drain": True})
    assert answer.status == 404
    assert answer.body["code"] == "NODE_NOT_FOUND"


def test_node_whose_every_pool_drains_is_draining(daemon):
    daemon.api("POST", "/v2/nodes/register", sample_registration("gpu-1", pools=2))
    beat_pools(daemon, "gpu-1", [pool_reading("pool-0", [], draining=True), pool_reading("pool-1", [])])
    assert status_of(daemon, "gpu-1") == "online"
    beat_pools(
        daemon,
        "gpu-1",
        [pool_reading("pool-0", [], draining=True), pool_reading("pool-1", [], draining=True)],
    )
    assert status_of(daemon, "gpu-1") == "draining"


def test_delete_twice_second_is_404(daemon):
    registration = online_node(daemon, "gpu-1")
    first = daemon.api("DELETE", "/v2/nodes/gpu-1")
    assert first.status == 204 and first.text == ""
    second = daemon.api("DELETE", "/v2/nodes/gpu-1")
    assert second.status == 404
    assert second.body["code"] == "NODE_NOT_FOUND"
    assert daemon.api("GET", "/v2/nodes").body["count"] == 0
    # The agent learns it is gone from its next heartbeat and registers again.
    answer = daemon.api("POST", "/v2/nodes/gpu-1/heartbeat", sample_heartbeat(registration))
    assert answer.status == 404


def test_ready_when_the_database_answers(daemon):
    answer = daemon.api("GET", "/ready", token=None)
    assert answer.status == 200
    assert answer.body == {"status": "ready"}


def test_not_ready_while_the_database_cannot_be_read_and_ready_again_after(daemon):
    # Another process renames the table under the running daemon: its readiness read fails as it would on a
    # damaged file. (With WAL every open connection holds a shared lock, so no lock can shut the daemon out.)
    database = sqlite3.connect(daemon.config["db_path"], isolation_level=None)
    try:
        database.execute("ALTER TABLE nodes RENAME TO nodes_aside")
        answer = daemon.api("GET", "/ready", token=None)
        assert answer.status == 503
        assert answer.body == {"code": "DATABASE_UNAVAILABLE", "message": "the database does not answer"}
        assert daemon.api("GET", "/health", token=None).status == 200  # alive, only not ready
        database.execute("ALTER TABLE nodes_aside RENAME TO nodes")
        assert daemon.api("GET", "/ready", token=None).status == 200
    finally:
        database.close()
    assert "readiness check failed" in daemon.log()

"""Concurrent writes: registrations, drains and deletions of one node sent together answer as if one after
the other, and what the API then shows is what survives kill -9."""

from __future__ import annotations

import signal
import sqlite3

from support import sample_registration
from support_daemon import at_once, online_node, place

ROUNDS = 12


def stored_drain(db_path: str) -> dict[str, bool]:
    with sqlite3.connect(db_path) as db:
        return {node_id: bool(drain) for node_id, drain in db.execute("SELECT node_id, drain FROM nodes")}


def test_two_deletes_at_once_answer_204_then_404(daemon):
    for n in range(ROUNDS):
        assert daemon.api("POST", "/v2/nodes/register", sample_registration(f"gpu-{n}")).status == 200
    for n in range(ROUNDS):
        answers = at_once(daemon, [("DELETE", f"/v2/nodes/gpu-{n}", None)] * 2)
        assert sorted(answer.status for answer in answers) == [204, 404], [a.text for a in answers]
        assert next(a for a in answers if a.status == 404).body["code"] == "NODE_NOT_FOUND"
    assert daemon.api("GET", "/v2/nodes").body["count"] == 0
    assert daemon.log().count(" deregistered") == ROUNDS


def test_drains_at_once_leave_the_api_and_the_disk_agreeing(daemon):
    for n in range(4):
        online_node(daemon, f"gpu-{n}", ["llama"])
    for _ in range(ROUNDS):
        requests = [
            ("POST", f"/v2/nodes/gpu-{n}/drain", {"drain": flag})
            for flag in (True, False, True, False)
            for n in range(4)
        ]
        answers = at_once(daemon, requests)
        assert all(answer.status == 200 for answer in answers), [a.text for a in answers]
    shown = {node["node_id"]: node["drain"] for node in daemon.api("GET", "/v2/nodes").body["nodes"]}
    assert shown == stored_drain(daemon.config["db_path"])
    daemon.kill(signal.SIGKILL)
    daemon.start()
    assert {node["node_id"]: node["drain"] for node in daemon.api("GET", "/v2/nodes").body["nodes"]} == shown


def test_an_undrain_racing_a_delete_never_brings_the_node_back(daemon):
    for n in range(ROUNDS):
        online_node(daemon, f"gpu-{n}", ["llama"])
        assert daemon.api("POST", f"/v2/nodes/gpu-{n}/drain", {"drain": True}).status == 200
    for n in range(ROUNDS):
        deleted, undrained = at_once(
            daemon,
            [("DELETE", f"/v2/nodes/gpu-{n}", None), ("POST", f"/v2/nodes/gpu-{n}/drain", {"drain": False})],
        )
        assert deleted.status == 204
        # Either the undrain came first (200, undrained) or the node was already gone (404).
        assert undrained.status in (200, 404), undrained.text
        if undrained.status == 200:
            assert undrained.body["drain"] is False
    assert daemon.api("GET", "/v2/nodes").body["count"] == 0
    assert stored_drain(daemon.config["db_path"]) == {}
    # No pool of a deleted node may come back into placement.
    answer = place(daemon, model_id="llama")
    assert answer.status == 503, answer.text
    assert answer.body["code"] == "MODEL_NOT_AVAILABLE"
    assert "Traceback" not in daemon.log()

"""Concurrent writes: registrations, drains and deletions of one node sent together answer as if one after
the other, and what the API then shows is what survives kill -9."""

from __future__ import annotations

import contextlib
import json
import signal
import sqlite3
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from support import http, sample_registration, wait_until
from support_daemon import at_once, beat, online_node, place

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
    assert daemon.log().count(" deleted by admin 'cluster-admin'") == ROUNDS


def test_drains_at_once_leave_the_api_and_the_disk_agreeing(daemon):
    for n in range(4):
        online_node(daemon, f"gpu-{n}", ["llama"], serve="llama")
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
        online_node(daemon, f"gpu-{n}", ["llama"], serve="llama")
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


def stored_readings(db_path: str, node_id: str) -> tuple[str | None, list | None]:
    with sqlite3.connect(db_path) as db:
        heard, pools = db.execute(
            "SELECT last_heartbeat_at, pools FROM nodes WHERE node_id = ?", (node_id,)
        ).fetchone()
    return heard, None if pools is None else json.loads(pools)


@contextlib.contextmanager
def database_write_locked(db_path: str) -> Iterator[None]:
    """Another process holds the database's write lock: the daemon's writes wait (busy_timeout) meanwhile."""
    database = sqlite3.connect(db_path, isolation_level=None)
    try:
        database.execute("BEGIN IMMEDIATE")
        yield
        database.execute("ROLLBACK")
    finally:
        database.close()


def database_thread_busy(daemon) -> bool:
    """/ready reads the database on the daemon's one database thread: it hangs while a write there waits."""
    try:
        http("GET", daemon.url + "/ready", timeout=0.3)
    except TimeoutError:
        return True
    except OSError as exc:  # urllib wraps the timeout on some paths
        return isinstance(getattr(exc, "reason", None), TimeoutError)
    return False


def writebacks(daemon) -> int:
    """How many heartbeat write-back passes the daemon has begun (its /metrics counter)."""
    text = http("GET", daemon.url + "/metrics").text
    for line in text.splitlines():
        if line.startswith("orchestratord_heartbeat_writeback_passes_total "):
            return int(float(line.split()[1]))
    raise AssertionError("no orchestratord_heartbeat_writeback_passes_total in /metrics")


def a_writeback_after(daemon, count: int) -> None:
    """Wait until the daemon begins a heartbeat write-back pass after the first `count` ones."""
    wait_until(lambda: writebacks(daemon) > count, timeout=10, what="a heartbeat write-back to come due")


def test_a_write_back_never_puts_old_readings_under_a_new_registration(daemon):
    db_path = daemon.config["db_path"]
    registration = online_node(daemon, "gpu-1", ["llama"], serve="llama")
    wait_until(lambda: stored_readings(db_path, "gpu-1")[0], what="the first write-back")
    with ThreadPoolExecutor(max_workers=1) as pool, database_write_locked(db_path):
        taken = writebacks(daemon)
        beat(daemon, registration, ["qwen"])  # a reading not yet written back...
        # ...when the agent registers again; its record waits on the lock while a write-back comes due.
        registering = pool.submit(daemon.api, "POST", "/v2/nodes/register", registration)
        a_writeback_after(daemon, taken)
    assert registering.result().status == 200
    node = daemon.api("GET", "/v2/nodes/gpu-1").body
    assert node["status"] == "registering" and node["last_heartbeat_at"] is None
    daemon.stop()  # writes back whatever is pending
    assert stored_readings(db_path, "gpu-1") == (None, None)
    daemon.start()
    assert daemon.api("GET", "/v2/nodes/gpu-1").body["status"] == "registering"


def test_a_heartbeat_during_a_registration_is_kept_in_memory_and_on_disk_alike(daemon):
    db_path = daemon.config["db_path"]
    registration = online_node(daemon, "gpu-1", ["llama"], serve="llama")
    wait_until(lambda: stored_readings(db_path, "gpu-1")[0], what="the first write-back")
    with ThreadPoolExecutor(max_workers=1) as pool, database_write_locked(db_path):
        registering = pool.submit(daemon.api, "POST", "/v2/nodes/register", registration)
        wait_until(lambda: database_thread_busy(daemon), what="the registration waiting on the database")
        taken = writebacks(daemon)
        beat(daemon, registration, ["qwen"])  # arrives while the registration is being written
        a_writeback_after(daemon, taken)  # a write-back comes due meanwhile and takes this reading
    assert registering.result().status == 200
    node = daemon.api("GET", "/v2/nodes/gpu-1").body
    daemon.stop()
    heard, pools = stored_readings(db_path, "gpu-1")
    # Memory and disk agree: both hold the heartbeat, the latest word from the node.
    assert node["status"] == "online" and node["models"] == ["qwen"]
    assert heard == node["last_heartbeat_at"]
    assert [pool["models_available"] for pool in pools] == [["qwen"]]
    daemon.start()
    restored = daemon.api("GET", "/v2/nodes/gpu-1").body
    assert restored["models"] == ["qwen"] and restored["last_heartbeat_at"] == heard

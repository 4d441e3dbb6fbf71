"""Durability: what got a 2xx survives kill -9; heartbeats reach the disk in batches.

Every test runs on both stores: SQLite (the default) and PostgreSQL (db_url), on a server the session
starts (support_postgres.py).
"""

from __future__ import annotations

import json
import signal
import sqlite3
import time

import pytest
from support import Daemon, sample_heartbeat, sample_registration, wait_until
from support_daemon import beat, online_node, place, status_of
from support_postgres import daemon_sql

# Every test here on both stores: conftest's daemon_factory, parametrized.
pytestmark = pytest.mark.parametrize("daemon_factory", ["sqlite", "postgresql"], indirect=True)


def store_sql(daemon: Daemon, statement: str, *rows: tuple) -> list[tuple]:
    """One statement on the daemon's database, whichever store it uses; `?` marks each argument."""
    if daemon.config.get("db_url"):
        numbered = statement
        for n in range(1, statement.count("?") + 1):
            numbered = numbered.replace("?", f"${n}", 1)
        return daemon_sql(daemon.config, numbered, *rows)
    with sqlite3.connect(daemon.config["db_path"]) as db:
        result: list = []
        for args in rows or ((),):
            result = db.execute(statement, args).fetchall()
        return [tuple(row) for row in result]


def stored_heartbeats(daemon: Daemon) -> dict[str, str | None]:
    return dict(store_sql(daemon, "SELECT node_id, last_heartbeat_at FROM nodes"))


def test_registration_and_drain_survive_kill_9(daemon):
    online_node(daemon, "gpu-1", ["llama"], serve="llama")
    online_node(daemon, "gpu-2", ["llama"], serve="llama")
    generation = beat(daemon, sample_registration("gpu-2"), ["llama"], serve="llama")["generation"]
    daemon.api("POST", "/v2/nodes/register", sample_registration("gpu-3"))
    assert daemon.api("POST", "/v2/nodes/gpu-2/drain", {"drain": True}).status == 200
    assert daemon.api("DELETE", "/v2/nodes/gpu-1").status == 204
    # No pause: the 2xx itself is the promise.
    assert daemon.kill(signal.SIGKILL) == -signal.SIGKILL

    daemon.start()
    nodes = {node["node_id"]: node for node in daemon.api("GET", "/v2/nodes").body["nodes"]}
    assert sorted(nodes) == ["gpu-2", "gpu-3"]
    assert nodes["gpu-2"]["drain"] is True
    assert nodes["gpu-2"]["address"] == "http://gpu-2.lab:8080"
    assert nodes["gpu-2"]["capabilities"]["gpus"][0]["name"] == "NVIDIA H100 80GB HBM3"
    assert nodes["gpu-3"]["status"] == "registering"
    # The generation comes from the stored record: the same after the restart.
    assert beat(daemon, sample_registration("gpu-2"), ["llama"], serve="llama") == {
        "next_heartbeat_ms": 200,
        "drain": True,
        "generation": generation,
    }


def test_heartbeats_are_written_back_in_batches(daemon):
    registrations = [online_node(daemon, f"gpu-{n}", ["llama"], serve="llama") for n in range(3)]
    # Registration alone writes no heartbeat; the batch writer brings all three within about a second.
    written = wait_until(
        lambda: (rows := stored_heartbeats(daemon)) and all(rows.values()) and rows,
        timeout=5,
        what="heartbeats in the database",
    )
    assert sorted(written) == ["gpu-0", "gpu-1", "gpu-2"]
    before = written["gpu-0"]
    beat(daemon, registrations[0], ["llama", "qwen"])
    wait_until(lambda: stored_heartbeats(daemon)["gpu-0"] != before, timeout=5, what="a newer heartbeat")


def test_restored_node_keeps_its_pools_and_placement_after_kill_9(daemon):
    online_node(daemon, "gpu-1", ["llama"], serve="llama")
    wait_until(lambda: stored_heartbeats(daemon).get("gpu-1"), timeout=5, what="write-back")
    daemon.kill(signal.SIGKILL)
    daemon.start()
    # The agent re-sends within an interval; until then the restored readings serve, within one timeout.
    assert status_of(daemon, "gpu-1") == "online"
    assert daemon.api("GET", "/v2/nodes/gpu-1").body["models"] == ["llama"]
    assert place(daemon, model_id="llama").body["node_id"] == "gpu-1"


def test_restored_node_that_stays_silent_goes_offline(daemon_factory):
    daemon = daemon_factory(node_timeout_ms=500)
    online_node(daemon, "gpu-1", ["llama"], serve="llama")
    wait_until(lambda: stored_heartbeats(daemon).get("gpu-1"), timeout=5, what="write-back")
    daemon.kill(signal.SIGKILL)
    daemon.start()
    wait_until(lambda: status_of(daemon, "gpu-1") == "offline", timeout=5, what="gpu-1 offline")
    assert place(daemon, model_id="llama").status == 503


def test_node_silent_longer_than_the_timeout_is_offline_at_once_after_a_restart(daemon_factory):
    timeout_s = 2.0
    daemon = daemon_factory(node_timeout_ms=int(timeout_s * 1000))
    online_node(daemon, "gpu-1", ["llama"], serve="llama")
    assert daemon.api("POST", "/v2/nodes/register", sample_registration("gpu-2")).status == 200
    last_heard = time.time()  # both nodes were heard (heartbeat, registration) before this
    daemon.stop()  # a clean stop writes gpu-1's last heartbeat
    wait_until(
        lambda: time.time() > last_heard + timeout_s + 0.2,
        timeout=timeout_s + 5,
        what="the wall clock past the nodes' timeout",
    )
    daemon.start()
    # Their silence spans the downtime: no fresh grace, offline from the first request on.
    assert status_of(daemon, "gpu-1") == "offline"
    assert status_of(daemon, "gpu-2") == "offline"
    answer = place(daemon, model_id="llama")
    assert answer.status == 503
    assert answer.body["code"] == "MODEL_NOT_AVAILABLE"
    assert place(daemon).status == 503


def test_restored_node_keeps_only_the_rest_of_its_timeout(daemon_factory):
    timeout_s = 4.0
    downtime_s = 2.5
    daemon = daemon_factory(node_timeout_ms=int(timeout_s * 1000))
    before_beat = time.time()
    online_node(daemon, "gpu-1", ["llama"], serve="llama")
    daemon.stop()
    wait_until(lambda: time.time() > before_beat + downtime_s, timeout=10, what="the downtime")
    restarted_at = time.time()
    daemon.start()
    # Heard less than a timeout before: still online, so it serves placements at once.
    assert status_of(daemon, "gpu-1") == "online"
    assert place(daemon, model_id="llama").body["node_id"] == "gpu-1"
    wait_until(lambda: status_of(daemon, "gpu-1") == "offline", timeout=timeout_s + 10, what="gpu-1 offline")
    offline_at = time.time()
    # One timeout after its last heartbeat, not one timeout after the restart: a timeout counted from the
    # restart could not end before restarted_at + timeout_s, which lies downtime_s (2.5 s) after the right
    # moment, a margin no scheduling delay on a busy machine eats; and never before the heartbeat's timeout.
    assert before_beat + timeout_s - 0.1 <= offline_at < restarted_at + timeout_s


def test_a_stored_record_this_version_cannot_read_is_skipped_not_fatal(daemon):
    online_node(daemon, "gpu-1", ["llama"], serve="llama")
    assert daemon.api("POST", "/v2/nodes/register", sample_registration("gpu-2")).status == 200
    daemon.stop()
    # Records an older version wrote under looser rules, and one that is not JSON at all.
    old_rules = sample_registration("gpu-old")
    old_rules["address"] = "http://gpu-old.lab:8080\nsecond line"
    store_sql(
        daemon,
        "INSERT INTO nodes (node_id, registration, registered_at) VALUES (?, ?, ?)",
        ("gpu-old", json.dumps(old_rules).encode(), "2026-01-01T00:00:00.000Z"),
        ("gpu-garbled", b"\x00not json", "2026-01-01T00:00:00.000Z"),
        ("gpu-no-date", json.dumps(sample_registration("gpu-no-date")).encode(), "yesterday"),
        # An id this version refuses: Ansible's name for the controller.
        ("localhost", json.dumps(sample_registration("localhost")).encode(), "2026-01-01T00:00:00.000Z"),
    )
    # A readable registration whose last readings are not: the node stays, its readings go.
    store_sql(daemon, "UPDATE nodes SET pools = ? WHERE node_id = 'gpu-1'", (b'[{"pool_id": "a b"}]',))
    daemon.start()
    nodes = {node["node_id"]: node for node in daemon.api("GET", "/v2/nodes").body["nodes"]}
    assert sorted(nodes) == ["gpu-1", "gpu-2"]
    assert nodes["gpu-1"]["models"] == []
    log = daemon.log()
    assert "Traceback" not in log
    for node_id in ("gpu-old", "gpu-garbled", "gpu-no-date", "'localhost'"):
        assert sum(node_id in line and "skipped" in line for line in log.splitlines()) == 1, log
    assert sum("gpu-1" in line and "readings" in line for line in log.splitlines()) == 1, log
    # Its agent's next heartbeat gets 404, so it registers again, and the new record replaces the old.
    registration = sample_registration("gpu-old")
    assert daemon.api("POST", "/v2/nodes/gpu-old/heartbeat", sample_heartbeat(registration)).status == 404
    assert daemon.api("POST", "/v2/nodes/register", registration).status == 200
    beat(daemon, registration, ["llama"], serve="llama")
    assert status_of(daemon, "gpu-old") == "online"
    daemon.restart()
    assert status_of(daemon, "gpu-old") == "online"
    last_start = daemon.log().rsplit("INFO orchestratord: orchestratord ", 1)[1]
    assert "'gpu-old' skipped" not in last_start and "'gpu-garbled' skipped" in last_start


def test_clean_stop_writes_the_last_heartbeats(daemon_factory):
    daemon = daemon_factory()
    online_node(daemon, "gpu-1", ["llama"], serve="llama")
    daemon.stop()  # SIGTERM: the pending batch is written before exit
    assert stored_heartbeats(daemon)["gpu-1"] is not None


def test_a_failed_write_back_is_retried_by_the_next_one(daemon):
    registration = sample_registration("gpu-1")
    assert daemon.api("POST", "/v2/nodes/register", registration).status == 200  # on disk at once
    # Another process takes the table away: the batch write fails, as on a full or damaged disk.
    store_sql(daemon, "ALTER TABLE nodes RENAME TO nodes_aside")
    try:
        beat(daemon, registration, ["llama"], serve="llama")  # one heartbeat, then the node stays silent
        wait_until(
            lambda: "writes to the database" in daemon.log(),
            what="the failed write-back in the log",
        )
    finally:
        store_sql(daemon, "ALTER TABLE nodes_aside RENAME TO nodes")
    # The node sends nothing more, so only a retry of the failed batch can bring its reading to the disk.
    wait_until(lambda: stored_heartbeats(daemon).get("gpu-1"), what="the heartbeat written after the failure")

"""Liveness: one node_timeout_ms on the daemon's own clock decides online and offline everywhere."""

from __future__ import annotations

import time

from support import sample_heartbeat, sample_registration, wait_until
from support_daemon import beat, online_node, place, status_of

TIMEOUT_MS = 600


def test_node_goes_offline_after_the_timeout_and_online_at_the_next_heartbeat(daemon_factory):
    daemon = daemon_factory(node_timeout_ms=TIMEOUT_MS)
    # Taken before gpu-1's last heartbeat is sent: the daemon hears it later, so a timeout counted from
    # that heartbeat cannot end before started + timeout (a start taken after it proves nothing).
    started = time.monotonic()
    registration = online_node(daemon, "gpu-1", ["llama"], serve="llama")
    online_node(daemon, "gpu-2", ["llama"], serve="llama")

    # Keep gpu-2 alive while gpu-1 falls silent.
    def gpu1_offline():
        beat(daemon, sample_registration("gpu-2"), ["llama"], serve="llama")
        return status_of(daemon, "gpu-1") == "offline"

    wait_until(gpu1_offline, timeout=5, interval=0.1, what="gpu-1 offline")
    assert time.monotonic() - started >= TIMEOUT_MS / 1000
    # Every path agrees: listing, catalog and placement.
    assert [n["node_id"] for n in daemon.api("GET", "/v2/nodes?status=offline").body["nodes"]] == ["gpu-1"]
    availability = daemon.api("GET", "/v2/catalog/availability").body
    assert availability["nodes"]["gpu-1"]["online"] is False
    assert availability["single_node_models"] == ["llama"]
    models = daemon.api("GET", "/v2/catalog/models").body["models"]
    assert models[0]["nodes"] == ["gpu-2"]
    for _ in range(3):
        assert place(daemon, model_id="llama", strategy="round-robin").body["node_id"] == "gpu-2"
    assert place(daemon, model_id="llama").body["node_id"] == "gpu-2"

    wait_until(lambda: "node gpu-1 offline" in daemon.log(), timeout=5, what="the offline line in the log")

    beat(daemon, registration, ["llama"], serve="llama")
    assert status_of(daemon, "gpu-1") == "online"
    assert place(daemon, model_id="llama").body["node_id"] == "gpu-1"
    assert "node gpu-1 heard from again" in daemon.log()


def test_offline_node_alone_gives_model_not_available(daemon_factory):
    daemon = daemon_factory(node_timeout_ms=TIMEOUT_MS)
    online_node(daemon, "gpu-1", ["llama"], serve="llama")
    wait_until(lambda: status_of(daemon, "gpu-1") == "offline", timeout=5, what="gpu-1 offline")
    answer = place(daemon, model_id="llama")
    assert answer.status == 503
    assert answer.body["code"] == "MODEL_NOT_AVAILABLE"


def test_registered_node_without_heartbeat_goes_offline(daemon_factory):
    daemon = daemon_factory(node_timeout_ms=TIMEOUT_MS)
    daemon.api("POST", "/v2/nodes/register", sample_registration("gpu-1"))
    assert status_of(daemon, "gpu-1") == "registering"
    wait_until(lambda: status_of(daemon, "gpu-1") == "offline", timeout=5, what="gpu-1 offline")


def test_agent_clock_hours_off_does_not_matter(daemon_factory):
    daemon = daemon_factory(node_timeout_ms=TIMEOUT_MS)
    for node_id, timestamp in [
        ("slow-clock", "2020-01-01T00:00:00Z"),
        ("fast-clock", "2035-06-30T12:00:00Z"),
    ]:
        registration = sample_registration(node_id)
        daemon.api("POST", "/v2/nodes/register", registration)
        body = sample_heartbeat(registration, ["llama"])
        body["timestamp"] = timestamp
        assert daemon.api("POST", f"/v2/nodes/{node_id}/heartbeat", body).status == 200
    assert status_of(daemon, "slow-clock") == "online"
    assert status_of(daemon, "fast-clock") == "online"
    # The fast clock must not keep a silent node online either: after the timeout both are offline.
    wait_until(
        lambda: daemon.api("GET", "/v2/nodes?status=offline").body["count"] == 2,
        timeout=5,
        what="both nodes offline",
    )


def test_every_silent_node_is_logged_offline_each_time_it_goes_silent(daemon_factory):
    daemon = daemon_factory(node_timeout_ms=TIMEOUT_MS)
    flaky = online_node(daemon, "flaky")
    steady = online_node(daemon, "steady")
    online_node(daemon, "silent")

    def offline_lines(node_id: str) -> int:
        return daemon.log().count(f"node {node_id} offline")

    def steady_beat_then(predicate):
        def check():
            beat(daemon, steady)
            return predicate()

        return check

    wait_until(
        steady_beat_then(lambda: offline_lines("flaky") == 1 and offline_lines("silent") == 1), timeout=5
    )
    beat(daemon, flaky)  # back online, and back in the sweep's view
    assert status_of(daemon, "flaky") == "online"
    wait_until(steady_beat_then(lambda: offline_lines("flaky") == 2), timeout=5, what="flaky offline again")
    assert offline_lines("steady") == 0
    assert status_of(daemon, "steady") == "online"
    assert offline_lines("silent") == 1

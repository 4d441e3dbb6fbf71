"""Scoped credentials: who may do what on /v2, decided in one place (orchestratord/access.py).

A stolen node credential cannot touch another node nor move its own; a reader cannot drain; an operator
cannot issue credentials; a client key cannot read /v2; a revoked credential is refused at once, an expired
one with a 401 that says so. Every test on both stores: the credentials table lives in each.
"""

from __future__ import annotations

import sqlite3

import pytest
from support import Daemon, sample_heartbeat, sample_registration, wait_until
from support_daemon import online_node
from support_postgres import downgrade_database

pytestmark = pytest.mark.parametrize("daemon_factory", ["sqlite", "postgresql"], indirect=True)


def issue(daemon: Daemon, name: str, scope: str, **extra) -> str:
    answer = daemon.api("POST", "/v2/credentials", {"name": name, "scope": scope, **extra})
    assert answer.status == 201, answer.text
    assert answer.body["secret"].startswith(
        {"reader": "llr_", "operator": "llo_", "admin": "lla_"}.get(scope, "llj_")
    )
    return answer.body["secret"]


def joined(daemon: Daemon, node_id: str) -> str:
    """The node token of `node_id`, joined with a join credential of its own."""
    join_secret = issue(daemon, f"join-{node_id}", "join", node_id=node_id)
    answer = daemon.api("POST", "/v2/join", {"node_id": node_id}, token=join_secret)
    assert answer.status == 200, answer.text
    return answer.body["node_token"]


def refused_once(daemon: Daemon, who: str, method: str, path: str) -> None:
    """Exactly one WARNING line for the refusal, naming the credential, the method and the path."""
    lines = [line for line in daemon.log().splitlines() if "refused" in line and f"{method} {path} " in line]
    assert len(lines) == 1 and who in lines[0] and "WARNING" in lines[0], daemon.log()


def test_a_stolen_node_credential_cannot_touch_another_node(daemon_factory):
    daemon = daemon_factory()
    online_node(daemon, "gpu-2")
    stolen = joined(daemon, "gpu-1")

    drain = daemon.api("POST", "/v2/nodes/gpu-2/drain", {"drain": True}, token=stolen)
    assert drain.status == 403 and drain.body["code"] == "FORBIDDEN", drain.text
    assert "'node/gpu-1'" in drain.body["message"] and "its own node" in drain.body["message"]
    refused_once(daemon, "node/gpu-1", "POST", "/v2/nodes/gpu-2/drain")

    delete = daemon.api("DELETE", "/v2/nodes/gpu-2", token=stolen)
    assert delete.status == 403 and "may not act for node gpu-2" in delete.body["message"], delete.text

    forged = sample_registration("gpu-2")
    forged["address"] = "http://attacker.example:8080"
    register = daemon.api("POST", "/v2/nodes/register", forged, token=stolen)
    assert register.status == 403 and register.body["code"] == "FORBIDDEN", register.text

    heartbeat = daemon.api("POST", "/v2/nodes/gpu-2/heartbeat", sample_heartbeat(forged), token=stolen)
    assert heartbeat.status == 403, heartbeat.text

    node = daemon.api("GET", "/v2/nodes/gpu-2").body
    assert node["address"] == sample_registration("gpu-2")["address"] and node["drain"] is False


def test_a_node_credential_cannot_move_its_own_node(daemon_factory):
    daemon = daemon_factory()
    token = joined(daemon, "gpu-1")
    registration = sample_registration("gpu-1")
    registration["machine_id"] = "machine-a"
    assert daemon.api("POST", "/v2/nodes/register", registration, token=token).status == 200
    # The same identity registers again (an agent restart, new pools): fine.
    assert daemon.api("POST", "/v2/nodes/register", registration, token=token).status == 200

    for field, value in (("address", "http://10.9.9.9:8080"), ("machine_id", "machine-b")):
        moved = {**registration, field: value}
        answer = daemon.api("POST", "/v2/nodes/register", moved, token=token)
        assert answer.status == 403 and answer.body["code"] == "NODE_IDENTITY_CHANGED", answer.text
        assert field in answer.body["message"]
    assert daemon.api("GET", "/v2/nodes/gpu-1").body["address"] == registration["address"]
    # Nor may it read the cluster or ask for placements: a node token does node things only.
    assert daemon.api("GET", "/v2/nodes", token=token).status == 403
    # Its own heartbeat and deregistration work.
    assert (
        daemon.api("POST", "/v2/nodes/gpu-1/heartbeat", sample_heartbeat(registration), token=token).status
        == 200
    )
    assert daemon.api("DELETE", "/v2/nodes/gpu-1", token=token).status == 204


def test_a_reader_reads_but_cannot_drain_and_an_operator_cannot_issue(daemon_factory):
    daemon = daemon_factory()
    online_node(daemon, "gpu-1", ["llama"], serve="llama")
    reader = issue(daemon, "dashboards", "reader")
    operator = issue(daemon, "alice", "operator")

    assert daemon.api("GET", "/v2/nodes", token=reader).body["count"] == 1
    placed = daemon.api("POST", "/v2/placement", {"model_id": "llama"}, token=reader)
    assert placed.status == 200 and placed.body["node_id"] == "gpu-1", placed.text
    drain = daemon.api("POST", "/v2/nodes/gpu-1/drain", {"drain": True}, token=reader)
    assert drain.status == 403 and "reader 'dashboards'" in drain.body["message"], drain.text
    refused_once(daemon, "reader 'dashboards'", "POST", "/v2/nodes/gpu-1/drain")

    assert daemon.api("POST", "/v2/nodes/gpu-1/drain", {"drain": True}, token=operator).status == 200
    wait_until(lambda: "node gpu-1 drained by operator 'alice'" in daemon.log(), what="the drain's log line")
    issued = daemon.api("POST", "/v2/credentials", {"name": "mallory", "scope": "admin"}, token=operator)
    assert issued.status == 403 and "not manage credentials" in issued.body["message"], issued.text
    assert daemon.api("GET", "/v2/credentials", token=operator).status == 403
    assert daemon.api("DELETE", "/v2/nodes/gpu-1", token=operator).status == 204
    wait_until(lambda: "node gpu-1 deleted by operator 'alice'" in daemon.log(), what="the deletion's log")


def test_a_client_key_cannot_read_v2(daemon_factory, tmp_path):
    keys = tmp_path / "client-keys"
    client_key = "ck-" + "c" * 40
    keys.write_text(f"chat-app {client_key}\n")
    keys.chmod(0o600)
    daemon = daemon_factory(client_keys_file=str(keys))
    answer = daemon.api("GET", "/v2/nodes", token=client_key)
    assert answer.status == 401 and answer.body["code"] == "UNAUTHORIZED", answer.text


def test_a_revoked_credential_is_refused_at_once_and_for_good(daemon_factory):
    daemon = daemon_factory()
    reader = issue(daemon, "ci", "reader")
    assert daemon.api("GET", "/v2/nodes", token=reader).status == 200
    listed = daemon.api("GET", "/v2/credentials").body
    assert [c["name"] for c in listed["credentials"]] == ["ci"] and "secret" not in listed["credentials"][0]

    assert daemon.api("DELETE", "/v2/credentials/ci").status == 204
    assert daemon.api("GET", "/v2/nodes", token=reader).status == 401
    assert daemon.api("DELETE", "/v2/credentials/ci").status == 404
    # The built-in admin is neither listed nor revocable through the API.
    assert daemon.api("DELETE", "/v2/credentials/cluster-admin").status == 404

    daemon.stop()
    daemon.start()
    assert daemon.api("GET", "/v2/nodes", token=reader).status == 401


def test_credentials_survive_a_restart_and_expire_with_a_401_saying_so(daemon_factory):
    daemon = daemon_factory()
    lasting = issue(daemon, "lasting", "operator")
    brief = issue(daemon, "brief", "reader", ttl_s=1)
    assert daemon.api("GET", "/v2/nodes", token=brief).status == 200

    daemon.stop()
    daemon.start()
    assert daemon.api("GET", "/v2/nodes", token=lasting).status == 200

    def expired():
        answer = daemon.api("GET", "/v2/nodes", token=brief)
        return answer if answer.status == 401 else None

    answer = wait_until(expired, timeout=5, what="the 1 s reader to expire")
    assert "'brief' expired at" in answer.body["message"], answer.text
    listed = {c["name"]: c for c in daemon.api("GET", "/v2/credentials").body["credentials"]}
    assert listed["brief"]["usable"] is False and listed["lasting"]["usable"] is True


def test_credential_requests_are_checked(daemon_factory):
    daemon = daemon_factory()
    for body, field in (
        ({"name": "node/x", "scope": "reader"}, "name"),
        ({"name": "cluster-admin", "scope": "admin"}, "name"),
        ({"name": "x", "scope": "node"}, "scope"),
        ({"name": "x", "scope": "reader", "uses": 2}, "uses"),
        ({"name": "x", "scope": "operator", "node_id": "gpu-1"}, "node_id"),
        ({"name": "x", "scope": "join", "ttl_s": 8 * 86400}, "ttl_s"),
        ({"name": "x", "scope": "join", "node_id": "localhost"}, "node_id"),
    ):
        answer = daemon.api("POST", "/v2/credentials", body)
        assert answer.status == 400 and field in answer.body["message"], (body, answer.text)
    issue(daemon, "twice", "reader")
    again = daemon.api("POST", "/v2/credentials", {"name": "twice", "scope": "reader"})
    assert again.status == 409 and again.body["code"] == "CREDENTIAL_EXISTS"
    assert "Traceback" not in daemon.log()


def test_a_database_of_the_previous_version_gains_the_credentials_table(daemon_factory):
    daemon = daemon_factory()
    online_node(daemon, "gpu-1")
    daemon.stop()
    # Back to what the previous version left: no credentials table (and, on PostgreSQL, schema version 1).
    if daemon.config.get("db_url"):
        downgrade_database(daemon.config, 1)
    else:
        with sqlite3.connect(daemon.config["db_path"]) as db:
            db.execute("DROP TABLE credentials")
    daemon.start()
    assert daemon.api("GET", "/v2/nodes/gpu-1").status == 200
    reader = issue(daemon, "after-upgrade", "reader")
    assert daemon.api("GET", "/v2/nodes", token=reader).body["count"] == 1

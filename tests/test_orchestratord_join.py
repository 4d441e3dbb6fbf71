"""Joining: a join secret (limited uses, short-lived, optionally bound to one node id) buys a node token bound
to that node id and a single-use recovery secret; node tokens renew on heartbeat once half their life is
gone. Every test on both stores."""

from __future__ import annotations

import signal
from concurrent.futures import ThreadPoolExecutor

import pytest
from support import Daemon, sample_heartbeat, sample_registration, wait_until

pytestmark = pytest.mark.parametrize("daemon_factory", ["sqlite", "postgresql"], indirect=True)


def issue_join(daemon: Daemon, name: str, **extra) -> str:
    answer = daemon.api("POST", "/v2/credentials", {"name": name, "scope": "join", **extra})
    assert answer.status == 201, answer.text
    return answer.body["secret"]


def join(daemon: Daemon, secret: str, node_id: str):
    return daemon.api("POST", "/v2/join", {"node_id": node_id}, token=secret)


def test_a_join_answers_a_node_token_bound_to_the_node_and_a_recovery_token(daemon_factory):
    daemon = daemon_factory()
    secret = issue_join(daemon, "rack-7", uses=2)
    answer = join(daemon, secret, "gpu-1")
    assert answer.status == 200, answer.text
    joined = answer.body
    assert joined["node_id"] == "gpu-1" and joined["credential_name"] == "node/gpu-1"
    assert joined["node_token"].startswith("lln_") and joined["recovery_token"].startswith("llv_")
    assert joined["expires_at"].endswith("Z")
    registration = sample_registration("gpu-1")
    assert daemon.api("POST", "/v2/nodes/register", registration, token=joined["node_token"]).status == 200
    wait_until(lambda: "node gpu-1 joined with join 'rack-7'" in daemon.log(), what="the join's log line")
    assert joined["node_token"] not in daemon.log() and secret not in daemon.log()
    # A join secret is for joining only.
    assert daemon.api("GET", "/v2/nodes", token=secret).status == 403


def test_a_join_token_past_its_uses_is_refused(daemon_factory):
    daemon = daemon_factory()
    secret = issue_join(daemon, "two-nodes", uses=2)
    assert join(daemon, secret, "gpu-1").status == 200
    assert join(daemon, secret, "gpu-2").status == 200
    third = join(daemon, secret, "gpu-3")
    assert third.status == 401 and "'two-nodes' is used up" in third.body["message"], third.text
    # Spent in the same committed write as the node's credential: a restart does not give the use back.
    assert daemon.kill(signal.SIGKILL) == -signal.SIGKILL
    daemon.start()
    assert join(daemon, secret, "gpu-3").status == 401


def test_a_join_token_past_its_time_is_refused(daemon_factory):
    daemon = daemon_factory()
    secret = issue_join(daemon, "brief", ttl_s=1, uses=5)
    assert join(daemon, secret, "gpu-1").status == 200

    def refused():
        answer = join(daemon, secret, "gpu-2")
        return answer if answer.status == 401 else None

    answer = wait_until(refused, timeout=5, what="the 1 s join token to expire")
    assert "'brief' expired at" in answer.body["message"], answer.text


def test_a_general_join_token_cannot_take_an_existing_id(daemon_factory):
    daemon = daemon_factory()
    first = join(daemon, issue_join(daemon, "first"), "gpu-1").body
    taken = join(daemon, issue_join(daemon, "thief", uses=3), "gpu-1")
    assert taken.status == 403 and taken.body["code"] == "NODE_ID_TAKEN", taken.text
    # A join token bound to another node cannot be used for this one either.
    bound_elsewhere = join(daemon, issue_join(daemon, "for-gpu-9", node_id="gpu-9"), "gpu-1")
    assert bound_elsewhere.status == 403 and bound_elsewhere.body["code"] == "FORBIDDEN"
    # One bound to the node re-joins it and replaces its credentials: the old node token stops at once.
    rejoined = join(daemon, issue_join(daemon, "for-gpu-1", node_id="gpu-1"), "gpu-1")
    assert rejoined.status == 200, rejoined.text
    registration = sample_registration("gpu-1")
    assert daemon.api("POST", "/v2/nodes/register", registration, token=first["node_token"]).status == 401
    assert daemon.api("POST", "/v2/join", {"node_id": "gpu-1"}, token=first["recovery_token"]).status == 401
    token = rejoined.body["node_token"]
    assert daemon.api("POST", "/v2/nodes/register", registration, token=token).status == 200


def test_deleting_a_node_takes_back_its_credentials(daemon_factory):
    daemon = daemon_factory()
    joined = join(daemon, issue_join(daemon, "first"), "gpu-1").body
    registration = sample_registration("gpu-1")
    assert daemon.api("POST", "/v2/nodes/register", registration, token=joined["node_token"]).status == 200
    # The node deregistering itself (its agent stopping) keeps them: it registers again at its start.
    assert daemon.api("DELETE", "/v2/nodes/gpu-1", token=joined["node_token"]).status == 204
    assert daemon.api("POST", "/v2/nodes/register", registration, token=joined["node_token"]).status == 200
    # An operator deleting it takes them back, and the id is free for a general join token again.
    assert daemon.api("DELETE", "/v2/nodes/gpu-1").status == 204
    assert daemon.api("POST", "/v2/nodes/register", registration, token=joined["node_token"]).status == 401
    assert join(daemon, joined["recovery_token"], "gpu-1").status == 401
    assert join(daemon, issue_join(daemon, "second"), "gpu-1").status == 200


def test_the_recovery_token_rejoins_once(daemon_factory):
    daemon = daemon_factory()
    joined = join(daemon, issue_join(daemon, "first"), "gpu-1").body
    recovery = joined["recovery_token"]
    assert join(daemon, recovery, "gpu-2").status == 403  # bound to its node
    again = join(daemon, recovery, "gpu-1")
    assert again.status == 200, again.text
    assert again.body["recovery_token"] != recovery
    spent = join(daemon, recovery, "gpu-1")
    assert spent.status == 401, spent.text
    # The new one works, after a restart too.
    daemon.stop()
    daemon.start()
    assert join(daemon, again.body["recovery_token"], "gpu-1").status == 200


def test_the_node_token_renews_on_heartbeat_when_half_its_life_is_gone(daemon_factory):
    daemon = daemon_factory(node_credential_ttl_s=4)
    joined = join(daemon, issue_join(daemon, "first"), "gpu-1").body
    token = joined["node_token"]
    registration = sample_registration("gpu-1")
    assert daemon.api("POST", "/v2/nodes/register", registration, token=token).status == 200
    first = daemon.api("POST", "/v2/nodes/gpu-1/heartbeat", sample_heartbeat(registration), token=token)
    assert first.status == 200 and "credential" not in first.body, first.text

    def renewed():
        answer = daemon.api("POST", "/v2/nodes/gpu-1/heartbeat", sample_heartbeat(registration), token=token)
        assert answer.status == 200, answer.text
        return answer.body.get("credential")

    credential = wait_until(renewed, timeout=6, interval=0.2, what="a renewed node token")
    fresh = credential["node_token"]
    assert fresh.startswith("lln_") and fresh != token and credential["expires_at"] > joined["expires_at"]

    # Both work until the old one's own expiry (an answer lost on the way costs nothing); the old one
    # brings no further renewal, which would drop the token the agent holds.
    def beat_with(secret: str):
        heartbeat = sample_heartbeat(registration)
        return daemon.api("POST", "/v2/nodes/gpu-1/heartbeat", heartbeat, token=secret)

    assert beat_with(fresh).status == 200
    answer = beat_with(token)
    assert answer.status == 200 and "credential" not in answer.body, answer.text
    wait_until(lambda: beat_with(token).status == 401, timeout=5, what="the old node token to expire")
    assert beat_with(fresh).status == 200


def test_the_generation_follows_the_stored_registration(daemon_factory):
    daemon = daemon_factory()
    registration = sample_registration("gpu-1")
    first = daemon.api("POST", "/v2/nodes/register", registration).body["generation"]
    assert daemon.api("POST", "/v2/nodes/register", registration).body["generation"] == first
    beat = daemon.api("POST", "/v2/nodes/gpu-1/heartbeat", sample_heartbeat(registration)).body
    assert beat["generation"] == first
    registration["version"] = "0.2.0"
    second = daemon.api("POST", "/v2/nodes/register", registration).body["generation"]
    assert second != first
    beat = daemon.api("POST", "/v2/nodes/gpu-1/heartbeat", sample_heartbeat(registration)).body
    assert beat["generation"] == second


def test_a_single_use_join_token_is_spent_once_by_joins_at_the_same_time(daemon_factory):
    daemon = daemon_factory()
    secret = issue_join(daemon, "once")
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda n: join(daemon, secret, f"gpu-{n}").status, range(8)))
    assert sorted(answers) == [200] + [401] * 7, answers
    joined = [c for c in daemon.api("GET", "/v2/credentials").body["credentials"] if c["scope"] == "node"]
    assert len(joined) == 1


def test_a_join_token_for_many_nodes_serves_joins_at_the_same_time_each_use_once(daemon_factory):
    # A rack's nodes join together with one token: joins that waited on each other's write must not find
    # the token "gone" because a use was spent meanwhile (bench/tls_heartbeat.py found this), and no use
    # may be spent twice.
    daemon = daemon_factory()
    secret = issue_join(daemon, "rack", uses=6)
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda n: join(daemon, secret, f"gpu-{n}").status, range(8)))
    assert sorted(answers) == [200] * 6 + [401] * 2, answers
    listed = {c["name"]: c for c in daemon.api("GET", "/v2/credentials").body["credentials"]}
    assert listed["rack"]["uses_left"] == 0
    assert sum(1 for c in listed.values() if c["scope"] == "node") == 6

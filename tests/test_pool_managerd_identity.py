"""A real agent with a node identity against a real daemon: it joins with a join token, keeps its own node
token and recovery token (0600, atomic), renews, recovers alone from a revoked token, registers again when
the daemon holds another generation, and never sends a join secret to a CA it was not pinned to."""

from __future__ import annotations

import re
import signal
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import REPO_ROOT, Daemon, http, wait_until
from support_agent import AgentProcess, TlsFront, make_agent
from support_tls import write_ca, write_server_certificate

sys.path.insert(0, str(REPO_ROOT / "files" / "pool_managerd"))
from pool_managerd.identity import ca_pins

NODE = "gpu-node-1"


@pytest.fixture
def agents() -> Iterator[list[AgentProcess]]:
    started: list[AgentProcess] = []
    yield started
    for agent in started:
        agent.stop()


def issue_join(daemon: Daemon, name: str = "rack-1", **extra) -> str:
    answer = daemon.api("POST", "/v2/credentials", {"name": name, "scope": "join", **extra})
    assert answer.status == 201, answer.text
    return answer.body["secret"]


def write_secret(path: Path, text: str) -> Path:
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


def joining_agent(tmp_path: Path, daemon: Daemon, join_text: str, agents: list, **overrides) -> AgentProcess:
    """An agent with a join token and no shared token, its credentials under tmp_path."""
    join_file = write_secret(tmp_path / "join-token", join_text)
    agent = make_agent(
        tmp_path / "agent",
        daemon,
        token_file=None,
        join_token_file=str(join_file),
        credential_dir=str(tmp_path / "credentials"),
        **overrides,
    )
    agents.append(agent)
    return agent


def node_of(daemon: Daemon) -> dict | None:
    answer = daemon.api("GET", f"/v2/nodes/{NODE}")
    return answer.body if answer.status == 200 else None


def wait_online(daemon: Daemon, agent: AgentProcess, timeout: float = 15) -> dict:
    def online():
        assert agent.running(), f"the agent exited:\n{agent.log()}"
        node = node_of(daemon)
        return node if node and node["status"] == "online" else None

    return wait_until(online, timeout=timeout, what=f"{NODE} online")


def heartbeats(daemon: Daemon, outcome: str) -> float:
    text = http("GET", daemon.url + "/metrics").text
    found = re.search(rf'orchestratord_heartbeats_total\{{outcome="{outcome}"\}} (\S+)', text)
    return float(found.group(1)) if found else 0.0


def stored(tmp_path: Path, name: str) -> str:
    return (tmp_path / "credentials" / name).read_text()


def test_the_agent_joins_keeps_its_credentials_and_uses_them_after_a_restart(daemon, tmp_path, agents):
    secret = issue_join(daemon)
    agent = joining_agent(tmp_path, daemon, secret, agents).start()
    wait_online(daemon, agent)
    wait_until(lambda: f"joined {daemon.url} as node {NODE} with join_token_file" in agent.log())
    assert f"node {NODE} registered from" in daemon.log() and "by node 'node/gpu-node-1'" in daemon.log()

    folder = tmp_path / "credentials"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for name in ("node-token", "recovery-token"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600
    node_token = stored(tmp_path, "node-token").split()[0]
    assert node_token.startswith("lln_") and stored(tmp_path, "recovery-token").startswith("llv_")
    for log in (agent.log(), daemon.log()):
        assert secret not in log and node_token not in log

    # Stopped and started again without its join token (spent anyway): the stored node token carries it.
    assert agent.signal(signal.SIGTERM) == 0
    (tmp_path / "join-token").unlink()
    agent.start()
    wait_online(daemon, agent)
    assert agent.log().count("joined ") == 1 and daemon.log().count(f"node {NODE} joined") == 1


def test_a_renewed_node_token_is_stored_then_used_without_a_failed_heartbeat(
    daemon_factory, tmp_path, agents
):
    daemon = daemon_factory(node_credential_ttl_s=4)
    agent = joining_agent(tmp_path, daemon, issue_join(daemon), agents).start()
    wait_online(daemon, agent)
    first = stored(tmp_path, "node-token")
    wait_until(
        lambda: stored(tmp_path, "node-token") != first, timeout=8, what="a renewed node token on disk"
    )
    wait_until(lambda: "node token renewed" in agent.log(), what="the renewal's log line")
    # Past the first token's expiry the agent goes on with the renewed one.
    ok_before = heartbeats(daemon, "ok")
    wait_until(lambda: heartbeats(daemon, "ok") >= ok_before + 10, timeout=10, what="10 more heartbeats")
    assert "401" not in agent.log() and "joined" in agent.log() and agent.log().count("joined ") == 1
    assert node_of(daemon)["status"] == "online"


def test_a_revoked_node_token_is_replaced_with_the_recovery_token(daemon, tmp_path, agents):
    agent = joining_agent(tmp_path, daemon, issue_join(daemon), agents).start()
    wait_online(daemon, agent)
    recovery = stored(tmp_path, "recovery-token")
    assert daemon.api("DELETE", "/v2/credentials/node/gpu-node-1").status == 204
    wait_until(lambda: stored(tmp_path, "recovery-token") != recovery, what="a new recovery token on disk")
    wait_until(lambda: "with the recovery token" in agent.log(), what="the recovery join's log line")
    assert agent.log().count("refused this node's token (HTTP 401") == 1, agent.log()
    wait_online(daemon, agent)
    names = [c["name"] for c in daemon.api("GET", "/v2/credentials").body["credentials"]]
    assert "node/gpu-node-1" in names and "recovery/gpu-node-1" in names


def test_a_changed_generation_makes_the_agent_register_again(daemon, tmp_path, agents):
    agent = joining_agent(tmp_path, daemon, issue_join(daemon), agents).start()
    node = wait_online(daemon, agent)
    # An admin replaces the record (same identity, another version): the next heartbeat answer names a
    # generation the agent did not register, and the agent puts its own registration back.
    replaced = {
        "node_id": NODE,
        "address": node["address"],
        "machine_id": node["machine_id"],
        "version": "someone-else",
        "capabilities": node["capabilities"],
        "pools": [{key: pool[key] for key in ("pool_id", "gpus", "slots_total")} for pool in node["pools"]],
    }
    assert daemon.api("POST", "/v2/nodes/register", replaced).status == 200
    wait_until(lambda: "holds registration generation" in agent.log(), what="the agent noticing")
    wait_until(lambda: node_of(daemon)["version"] == node["version"], what="the agent's registration back")
    wait_online(daemon, agent)


@pytest.fixture
def tls_front(daemon, tmp_path) -> Iterator[tuple[TlsFront, Path]]:
    tls = tmp_path / "tls"
    tls.mkdir()
    ca = write_ca(tls / "ca.pem")
    write_server_certificate(ca, tls / "server.pem", tls / "server-key.pem")
    with TlsFront(daemon.config["listen_port"], tls / "server.pem", tls / "server-key.pem") as front:
        yield front, tls / "ca.pem"


def test_over_https_the_join_token_pins_the_ca(daemon, tmp_path, agents, tls_front):
    front, ca_file = tls_front
    secret = issue_join(daemon)
    pin = ca_pins(str(ca_file))[0]
    agent = joining_agent(
        tmp_path, daemon, f"sha256:{pin}::{secret}", agents, control_url=front.url, ca_file=str(ca_file)
    ).start()
    wait_online(daemon, agent)
    assert f"joined {front.url} as node {NODE}" in agent.log()


@pytest.mark.parametrize("token_text", ["sha256:{wrong}::{secret}", "{secret}"])
def test_a_join_token_that_does_not_pin_ca_file_is_never_sent(
    daemon, tmp_path, agents, tls_front, token_text
):
    front, ca_file = tls_front
    secret = issue_join(daemon)
    text = token_text.format(wrong="0" * 64, secret=secret)
    agent = joining_agent(tmp_path, daemon, text, agents, control_url=front.url, ca_file=str(ca_file))
    agent.start()
    assert agent.proc.wait(timeout=20) == 2, agent.log()
    refusals = [line for line in agent.log().splitlines() if "ERROR" in line]
    assert len(refusals) == 1 and "the join secret was not sent" in refusals[0], agent.log()
    assert "Traceback" not in agent.log() and secret not in agent.log()
    # Nothing reached the daemon: the join token still has its one use.
    (listed,) = daemon.api("GET", "/v2/credentials").body["credentials"]
    assert listed["uses_left"] == 1 and front.connections == []


def test_a_deleted_join_token_file_leaves_the_recovery_token_to_be_tried(tmp_path):
    # The role deletes the join token once the node joined; a node off past its token's life must come back
    # with its recovery token, not stop on the missing file (exit 2 would keep systemd from restarting it).
    from pool_managerd.identity import CredentialStore, IdentityError, join_candidates

    store = CredentialStore(str(tmp_path / "credentials"))
    gone = str(tmp_path / "pool-managerd.join-token")
    assert join_candidates(store, gone) == []

    store.save_recovery_token("llv_" + "r" * 40)
    (candidate,) = join_candidates(store, gone)
    assert candidate.recovery

    broken = tmp_path / "broken.join-token"
    broken.write_text("sha256:not-a-pin::" + "s" * 40 + "\n")
    broken.chmod(0o600)
    (candidate,) = join_candidates(store, str(broken))
    assert candidate.recovery
    with pytest.raises(IdentityError, match="expected sha256"):
        join_candidates(CredentialStore(str(tmp_path / "empty")), str(broken))

"""The real pool-managerd with a list of control-plane URLs (control_urls) against real orchestratord
daemons: it moves to the next URL when one gives no answer, stays where it is while a URL answers (even
with an error), and does not go back to a replica that returns.

Each daemon has its own SQLite file, as two replicas that do not share a database: the agent registers
again on the replica it moves to (that replica answers its heartbeat with 404), which is what makes
registration idempotent worth having.
"""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from support import REPO_ROOT, Daemon, free_port, wait_until
from support_agent import AgentProcess, ScriptedControlPlane, make_agent
from support_roles import render_role

sys.path.insert(0, str(REPO_ROOT / "files" / "pool_managerd"))
from pool_managerd.config import load_settings

ROLE = REPO_ROOT / "roles" / "pool_managerd"

NODE = "gpu-node-1"
# Test timings: a heartbeat every 1.5 s, so "within two heartbeat intervals" is a 3 s deadline that a busy
# test machine still meets, and a node timeout that no pause of the test trips.
HEARTBEAT_MS = 1500
REPLICA = {"heartbeat_interval_ms": HEARTBEAT_MS, "node_timeout_ms": 6000}


@pytest.fixture
def agents() -> Iterator[list[AgentProcess]]:
    started: list[AgentProcess] = []
    yield started
    for agent in started:
        agent.stop()


@pytest.fixture
def start_agent(tmp_path, agents):
    def start(urls: list[str], name: str = "agent", **overrides) -> AgentProcess:
        overrides.setdefault("backoff_initial_s", 0.05)
        overrides.setdefault("backoff_max_s", 0.4)
        agent = make_agent(tmp_path / name, None, control_urls=urls, **overrides)
        del agent.config["control_url"]  # make_agent's default: exactly one of the two may be set
        agents.append(agent.start())
        return agent

    return start


def node_on(daemon: Daemon) -> dict | None:
    answer = daemon.api("GET", f"/v2/nodes/{NODE}")
    return answer.body if answer.status == 200 else None


def online_on(daemon: Daemon) -> bool:
    node = node_on(daemon)
    return node is not None and node["status"] == "online"


def switches(agent: AgentProcess) -> list[str]:
    return [line for line in agent.log().splitlines() if "switching to" in line]


def test_agent_moves_to_the_second_replica_when_the_first_is_killed_and_stays_there(
    daemon_factory, start_agent
):
    first = daemon_factory("first", **REPLICA)
    second = daemon_factory("second", **REPLICA)
    agent = start_agent([first.url, second.url])
    wait_until(lambda: online_on(first), timeout=15, what="the node online on the first replica")
    assert node_on(second) is None  # the agent talks to the first URL only while it answers

    first.kill()  # SIGKILL: no goodbye, the port refuses from now on
    killed_at = time.monotonic()
    wait_until(lambda: online_on(second), timeout=2 * HEARTBEAT_MS / 1000, what="the node on the second")
    print(f"online on the second replica {time.monotonic() - killed_at:.2f} s after the kill")
    (switch,) = switches(agent)
    assert f"control plane {first.url} gave no answer" in switch and f"switching to {second.url}" in switch
    assert " INFO " in switch, switch

    # The first replica returns (its database still holds the node): the agent stays with the second.
    first.start()
    left_at = node_on(first)["last_heartbeat_at"]
    seen = node_on(second)["last_heartbeat_at"]
    for _ in range(3):  # three more heartbeats on the second replica
        seen = wait_until(
            lambda before=seen: (now := node_on(second)["last_heartbeat_at"]) != before and now,
            timeout=2 * HEARTBEAT_MS / 1000,
            what="another heartbeat on the second replica",
        )
    assert node_on(first)["last_heartbeat_at"] == left_at
    assert len(switches(agent)) == 1
    assert agent.running()


def test_agent_skips_a_dead_first_url_at_start(daemon_factory, start_agent):
    live = daemon_factory("live", **REPLICA)
    dead = f"http://127.0.0.1:{free_port()}"
    agent = start_agent([dead, live.url])
    wait_until(lambda: online_on(live), timeout=15, what="the node online on the live replica")
    (switch,) = switches(agent)
    assert f"switching to {live.url} (2 of 2)" in switch and "cannot connect" in switch


def test_agent_leaves_a_hung_url_after_its_request_timeout(daemon_factory, start_agent):
    live = daemon_factory("live", **REPLICA)
    # A socket that takes connections (the kernel's backlog) but never answers: a hung replica.
    with socket.create_server(("127.0.0.1", 0), backlog=8) as hung:
        hung_url = f"http://127.0.0.1:{hung.getsockname()[1]}"
        agent = start_agent([hung_url, live.url], request_timeout_s=0.5)
        wait_until(lambda: online_on(live), timeout=15, what="the node online on the live replica")
    (switch,) = switches(agent)
    assert f"control plane {hung_url} gave no answer (no answer within 0.5 s)" in switch, switch


def test_an_http_error_is_an_answer_and_does_not_move_the_agent(daemon_factory, start_agent):
    """A replica that answers 503 (its database is away) is speaking: another would say the same, so the
    agent backs off and stays, instead of carrying every node over to the next replica."""
    live = daemon_factory("live", **REPLICA)

    async def unavailable(request: web.Request) -> web.StreamResponse:
        return web.json_response({"code": "STORE_UNAVAILABLE", "message": "database away"}, status=503)

    with ScriptedControlPlane() as speaking:
        speaking.register = unavailable
        agent = start_agent([speaking.url, live.url])
        wait_until(lambda: len(speaking.registrations) >= 3, timeout=15, what="three refused registrations")
        # Read while the speaking replica still answers: once it stops, the agent rightly moves on.
        switched, log = switches(agent), agent.log()
    assert node_on(live) is None
    assert switched == []
    assert "STORE_UNAVAILABLE" in log


def test_every_url_down_backs_off_quietly_then_takes_the_first_that_comes_up(daemon_factory, start_agent):
    replica = daemon_factory("replica", **REPLICA)
    replica.stop()
    dead = f"http://127.0.0.1:{free_port()}"
    agent = start_agent([dead, replica.url], backoff_max_s=0.2, log_level="debug")
    # Several rounds over both URLs, each ending in the backoff (one debug line per retry): the outage is
    # one warning, and only the first round's switch is news.
    wait_until(lambda: agent.log().count("next try in") >= 5, timeout=15, what="five rounds of retries")
    assert agent.log().count("unreachable") == 1, agent.log()
    assert len([line for line in switches(agent) if " INFO " in line]) == 1, switches(agent)
    replica.start()
    wait_until(lambda: online_on(replica), timeout=15, what="the node online once the replica is back")
    assert f"control plane {replica.url} (2 of 2) answers again" in agent.log()


@pytest.mark.parametrize(
    ("urls", "words"),
    [
        ([], ("'control_urls' must be a list of 1-16 http:// or https:// URLs",)),
        ([f"http://c{n}:9200" for n in range(17)], ("'control_urls' must be a list of 1-16",)),
        (
            ["http://c1:9200", "c2:9200"],
            ("'control_urls[1]' must be an http:// or https:// URL", "'c2:9200'"),
        ),
        (["http://c1:9200", "http://c1:9200/"], ("'control_urls[1]': 'http://c1:9200' is listed twice",)),
        ("http://c1:9200", ("'control_urls' must be a list",)),
    ],
)
def test_bad_control_urls_are_refused_with_one_line(tmp_path, urls, words):
    agent = make_agent(tmp_path / "agent", None, control_urls=urls)
    del agent.config["control_url"]
    _refused(agent, *words)


def test_control_url_and_control_urls_are_exclusive_and_one_is_needed(tmp_path):
    both = make_agent(tmp_path / "both", None, control_urls=["http://c1:9200"])
    _refused(both, "set 'control_url' or 'control_urls', not both")
    neither = make_agent(tmp_path / "neither", None)
    del neither.config["control_url"]
    _refused(neither, "set 'control_url' (one URL) or 'control_urls'")


def _refused(agent: AgentProcess, *words: str) -> None:
    done = agent.run_once("--once")
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    message = done.stderr.strip()
    assert len(message.splitlines()) == 1 and "Traceback" not in done.stderr, done.stderr
    for word in words:
        assert word in message, message


# The role: pool-managerd.yml rendered from llorch_control_urls, read back with the agent's own loader.


def _render_config(tmp_path: Path, **host_vars: Any) -> tuple[dict[str, Any], Any]:
    """pool-managerd.yml as the role renders it from its defaults (as group vars) and these host vars: the
    file's keys and the agent's settings loaded from it."""
    out = render_role(tmp_path, "pool_managerd", "pool-managerd.yml.j2", host="gpu-1", host_vars=host_vars)
    return yaml.safe_load(out["config"].read_text()), load_settings(out["config"])


def test_role_renders_control_urls_from_llorch_control_urls(tmp_path):
    values, settings = _render_config(
        tmp_path, llorch_control_urls=["http://ctl-1:9200/", "http://ctl-2:9200"], llorch_api_token="t" * 40
    )
    assert values["control_urls"] == ["http://ctl-1:9200", "http://ctl-2:9200"]
    assert "control_url" not in values  # exactly one of the two, or the agent refuses to start
    assert settings.control_urls == ("http://ctl-1:9200", "http://ctl-2:9200")


def test_role_renders_one_control_url_when_no_list_is_given(tmp_path):
    values, settings = _render_config(
        tmp_path, llorch_control_url="http://ctl:9200/", llorch_api_token="t" * 40
    )
    assert values["control_url"] == "http://ctl:9200" and "control_urls" not in values
    assert settings.control_urls == ("http://ctl:9200",)


def test_role_list_wins_over_the_single_url(tmp_path):
    values, _settings = _render_config(
        tmp_path,
        llorch_control_url="http://ctl:9200",
        pool_managerd_control_urls=["http://ctl-2:9200", "http://ctl-3:9200"],
        llorch_api_token="t" * 40,
    )
    assert values["control_urls"] == ["http://ctl-2:9200", "http://ctl-3:9200"]
    assert "control_url" not in values

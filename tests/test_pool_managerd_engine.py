"""The agent watches its pools' engines: the real llama-server (launched by engine_exec), the real agent,
the real orchestratord. What the registry shows is what the engine itself answers: ready, busy, dead, and
back; slots in flight during a drain."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import Daemon, wait_until
from support_agent import AgentProcess, make_agent
from support_engine import (
    BUILD_TIMEOUT_S,
    TINY_MODEL_ID,
    EngineUnit,
    LongCompletion,
    engine_archive,
    engine_settings,
    engine_unit,
    make_tiny_model,
    stage_model,
    unpack_engine,
)

pytestmark = pytest.mark.timeout(BUILD_TIMEOUT_S)

HEARTBEAT_MS = 1000
NODE = "gpu-node-1"
# A long completion on the tiny model: about 2,000 tokens/s on one quiet core, so several seconds here.
LONG = 12_000


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    workdir = tmp_path_factory.mktemp("built")
    return unpack_engine(engine_archive(), workdir), make_tiny_model(workdir / "tiny.gguf")


@pytest.fixture
def daemon(daemon_factory) -> Daemon:
    return daemon_factory(heartbeat_interval_ms=HEARTBEAT_MS, node_timeout_ms=10_000)


@pytest.fixture
def node(built, daemon, tmp_path) -> Iterator[tuple[EngineUnit, AgentProcess]]:
    """A pool p0 on GPU 0 with a llama-server of 2 slots, and the agent watching it (neither started)."""
    binary, model = built
    workdir = tmp_path / "node"
    models_dir = workdir / "models"
    stage_model(models_dir, TINY_MODEL_ID, model)
    unit = engine_unit(workdir / "engine", engine_settings("p0", binary, models_dir))
    agent = make_agent(
        workdir,
        daemon,
        pools=[{"pool_id": "p0", "gpus": [0], "slots_total": 7, "engine_file": str(unit.engine_file)}],
        engine_api_key_file=str(unit.credentials_dir / "engine-api-key"),
    )
    yield unit, agent
    agent.stop()
    unit.stop()


def pool_view(daemon: Daemon) -> dict | None:
    answer = daemon.api("GET", f"/v2/nodes/{NODE}")
    return answer.body["pools"][0] if answer.status == 200 and answer.body["pools"] else None


def engine_state(daemon: Daemon) -> str | None:
    pool = pool_view(daemon)
    return pool["engine"]["state"] if pool and pool.get("engine") else None


def wait_for_pool(daemon: Daemon, what: str, timeout: float = 30, **expected) -> dict:
    def matches():
        pool = pool_view(daemon)
        engine = (pool or {}).get("engine") or {}
        seen = {**(pool or {}), **{f"engine_{key}": value for key, value in engine.items()}}
        return pool if pool and all(seen.get(key) == value for key, value in expected.items()) else None

    return wait_until(
        matches, timeout=timeout, interval=0.05, what=f"{what}: {expected} (last {pool_view(daemon)})"
    )


def state_lines(agent: AgentProcess, state: str) -> list[str]:
    return re.findall(rf"engine of pool p0 .* -> {state} .*", agent.log())


def test_a_healthy_engine_makes_its_pool_ready_with_what_it_serves(node, daemon):
    unit, agent = node
    unit.start()
    agent.start()
    pool = wait_for_pool(daemon, "pool ready", ready=True, engine_state="ready")
    assert (pool["slots_total"], pool["slots_free"]) == (2, 2), (
        "the engine's parallel slots, not slots_total: 7"
    )
    assert pool["engine"] == {
        "kind": "llama.cpp",
        "state": "ready",
        "model_id": TINY_MODEL_ID,
        "url": unit.url,
        "version": "b0-unknown",
        "requests_deferred": 0,
    }
    assert len(state_lines(agent, "ready")) == 1
    assert "pool serves" in state_lines(agent, "ready")[0]


def test_a_pool_whose_engine_is_not_started_is_dead_and_not_ready(node, daemon):
    _unit, agent = node
    agent.start()
    pool = wait_for_pool(daemon, "engine dead", engine_state="dead")
    assert pool["ready"] is False
    assert pool["slots_free"] == pool["slots_total"] == 2, "nothing in flight: every slot free"
    assert "cannot connect" in state_lines(agent, "dead")[0]


def test_every_slot_processing_is_busy_and_the_pool_stays_ready(built, daemon, tmp_path):
    binary, model = built
    models_dir = tmp_path / "node" / "models"
    stage_model(models_dir, TINY_MODEL_ID, model)
    unit = engine_unit(tmp_path / "node" / "engine", engine_settings("p0", binary, models_dir, parallel=1))
    agent = make_agent(
        tmp_path / "node",
        daemon,
        pools=[{"pool_id": "p0", "gpus": [0], "engine_file": str(unit.engine_file)}],
        engine_api_key_file=str(unit.credentials_dir / "engine-api-key"),
    )
    try:
        unit.start()
        agent.start()
        wait_for_pool(daemon, "pool ready", engine_state="ready", slots_free=1)
        completion = LongCompletion(unit.url, LONG).start()
        pool = wait_for_pool(daemon, "engine busy", engine_state="busy")
        assert (pool["ready"], pool["slots_total"], pool["slots_free"]) == (True, 1, 0)
        assert completion.wait() > 0
        wait_for_pool(daemon, "engine ready again", engine_state="ready", slots_free=1)
        assert state_lines(agent, "busy") == [], "ready <-> busy is not worth a line at info level"
    finally:
        agent.stop()
        unit.stop()


def test_a_killed_engine_leaves_its_pool_not_ready_within_a_heartbeat_and_comes_back(node, daemon):
    unit, agent = node
    unit.start()
    agent.start()
    wait_for_pool(daemon, "pool ready", ready=True, engine_state="ready")
    unit.kill()
    killed_at = time.monotonic()
    # One heartbeat interval, plus the watch interval (half of it) and slack for two shared cores.
    pool = wait_for_pool(daemon, "pool not ready", timeout=HEARTBEAT_MS / 1000 * 1.5 + 2, ready=False)
    took = time.monotonic() - killed_at
    assert pool["engine"]["state"] == "dead", pool
    assert pool["slots_free"] == pool["slots_total"]
    print(f"killed engine -> pool not ready in the registry: {took:.2f} s")
    unit.start()  # what systemd's Restart=on-failure does; the agent is not restarted
    wait_for_pool(daemon, "pool ready again", ready=True, engine_state="ready")
    assert agent.running()
    assert len(state_lines(agent, "dead")) == 1
    assert len(state_lines(agent, "ready")) == 2, "the first reading and the way back"
    assert "cannot connect" in state_lines(agent, "dead")[0]


def test_a_drain_with_a_request_in_flight_reports_the_busy_slot_until_it_ends(node, daemon):
    unit, agent = node
    unit.start()
    agent.start()
    wait_for_pool(daemon, "pool ready", engine_state="ready", slots_free=2)
    completion = LongCompletion(unit.url, LONG).start()
    wait_for_pool(daemon, "one slot in flight", slots_free=1)
    answer = daemon.api("POST", f"/v2/nodes/{NODE}/drain", {"drain": True})
    assert answer.status == 200, answer.text
    pool = wait_for_pool(daemon, "pool draining", draining=True)
    assert pool["slots_free"] < pool["slots_total"], f"the request is still running: {pool}"
    assert not completion.finished.is_set(), (
        "the completion must outlast the drain for this test to mean much"
    )
    assert completion.wait() > 0
    pool = wait_for_pool(daemon, "pool idle", draining=True, slots_free=2)
    assert pool["slots_total"] == 2


def test_a_pool_with_an_engine_but_no_key_is_refused_in_one_line(node):
    _unit, agent = node
    del agent.config["engine_api_key_file"]
    answer = agent.run_once()
    assert answer.returncode == 2
    assert answer.stderr.strip().endswith(
        "a pool names an engine_file, but neither engine_api_key_file is set nor $CREDENTIALS_DIRECTORY "
        "(LoadCredential=engine-api-key:...) gives the engine API key"
    )


def test_a_bad_engine_file_stops_the_agent_in_one_line(node):
    unit, agent = node
    unit.engine_file.write_text(unit.engine_file.read_text().replace("parallel: 2", "parallel: 0"))
    answer = agent.run_once()
    assert answer.returncode == 2
    assert answer.stderr.strip() == (
        f"pool-managerd: engine file {unit.engine_file}: "
        "'parallel' must be a whole number from 1 to 256, not 0"
    )


def test_an_engine_file_of_another_pool_is_refused(node):
    _unit, agent = node
    agent.config["pools"][0]["pool_id"] = "p1"
    answer = agent.run_once()
    assert answer.returncode == 2
    assert "describes pool 'p0', not pool 'p1'" in answer.stderr
    assert len(answer.stderr.strip().splitlines()) == 1


def test_a_dead_engine_is_reported_at_once_not_at_the_next_heartbeat(built, daemon_factory, tmp_path):
    """With a 10 s heartbeat the registry still learns of a kill within the watch interval (1 s): a change
    into or out of serving sends the heartbeat at once."""
    slow = daemon_factory("slow", heartbeat_interval_ms=10_000, node_timeout_ms=30_000)
    binary, model = built
    models_dir = tmp_path / "node" / "models"
    stage_model(models_dir, TINY_MODEL_ID, model)
    unit = engine_unit(tmp_path / "node" / "engine", engine_settings("p0", binary, models_dir))
    agent = make_agent(
        tmp_path / "node",
        slow,
        pools=[{"pool_id": "p0", "gpus": [0], "engine_file": str(unit.engine_file)}],
        engine_api_key_file=str(unit.credentials_dir / "engine-api-key"),
    )
    try:
        unit.start()
        agent.start()
        wait_for_pool(slow, "pool ready", ready=True, engine_state="ready")
        unit.kill()
        wait_for_pool(slow, "pool not ready well before the next heartbeat", timeout=4, ready=False)
    finally:
        agent.stop()
        unit.stop()

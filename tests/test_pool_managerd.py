"""pool-managerd against a real orchestratord on loopback, with the stand-in nvidia-smi as its only fake."""

from __future__ import annotations

import json
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web
from support import REPO_ROOT, TEST_TOKEN, Daemon, free_port, http, wait_until
from support_agent import (
    FIXTURES,
    MIB,
    STANDIN,
    TLS_HANDSHAKE_RECORD,
    AgentProcess,
    ChangingMachine,
    ScriptedControlPlane,
    TlsFront,
    make_agent,
    standin_env,
)
from support_tls import write_ca, write_server_certificate

sys.path.insert(0, str(REPO_ROOT / "files" / "pool_managerd"))
from pool_managerd.agent import Backoff
from pool_managerd.contract import MODEL_ID_RULE, valid_model_id

NODE = "gpu-node-1"
L4_TOTAL, L4_FREE = 23034 * MIB, 22599 * MIB


@pytest.fixture
def agents() -> Iterator[list[AgentProcess]]:
    started: list[AgentProcess] = []
    yield started
    for agent in started:
        agent.stop()


@pytest.fixture
def start_agent(tmp_path, agents):
    def start(daemon: Daemon | None, name: str = "agent", **overrides) -> AgentProcess:
        agent = make_agent(tmp_path / name, daemon, **overrides).start()
        agents.append(agent)
        return agent

    return start


def node_of(daemon: Daemon, node_id: str = NODE) -> dict | None:
    answer = daemon.api("GET", f"/v2/nodes/{node_id}")
    return answer.body if answer.status == 200 else None


def wait_online(daemon: Daemon, agent: AgentProcess, timeout: float = 15, **match) -> dict:
    def online() -> dict | None:
        assert agent.running(), f"the agent exited:\n{agent.log()}"
        node = node_of(daemon)
        if node and node["status"] == "online" and all(node.get(k) == v for k, v in match.items()):
            return node
        return None

    return wait_until(online, timeout=timeout, what=f"node {NODE} online")


def pools_by_id(node: dict) -> dict[str, dict]:
    return {pool["pool_id"]: pool for pool in node["pools"]}


# --- registration and heartbeats -------------------------------------------------------------------------


def test_node_goes_online_with_its_gpus_vram_in_bytes_driver_and_cuda(daemon, start_agent):
    agent = start_agent(
        daemon,
        pools=[
            {"pool_id": "pool-a", "gpus": [0], "slots_total": 2},
            {"pool_id": "pool-b", "gpus": [1], "slots_total": 3},
        ],
    )
    node = wait_online(daemon, agent)
    gpus = node["capabilities"]["gpus"]
    assert [(g["index"], g["name"], g["vram_total_bytes"]) for g in gpus] == [
        (0, "NVIDIA L4", L4_TOTAL),
        (1, "NVIDIA L4", L4_TOTAL),
    ]
    assert {g["driver_version"] for g in gpus} == {"550.90.07"}
    assert {g["compute_capability"] for g in gpus} == {"8.9"}
    assert node["capabilities"]["cuda_version"] == "12.4"
    assert node["address"] == "http://gpu-node-1.lab:8000"
    pools = pools_by_id(node)
    assert pools["pool-a"]["gpus"] == [0] and pools["pool-b"]["gpus"] == [1]
    assert (pools["pool-b"]["slots_total"], pools["pool-b"]["slots_free"]) == (3, 3)
    assert pools["pool-a"]["vram_total_bytes"] == L4_TOTAL and pools["pool-a"]["vram_free_bytes"] == L4_FREE
    assert all(pool["ready"] and not pool["draining"] for pool in node["pools"])
    assert agent.log().count("registered with") == 1


def test_default_pool_holds_every_gpu_with_summed_vram(daemon, start_agent):
    agent = start_agent(daemon)
    node = wait_online(daemon, agent)
    (pool,) = node["pools"]
    assert (pool["pool_id"], pool["gpus"]) == ("default", [0, 1])
    assert (pool["vram_total_bytes"], pool["vram_free_bytes"]) == (2 * L4_TOTAL, 2 * L4_FREE)


def test_manifest_models_appear_only_with_their_file_at_the_recorded_size(daemon, start_agent):
    agent = start_agent(daemon)
    wait_online(daemon, agent)
    models = agent.models_dir
    (models / "llama-8b.gguf").write_bytes(b"x" * 1000)
    (models / "short.gguf").write_bytes(b"x" * 10)
    agent.write_manifest(
        {
            "llama-8b": {"path": "llama-8b.gguf", "sha256": "0" * 64, "size_bytes": 1000, "staged_at": "now"},
            "mistral-7b": {"path": str(models / "mistral.gguf"), "sha256": "1" * 64, "size_bytes": 5},
            "short": {"path": "short.gguf", "sha256": "2" * 64, "size_bytes": 999},
        }
    )
    wait_until(lambda: node_of(daemon)["models"] == ["llama-8b"], timeout=10, what="llama-8b reported")
    (models / "mistral.gguf").write_bytes(b"12345")  # the file lands after the manifest entry
    wait_until(
        lambda: node_of(daemon)["models"] == ["llama-8b", "mistral-7b"],
        timeout=10,
        what="mistral-7b reported",
    )
    assert pools_by_id(node_of(daemon))["default"]["models_available"] == ["llama-8b", "mistral-7b"]


def test_torn_manifest_is_logged_once_and_the_last_good_one_kept(daemon, start_agent):
    agent = start_agent(daemon)
    wait_online(daemon, agent)
    (agent.models_dir / "m.bin").write_bytes(b"abc")
    agent.write_manifest({"m": {"path": "m.bin", "sha256": "0" * 64, "size_bytes": 3}})
    wait_until(lambda: node_of(daemon)["models"] == ["m"], timeout=10, what="model m reported")
    agent.write_manifest('{"m": {"path": "m.bin", "size_')
    wait_until(lambda: "torn or invalid" in agent.log(), timeout=10, what="the torn manifest logged")
    beats = node_of(daemon)["last_heartbeat_at"]
    wait_until(lambda: node_of(daemon)["last_heartbeat_at"] > beats, timeout=5, what="more heartbeats")
    beats = node_of(daemon)["last_heartbeat_at"]
    wait_until(lambda: node_of(daemon)["last_heartbeat_at"] > beats, timeout=5, what="more heartbeats")
    assert node_of(daemon)["models"] == ["m"]
    assert agent.log().count("torn or invalid") == 1


def test_manifest_model_id_the_daemon_would_refuse_is_dropped_and_logged_once(daemon, tmp_path, agents):
    # A hand-edited manifest: one bad key must not make every heartbeat a 400 and keep the node offline.
    agent = make_agent(tmp_path / "agent", daemon)
    too_long = "m" * 300
    for name in ("good.gguf", "long.gguf"):
        (agent.models_dir / name).write_bytes(b"abc")
    agent.write_manifest(
        {
            "meta-llama/Llama-3.1-8B-Instruct": {"path": "good.gguf", "sha256": "0" * 64, "size_bytes": 3},
            too_long: {"path": "long.gguf", "sha256": "1" * 64, "size_bytes": 3},
        }
    )
    agents.append(agent.start())
    node = wait_online(daemon, agent)
    assert node["models"] == ["meta-llama/Llama-3.1-8B-Instruct"]
    beats = _heartbeats_ok(daemon)
    wait_until(lambda: _heartbeats_ok(daemon) >= beats + 5, timeout=10, what="5 more heartbeats")
    dropped = [line for line in agent.log().splitlines() if "not a valid model id" in line]
    assert len(dropped) == 1, agent.log()
    assert "'mmmmmmmmmm" in dropped[0] and "300 characters" in dropped[0] and too_long not in dropped[0]
    assert MODEL_ID_RULE in dropped[0]


def test_model_id_rule_is_the_daemons():
    assert valid_model_id("meta-llama/Llama-3.1-8B-Instruct") and valid_model_id("qwen2:7b")
    assert valid_model_id("m" * 256) and not valid_model_id("m" * 257)
    for bad in ("", "m\n", "has space", "tab\tid", "é", 7):
        assert not valid_model_id(bad), bad


def test_operator_drain_reaches_every_pool_and_undrain_lifts_it(daemon, start_agent):
    agent = start_agent(
        daemon,
        pools=[
            {"pool_id": "a", "gpus": [0], "slots_total": 2},
            {"pool_id": "b", "gpus": [1], "slots_total": 2},
        ],
    )
    wait_online(daemon, agent)
    assert daemon.api("POST", f"/v2/nodes/{NODE}/drain", {"drain": True}).status == 200

    def pools_draining(expected: bool) -> bool:
        return all(pool["draining"] is expected for pool in node_of(daemon)["pools"])

    wait_until(lambda: pools_draining(True), timeout=10, what="pools draining")
    # Nothing runs on the node, so it is idle at once: every slot free, which the rolling upgrade waits for.
    assert [(p["slots_free"], p["slots_total"]) for p in node_of(daemon)["pools"]] == [(2, 2), (2, 2)]
    placement = daemon.api("POST", "/v2/placement", {})
    assert placement.status == 503, placement.body  # the only node drains: placement skips it
    assert daemon.api("POST", f"/v2/nodes/{NODE}/drain", {"drain": False}).status == 200
    wait_until(lambda: pools_draining(False), timeout=10, what="pools no longer draining")
    assert "drain requested by the control plane" in agent.log()
    assert "drain lifted" in agent.log()


# --- surviving the control plane -------------------------------------------------------------------------


def test_daemon_killed_and_restarted_the_node_comes_back_and_the_agent_never_exits(daemon, start_agent):
    agent = start_agent(daemon)
    wait_online(daemon, agent)
    daemon.kill(signal.SIGKILL)
    wait_until(lambda: "unreachable" in agent.log(), timeout=10, what="the outage logged")
    assert agent.running()
    daemon.start()
    before = node_of(daemon)["last_heartbeat_at"] or ""  # None when the kill beat the heartbeat flush
    wait_until(
        lambda: (
            node_of(daemon)["status"] == "online" and (node_of(daemon)["last_heartbeat_at"] or "") > before
        ),
        timeout=15,
        what="heartbeats after the restart",
    )
    assert agent.running()
    log = agent.log()
    assert "back online" in log
    assert log.count("unreachable") == 1, log  # one line per outage, not one per retry


def test_node_deleted_by_an_operator_registers_again(daemon, start_agent):
    agent = start_agent(daemon)
    wait_online(daemon, agent)
    assert daemon.api("DELETE", f"/v2/nodes/{NODE}").status == 204
    wait_until(lambda: "registered again" in agent.log(), timeout=10, what="the agent registering again")
    node = wait_online(daemon, agent)
    assert [g["index"] for g in node["capabilities"]["gpus"]] == [0, 1]
    # Once registered again it heartbeats on: one 404, one new registration, not one per heartbeat.
    beats = _heartbeats_ok(daemon)
    wait_until(lambda: _heartbeats_ok(daemon) >= beats + 5, timeout=10, what="5 more heartbeats")
    log = agent.log()
    assert log.count("does not know node gpu-node-1") == 1 and log.count("registered again") == 1, log


async def node_not_found(request: web.Request) -> web.StreamResponse:
    return web.json_response({"code": "NODE_NOT_FOUND", "message": "no such node"}, status=404)


def test_heartbeats_always_404_after_registering_back_off_instead_of_hammering(start_agent):
    # A control plane that takes every registration and answers every heartbeat 404, as a proxy routing
    # only some paths (or a renamed route) would.
    with ScriptedControlPlane() as control:
        control.heartbeat = node_not_found
        agent = start_agent(None, control_url=control.url, backoff_initial_s=0.1, backoff_max_s=1)
        wait_until(lambda: control.heartbeats, timeout=15, what="a first heartbeat")
        first = control.registrations[0].at
        wait_until(
            lambda: control.heartbeats[-1].at - first >= 2, timeout=15, what="2 s of register/heartbeat tries"
        )
        seen = [request.path.rsplit("/", 1)[-1] for request in list(control.seen)]  # one snapshot
        # Backoff 0.1 s doubling to a 1 s cap, with full jitter: about 6 tries in 2 s; never hundreds.
        assert seen.count("register") <= 30, seen
        # Each 404 leads to a new registration (after the backoff), never to another heartbeat.
        assert seen == ["register", "heartbeat"] * (len(seen) // 2) + ["register"] * (len(seen) % 2), seen
        assert agent.running()
    log = agent.log()
    assert log.count("answers its heartbeats with 404") == 1, log
    assert log.count("registered again") == 0, log


def test_sigterm_deregisters_and_exits_zero(daemon, start_agent):
    agent = start_agent(daemon)
    wait_online(daemon, agent)
    assert agent.signal(signal.SIGTERM) == 0
    assert daemon.api("GET", f"/v2/nodes/{NODE}").status == 404
    assert "deregistered node gpu-node-1" in agent.log()


def test_sigint_without_deregister_on_stop_leaves_the_node(daemon, start_agent):
    agent = start_agent(daemon, deregister_on_stop=False)
    wait_online(daemon, agent)
    assert agent.signal(signal.SIGINT) == 0
    assert daemon.api("GET", f"/v2/nodes/{NODE}").status == 200


def _register_attempts(daemon: Daemon) -> float:
    metrics = http("GET", daemon.url + "/metrics").text
    pattern = (
        r'orchestratord_request_duration_seconds_count\{method="POST",route="/v2/nodes/register"\} (\S+)'
    )
    found = re.search(pattern, metrics)
    return float(found.group(1)) if found else 0.0


def test_rejected_token_is_one_clear_line_and_the_agent_keeps_trying(daemon, start_agent):
    agent = start_agent(daemon, token="wrong-token-" + "z" * 40)
    wait_until(lambda: _register_attempts(daemon) >= 4, timeout=15, what="several rejected registrations")
    assert agent.running()
    log = agent.log()
    assert log.count(f"token rejected by {daemon.url}") == 1, log
    assert "wrong-token" not in log


def test_backoff_is_exponential_with_full_jitter_and_capped():
    backoff = Backoff(initial_s=0.5, cap_s=30)
    delays = [backoff.next_delay() for _ in range(40)]
    ceilings = [min(30, 0.5 * 2**attempt) for attempt in range(40)]
    assert all(0 <= delay <= ceiling for delay, ceiling in zip(delays, ceilings, strict=True))
    assert max(delays[10:]) > 1  # grows past the first steps instead of retrying at a fixed pace
    backoff.reset()
    assert backoff.next_delay() <= 0.5


def test_backoff_jitter_is_full_uniform_over_zero_to_the_ceiling_at_every_step():
    # Full jitter (not "half the ceiling plus jitter", not a fixed step): over many draws the waits of
    # one step spread evenly from 0 to its ceiling. Seeded, so the figures are the same on every run.
    random.seed(20260101)
    for attempt, ceiling in [(0, 0.5), (3, 4.0), (40, 30.0)]:
        draws = []
        for _ in range(4000):
            backoff = Backoff(initial_s=0.5, cap_s=30)
            backoff.attempt = attempt
            draws.append(backoff.next_delay())
        assert 0 <= min(draws) < 0.01 * ceiling and 0.99 * ceiling < max(draws) <= ceiling
        assert abs(statistics.mean(draws) - ceiling / 2) < 0.03 * ceiling
        for tenth in range(1, 10):  # each tenth of the range holds about a tenth of the draws
            share = sum(draw < tenth * ceiling / 10 for draw in draws) / len(draws)
            assert abs(share - tenth / 10) < 0.03, (attempt, tenth, share)


def test_hanging_control_plane_times_out_and_the_agent_recovers_when_it_answers(daemon_factory, start_agent):
    port = free_port()
    listener = socket.create_server(("127.0.0.1", port))
    held: list[socket.socket] = []

    def accept_and_hang() -> None:  # accepts connections and never answers
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            held.append(connection)

    threading.Thread(target=accept_and_hang, daemon=True).start()
    agent = start_agent(None, control_url=f"http://127.0.0.1:{port}", request_timeout_s=0.5)
    try:
        wait_until(lambda: "no answer within 0.5 s" in agent.log(), timeout=10, what="the request timing out")
    finally:
        listener.close()
        for connection in held:
            connection.close()
    assert agent.running()
    daemon = daemon_factory(listen_port=port)
    wait_online(daemon, agent)
    assert "registered with" in agent.log()


# --- an https control plane ------------------------------------------------------------------------------


@pytest.fixture
def tls_front(daemon, tmp_path) -> Iterator[tuple[TlsFront, Path]]:
    """The daemon behind TLS with a certificate signed by a CA the test made; the front and that CA's file."""
    tls = tmp_path / "tls"
    tls.mkdir()
    ca = write_ca(tls / "ca.pem")
    write_server_certificate(ca, tls / "server.pem", tls / "server-key.pem")
    with TlsFront(daemon.config["listen_port"], tls / "server.pem", tls / "server-key.pem") as front:
        yield front, tls / "ca.pem"


def test_agent_registers_heartbeats_and_deregisters_over_https_trusting_its_ca_file(
    daemon, start_agent, tls_front
):
    front, ca_file = tls_front
    agent = start_agent(daemon, control_url=front.url, ca_file=str(ca_file))
    wait_online(daemon, agent)
    beats = _heartbeats_ok(daemon)
    wait_until(lambda: _heartbeats_ok(daemon) >= beats + 3, timeout=10, what="3 heartbeats over TLS")
    assert f"registered with {front.url} as node {NODE}" in agent.log()
    assert agent.signal(signal.SIGTERM) == 0
    assert node_of(daemon) is None and "deregistered node gpu-node-1" in agent.log()
    # Every connection the agent opened was TLS, and each handshake completed.
    assert front.connections
    assert all(c.first_byte == TLS_HANDSHAKE_RECORD and c.handshake_done for c in front.connections), (
        front.connections
    )


@pytest.mark.parametrize("trusted", ["another-ca", "system-store"])
def test_https_certificate_the_agent_does_not_trust_is_one_line_and_backoff_never_plain_http(
    daemon, start_agent, tls_front, tmp_path, trusted
):
    front, _ = tls_front
    overrides = {}
    if trusted == "another-ca":  # a valid CA bundle, only not the one that signed the server's certificate
        write_ca(tmp_path / "other-ca.pem", "some other CA")
        overrides["ca_file"] = str(tmp_path / "other-ca.pem")
    agent = start_agent(daemon, control_url=front.url, log_level="debug", **overrides)
    wait_until(
        lambda: (
            running_agent(agent) and len(front.connections) >= 4 and agent.log().count("next try in") >= 4
        ),
        timeout=20,
        what="4 refused handshakes",
    )
    # Each try opened with a TLS handshake the agent broke off: no plain-HTTP retry; the daemon saw nothing.
    assert all(c.first_byte == TLS_HANDSHAKE_RECORD and not c.handshake_done for c in front.connections), (
        front.connections
    )
    assert node_of(daemon) is None and _register_attempts(daemon) == 0
    log = agent.log()
    trouble = [line for line in log.splitlines() if "on registration" in line]
    assert len(trouble) == 1 and "ERROR" in trouble[0], log
    trusted = overrides.get("ca_file", "the system's CA store (no ca_file set)")
    assert f"TLS certificate that {trusted} does not vouch for" in trouble[0], trouble
    assert "certificate not trusted: 'unable to get local issuer certificate'" in trouble[0], trouble
    assert "Traceback" not in log and TEST_TOKEN not in log
    assert agent.signal(signal.SIGTERM) == 0


def running_agent(agent: AgentProcess) -> bool:
    assert agent.running(), f"the agent exited:\n{agent.log()}"
    return True


# --- --once and refused setups ---------------------------------------------------------------------------


def test_once_prints_the_registration_with_the_models_and_exits_zero(tmp_path):
    agent = make_agent(tmp_path / "agent", None, pools=[{"pool_id": "p", "gpus": [1], "slots_total": 4}])
    (agent.models_dir / "m.bin").write_bytes(b"abcd")
    agent.write_manifest({"m": {"path": "m.bin", "sha256": "0" * 64, "size_bytes": 4}})
    done = agent.run_once("--once")
    assert done.returncode == 0, done.stderr
    body = json.loads(done.stdout)
    assert body["node_id"] == NODE
    assert body["pools"] == [{"pool_id": "p", "gpus": [1], "slots_total": 4}]
    assert [g["vram_total_bytes"] for g in body["capabilities"]["gpus"]] == [L4_TOTAL, L4_TOTAL]
    assert (body["capabilities"]["cuda_version"], body["models_available"]) == ("12.4", ["m"])


def test_once_on_a_host_without_gpus_registers_a_cpu_pool_only_when_allowed(tmp_path):
    allowed = make_agent(tmp_path / "cpu", None, fixture="no-devices", allow_cpu_pools=True).run_once(
        "--once"
    )
    assert allowed.returncode == 0, allowed.stderr
    body = json.loads(allowed.stdout)
    assert (body["capabilities"]["gpus"], body["pools"]) == (
        [],
        [{"pool_id": "cpu", "gpus": [], "slots_total": 1}],
    )
    refused = make_agent(tmp_path / "gpu", None, fixture="no-devices").run_once("--once")
    assert refused.returncode == 3
    assert "No devices were found" in refused.stderr and "allow_cpu_pools" in refused.stderr


def _refused(agent: AgentProcess, *words: str, code: int) -> None:
    done = agent.run_once()
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    message = done.stderr.strip()
    assert len(message.splitlines()) == 1, message
    assert "Traceback" not in done.stderr + done.stdout
    for word in words:
        assert word in message, message


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"colour": "blue"}, ("unknown key 'colour'",)),
        ({"request_timeout_s": "fast"}, ("'request_timeout_s' must be a number of seconds", "'fast'")),
        ({"deregister_on_stop": "yes"}, ("'deregister_on_stop' must be true or false",)),
        ({"control_url": "llorch-control:9200"}, ("'control_url' must be an http:// or https:// URL",)),
        ({"pools": [{"pool_id": "a", "gpus": [0, 7], "slots_total": 1}]}, ("names GPU 7", "GPUs are: 0, 1")),
        (
            {"pools": [{"pool_id": "a", "gpus": [0]}, {"pool_id": "b", "gpus": [0]}]},
            ("GPU 0 is already in pool",),
        ),
        ({"ca_file": "/nonexistent/ca.pem"}, ("ca_file /nonexistent/ca.pem not found",)),
        # The daemon's id rule has no room for a trailing newline ("$" alone would let one through).
        ({"pools": [{"pool_id": "a\n", "gpus": [0]}]}, ("'pools[0].pool_id' must be",)),
        ({"pools": [{"pool_id": "a", "gpu": [0]}]}, ("'pools[0]': unknown key 'gpu'", "known: pool_id")),
        ({"pools": [{"pool_id": "a", "slots_total": 1.5}]}, ("'pools[0].slots_total' must be", "1.5")),
        ({"pools": [{"gpus": [0]}]}, ("'pools[0].pool_id' is required",)),
        ({"node_id": ".."}, ("'node_id' must be", "not '.' or '..'")),
        ({"log_level": "loud"}, ("'log_level' must be one of debug, info, warning, error",)),
        ({"backoff_initial_s": 5, "backoff_max_s": 1}, ("'backoff_max_s' must not be below",)),
    ],
)
def test_bad_config_is_refused_with_one_line_naming_the_key(tmp_path, overrides, words):
    _refused(make_agent(tmp_path / "agent", None, **overrides), *words, code=2)


def test_missing_config_file_is_refused(tmp_path):
    agent = make_agent(tmp_path / "agent", None)  # its config file is never written
    done = subprocess.run(agent.command(), capture_output=True, text=True, timeout=30, env=standin_env())
    assert done.returncode == 2
    assert done.stderr.strip() == f"pool-managerd: config file {agent.config_path} not found"


def test_token_file_readable_by_others_is_refused(tmp_path):
    agent = make_agent(tmp_path / "agent", None)
    Path(agent.config["token_file"]).chmod(0o644)
    _refused(agent, "is readable by group or others (mode 0644)", "chmod 600", code=2)
    assert TEST_TOKEN not in agent.log()


def _refused_once(agent: AgentProcess, *words: str, code: int = 2) -> str:
    """`--once` refuses the setup with one line holding `words` and exit `code`; that line."""
    done = agent.run_once("--once")
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    message = done.stderr.strip()
    assert len(message.splitlines()) == 1 and "Traceback" not in done.stderr, done.stderr
    for word in words:
        assert word in message, message
    return message


def test_token_shorter_than_32_characters_is_refused_as_the_daemon_does(tmp_path):
    short = make_agent(tmp_path / "short", None, token="s" * 31)
    message = _refused_once(short, f"token_file {short.config['token_file']}", "at least 32 characters")
    assert "s" * 31 not in message
    assert make_agent(tmp_path / "long", None, token="t" * 32).run_once("--once").returncode == 0


def test_ca_file_that_is_not_a_pem_bundle_is_refused_with_one_line(tmp_path):
    bad_ca = tmp_path / "ca.pem"
    bad_ca.write_text("this is not a certificate\n")
    agent = make_agent(
        tmp_path / "agent", None, control_url="https://llorch-control:9200", ca_file=str(bad_ca)
    )
    _refused(agent, str(agent.config_path), f"ca_file {bad_ca}", "PEM", code=2)
    _refused_once(agent, f"ca_file {bad_ca}", "PEM")


def test_config_file_that_is_not_utf8_is_refused_with_one_line(tmp_path):
    agent = make_agent(tmp_path / "agent", None)
    agent.write_config()
    agent.config_path.write_bytes(agent.config_path.read_bytes() + b"# caf\xe9 (latin-1)\n")
    done = subprocess.run(agent.command(), capture_output=True, text=True, timeout=30, env=standin_env())
    assert (done.returncode, done.stdout) == (2, ""), done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"config file {agent.config_path}" in done.stderr and "UTF-8" in done.stderr


def test_token_file_that_is_not_utf8_is_refused_with_one_line(tmp_path):
    agent = make_agent(tmp_path / "agent", None)
    Path(agent.config["token_file"]).write_bytes(b"\xff\xfe" + b"t" * 40 + b"\n")
    _refused(agent, f"token_file {agent.config['token_file']}", "UTF-8", code=2)


@pytest.mark.parametrize(
    ("fixture", "said"),
    [
        ("driver-mismatch", "Driver/library version mismatch"),
        ("no-communicate", "couldn't communicate with the NVIDIA driver"),
        ("cut-off", "cut-off output"),
    ],
)
def test_broken_gpu_driver_is_refused_with_what_nvidia_smi_said(tmp_path, fixture, said):
    _refused(make_agent(tmp_path / "agent", None, fixture=fixture), "GPU probe failed", said, code=3)


def _switchable_standin(tmp_path: Path) -> tuple[Path, Path]:
    """A private copy of the stand-in that picks its machine from the file beside it (returned second), so a
    test can break the "driver" under a running agent."""
    standin = tmp_path / "bin" / "nvidia-smi-standin"
    standin.parent.mkdir()
    standin.write_text(STANDIN.read_text())
    standin.chmod(0o755)
    chosen = tmp_path / "bin" / "nvidia-smi-standin.fixture"
    chosen.write_text(str(FIXTURES / "lab-2x-l4"))
    return standin, chosen


def _start_on_switchable(agent: AgentProcess) -> AgentProcess:
    """Start the agent without NVIDIA_SMI_STANDIN_FIXTURE, so its stand-in reads the file beside it."""
    agent.write_config()
    env = standin_env()
    del env["NVIDIA_SMI_STANDIN_FIXTURE"]
    agent.proc = subprocess.Popen(
        agent.command(), env=env, stdout=agent.log_path.open("ab"), stderr=subprocess.STDOUT
    )
    return agent


def _heartbeats_ok(daemon: Daemon) -> float:
    found = re.search(
        r'orchestratord_heartbeats_total\{outcome="ok"\} (\S+)', http("GET", daemon.url + "/metrics").text
    )
    return float(found.group(1)) if found else 0.0


def test_gpu_failing_at_runtime_marks_pools_not_ready_until_it_recovers(daemon, start_agent, tmp_path):
    standin, chosen = _switchable_standin(tmp_path)
    agent = make_agent(tmp_path / "agent", daemon, nvidia_smi=str(standin), gpu_probe_interval_s=0.2)
    _start_on_switchable(agent)
    try:
        wait_online(daemon, agent)
        chosen.write_text(str(FIXTURES / "driver-mismatch"))
        wait_until(lambda: not node_of(daemon)["pools"][0]["ready"], timeout=10, what="the pool not ready")
        chosen.write_text(str(FIXTURES / "lab-2x-l4"))
        wait_until(lambda: node_of(daemon)["pools"][0]["ready"], timeout=10, what="the pool ready again")
        log = agent.log()
        assert log.count("GPU probe failed") == 1 and "Driver/library version mismatch" in log
        assert "GPU probe works again" in log
        assert agent.running()
    finally:
        agent.stop()


def test_free_vram_is_read_again_every_probe_interval_and_reaches_the_registry(daemon, start_agent, tmp_path):
    # Placement by vram_bytes trusts vram_free_bytes: it must follow the machine, not stay what the agent
    # saw at startup. The stand-in replays a machine the test changes twice (a one-off re-read would pass
    # once); only GPU 1 changes, so its pool moves and the other stays.
    machine = ChangingMachine(tmp_path / "machine")
    probe_interval_s = 1.0
    agent = start_agent(
        daemon,
        fixture=str(machine.directory),
        gpu_probe_interval_s=probe_interval_s,
        pools=[{"pool_id": "a", "gpus": [0]}, {"pool_id": "b", "gpus": [1]}],
    )
    node = wait_online(daemon, agent)
    assert [pools_by_id(node)[p]["vram_free_bytes"] for p in ("a", "b")] == [L4_FREE, L4_FREE]
    for free_mib in (10_000, 3_000):
        machine.set_free_mib(1, free_mib)
        changed_at = time.monotonic()
        # One probe interval, the probe itself and one 200 ms heartbeat; the slack is for a busy machine.
        # An agent that probed only at startup, or at the 15 s default, misses this deadline.
        wait_until(
            lambda free_mib=free_mib: pools_by_id(node_of(daemon))["b"]["vram_free_bytes"] == free_mib * MIB,
            timeout=probe_interval_s + 4,
            what=f"pool b reporting {free_mib} MiB free",
        )
        took = time.monotonic() - changed_at
        print(f"free VRAM {free_mib} MiB reached the registry {took:.2f} s after the change")
        pools = pools_by_id(node_of(daemon))
        assert pools["a"]["vram_free_bytes"] == L4_FREE and pools["a"]["vram_total_bytes"] == L4_TOTAL
        assert pools["b"]["vram_total_bytes"] == L4_TOTAL and pools["b"]["ready"], pools
    # Later heartbeats keep the new value (no flip back to a cached startup figure).
    beats = _heartbeats_ok(daemon)
    wait_until(lambda: _heartbeats_ok(daemon) >= beats + 5, timeout=10, what="5 more heartbeats")
    assert pools_by_id(node_of(daemon))["b"]["vram_free_bytes"] == 3_000 * MIB
    log = agent.log()
    assert log.count("registered with") == 1 and "GPU probe failed" not in log, log


def test_hung_nvidia_smi_never_delays_a_heartbeat_pools_go_not_ready_and_sigterm_still_exits(
    daemon, agents, tmp_path
):
    # A GPU that falls off the bus leaves nvidia-smi hanging inside the driver. The node must stay online
    # (the daemon's node timeout is 3 s here) with its GPU pools not ready, and a stop must not wait for it.
    standin, chosen = _switchable_standin(tmp_path)
    agent = make_agent(
        tmp_path / "agent", daemon, nvidia_smi=str(standin), gpu_probe_interval_s=0.2, gpu_probe_timeout_s=1
    )
    agents.append(_start_on_switchable(agent))
    wait_online(daemon, agent)
    chosen.write_text(str(FIXTURES / "hung"))
    wait_until(lambda: not node_of(daemon)["pools"][0]["ready"], timeout=10, what="the GPU pool not ready")
    # Heartbeats keep their 200 ms pace through several hung probes, for longer than the node timeout.
    beats = _heartbeats_ok(daemon)
    wait_until(lambda: _heartbeats_ok(daemon) >= beats + 20, timeout=8, what="20 more heartbeats")
    node = node_of(daemon)
    assert node["status"] == "online" and not node["pools"][0]["ready"], node
    assert f"node {NODE} offline" not in daemon.log()
    log = agent.log()
    assert log.count("GPU probe failed") == 1 and "nvidia-smi did not answer within 1 s" in log, log

    chosen.write_text(str(FIXTURES / "lab-2x-l4"))
    wait_until(lambda: node_of(daemon)["pools"][0]["ready"], timeout=10, what="the GPU pool ready again")
    chosen.write_text(str(FIXTURES / "hung"))
    wait_until(lambda: not node_of(daemon)["pools"][0]["ready"], timeout=10, what="the GPU pool not ready")
    started = time.monotonic()
    assert agent.signal(signal.SIGTERM, timeout=10) == 0  # while a probe hangs
    assert time.monotonic() - started < 5, time.monotonic() - started
    assert "deregistered node gpu-node-1" in agent.log()


def test_example_config_documents_every_key_and_is_accepted():
    from pool_managerd.config import SETTING_NAMES, load_settings

    example = REPO_ROOT / "files" / "pool_managerd" / "pool-managerd.example.yml"
    text = example.read_text()
    assert [key for key in SETTING_NAMES if f"\n{key}:" not in text and f"\n# {key}:" not in text] == []
    assert load_settings(example).pools[1].gpus == (1,)


def test_cpu_only_host_registers_when_allowed(daemon, start_agent):
    agent = start_agent(daemon, fixture="no-devices", allow_cpu_pools=True)
    node = wait_online(daemon, agent)
    assert node["capabilities"]["gpus"] == []
    assert [(p["pool_id"], p["gpus"], p["ready"], p["vram_total_bytes"]) for p in node["pools"]] == [
        ("cpu", [], True, 0)
    ]


def test_sigterm_while_the_control_plane_is_away_still_exits_zero(start_agent):
    agent = start_agent(None, control_url=f"http://127.0.0.1:{free_port()}")
    wait_until(lambda: "unreachable on registration" in agent.log(), timeout=10, what="the outage logged")
    assert agent.signal(signal.SIGTERM) == 0
    assert "pool-managerd stopped" in agent.log()

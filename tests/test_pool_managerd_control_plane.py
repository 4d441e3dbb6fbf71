"""The real pool-managerd facing a control plane that misbehaves: huge, malformed or redirected answers,
5xx, names that do not resolve, a DELETE that hangs. The control plane is a small aiohttp server in the
test process (ScriptedControlPlane); the agent is the real program with the stand-in nvidia-smi."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web
from support import REPO_ROOT, TEST_TOKEN, wait_until
from support_agent import AgentProcess, ScriptedControlPlane, make_agent, registered

sys.path.insert(0, str(REPO_ROOT / "files" / "pool_managerd"))
from pool_managerd.agent import heartbeat_delay_s

MIB = 1024 * 1024


@pytest.fixture
def control() -> Iterator[ScriptedControlPlane]:
    with ScriptedControlPlane() as plane:
        yield plane


@pytest.fixture
def agents() -> Iterator[list[AgentProcess]]:
    started: list[AgentProcess] = []
    yield started
    for agent in started:
        agent.stop()


@pytest.fixture
def start_agent(tmp_path, agents):
    def start(control_url: str, name: str = "agent", **overrides) -> AgentProcess:
        overrides.setdefault("backoff_initial_s", 0.05)
        overrides.setdefault("backoff_max_s", 0.4)
        agent = make_agent(tmp_path / name, None, control_url=control_url, **overrides).start()
        agents.append(agent)
        return agent

    return start


def rss_bytes(agent: AgentProcess) -> int:
    for line in Path(f"/proc/{agent.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def running(agent: AgentProcess) -> bool:
    assert agent.running(), f"the agent exited:\n{agent.log()}"
    return True


def answering(raw: bytes, status: int = 200):
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(body=raw, status=status, content_type="application/json")

    return handler


# --- answers the agent must not swallow whole ------------------------------------------------------------


async def endless_answer(request: web.Request) -> web.StreamResponse:
    """200 and JSON-looking bytes that never end (stopped at 256 MiB, far above any sane bound)."""
    response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
    await response.prepare(request)
    chunk = b'{"pad": "' + b"x" * MIB
    try:
        for _ in range(256):
            await response.write(chunk)
    except (ConnectionError, RuntimeError):
        pass  # the agent hung up: what it should do
    return response


async def announced_huge(request: web.Request) -> web.StreamResponse:
    """A Content-Length of 10 GiB: refused on the header, before any byte is read."""
    response = web.StreamResponse(status=200, headers={"Content-Length": str(10 * 1024 * MIB)})
    await response.prepare(request)
    with contextlib.suppress(ConnectionError, RuntimeError):
        await response.write(b"{" * 1024)
    return response


@pytest.mark.parametrize("huge", [endless_answer, announced_huge], ids=["endless", "announced"])
def test_huge_answer_is_cut_at_64_kib_and_the_agent_stays_small_and_retries(control, start_agent, huge):
    control.register = huge
    agent = start_agent(control.url)
    wait_until(lambda: running(agent) and len(control.registrations) >= 4, timeout=20, what="4 tries")
    # A Python agent with aiohttp sits near 50 MB; one swallowed 256 MiB answer would show.
    assert rss_bytes(agent) < 150 * MIB, rss_bytes(agent)
    log = agent.log()
    assert log.count("an answer over 65536 bytes") == 1, log
    assert "Traceback" not in log
    assert agent.signal(signal.SIGTERM) == 0


# --- answers outside the contract ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b'{"next_heartbeat_ms": "soon", "drain": false}',
        b'{"next_heartbeat_ms": null, "drain": false}',
        b'{"next_heartbeat_ms": 1e400, "drain": false}',
        b'{"next_heartbeat_ms": 1e12, "drain": false}',
        b'{"drain": false}',
        b"null",
        b"[5000, false]",
        b"not json at all",
        b'{"next_heartbeat_ms": 100, "drain": "false"}',
    ],
    ids=["soon", "null", "1e400", "1e12-float", "missing", "null-body", "array", "not-json", "drain-string"],
)
def test_heartbeat_answer_outside_the_contract_is_one_line_and_backoff_never_a_crash(
    control, start_agent, raw
):
    control.heartbeat = answering(raw)
    agent = start_agent(control.url, backoff_initial_s=0.1, backoff_max_s=0.4)
    wait_until(lambda: running(agent) and len(control.heartbeats) >= 6, timeout=20, what="6 heartbeats")
    beats = control.heartbeats
    # Backoff between tries (0.1 s doubling to 0.4 s, full jitter), never a tight loop: 5 gaps take at
    # least a few tenths of a second on any machine.
    assert beats[5].at - beats[0].at > 0.2, [b.at for b in beats]
    log = agent.log()
    assert log.count("an answer that is not a HeartbeatAnswer") == 1, log
    assert "Traceback" not in log and "drain requested" not in log
    assert all(not pool["draining"] for beat in beats for pool in json.loads(beat.body)["pools"])
    # The same control plane answering by the contract again is obeyed at once.
    control.heartbeat = answering(b'{"next_heartbeat_ms": 100, "drain": true}')
    wait_until(lambda: "drain requested by the control plane" in agent.log(), timeout=10, what="drain")
    seen = len(control.heartbeats)
    wait_until(lambda: len(control.heartbeats) >= seen + 2, timeout=10, what="2 more heartbeats")
    assert all(pool["draining"] for pool in json.loads(control.heartbeats[-1].body)["pools"])


def test_registration_answer_outside_the_contract_is_a_bad_answer_not_a_registration(control, start_agent):
    control.register = answering(
        b'{"node_id": "gpu-node-1", "status": "online", "heartbeat_interval_ms": "1"}'
    )
    agent = start_agent(control.url)
    wait_until(lambda: running(agent) and len(control.registrations) >= 4, timeout=20, what="4 tries")
    assert control.heartbeats == []
    log = agent.log()
    assert log.count("an answer that is not a RegisterAnswer") == 1 and "registered with" not in log, log


def test_interval_of_a_trillion_ms_is_clamped_under_the_node_timeout_never_a_sleep_forever(
    control, start_agent
):
    control.heartbeat = answering(b'{"next_heartbeat_ms": 1000000000000, "drain": false}')
    agent = start_agent(control.url)  # the control plane announced node_timeout_ms 3000
    wait_until(lambda: running(agent) and len(control.heartbeats) >= 4, timeout=20, what="4 heartbeats")
    assert "Traceback" not in agent.log()


def test_interval_of_zero_is_clamped_to_100_ms_not_a_tight_loop(control, start_agent):
    control.heartbeat = answering(b'{"next_heartbeat_ms": 0, "drain": false}')
    agent = start_agent(control.url)
    wait_until(lambda: running(agent) and len(control.heartbeats) >= 12, timeout=20, what="12 heartbeats")
    beats = control.heartbeats
    gaps = [later.at - earlier.at for earlier, later in itertools.pairwise(beats)]
    # Each gap is the agent's 100 ms wait plus a request; the server's clock stamps arrivals.
    assert min(gaps[1:]) >= 0.09, gaps


def test_heartbeat_delay_stays_within_100_ms_and_60_s_and_under_half_the_node_timeout():
    assert heartbeat_delay_s(10**12, None) == 60.0
    assert heartbeat_delay_s(10**30, 15000) == 7.5
    assert heartbeat_delay_s(-5, None) == heartbeat_delay_s(0, 15000) == 0.1
    assert heartbeat_delay_s(5000, 15000) == 5.0
    assert heartbeat_delay_s(5000, 0) == 5.0  # a nonsensical timeout is ignored, not obeyed
    assert heartbeat_delay_s(5000, 10) == 0.1
    assert heartbeat_delay_s(5000, 1) == 0.1  # a 1 ms timeout still caps the wait, at the 100 ms floor
    assert heartbeat_delay_s(10**6, 15001) == 7.5  # whole milliseconds: half of an odd timeout rounds down


# --- redirects -------------------------------------------------------------------------------------------


def test_redirect_is_not_followed_and_the_registration_never_reaches_the_other_host(control, start_agent):
    with ScriptedControlPlane() as elsewhere:

        async def redirect(request: web.Request) -> web.StreamResponse:
            raise web.HTTPTemporaryRedirect(f"{elsewhere.url}/v2/nodes/register?sig=secret")

        control.register = redirect
        agent = start_agent(control.url)
        wait_until(lambda: running(agent) and len(control.registrations) >= 4, timeout=20, what="4 tries")
        assert elsewhere.seen == []
    log = agent.log()
    assert log.count("a redirect to") == 1 and f"{elsewhere.url}/v2/nodes/register" in log, log
    assert "sig=secret" not in log and TEST_TOKEN not in log


# --- outages: the agent never exits ----------------------------------------------------------------------


def test_agent_never_exits_on_any_5xx_and_registers_once_they_stop(control, start_agent):
    statuses = iter([500, 502, 503, 504, 507, 599, 500, 503])

    async def failing_then_ok(request: web.Request) -> web.StreamResponse:
        status = next(statuses, None)
        if status is None:
            return await registered(request)
        return web.json_response({"code": "INTERNAL", "message": "boom"}, status=status)

    control.register = failing_then_ok
    agent = start_agent(control.url)
    wait_until(lambda: running(agent) and len(control.heartbeats) >= 2, timeout=30, what="heartbeats")
    assert len(control.registrations) == 9

    beat_statuses = iter([500, 503, 599, 502])

    async def beats_failing_then_ok(request: web.Request) -> web.StreamResponse:
        status = next(beat_statuses, None)
        if status is None:
            return web.json_response({"next_heartbeat_ms": 100, "drain": False})
        return web.Response(status=status, text="<html>bad gateway</html>")

    control.heartbeat = beats_failing_then_ok
    wait_until(lambda: "back online" in agent.log(), timeout=30, what="heartbeats working again")
    assert running(agent)
    assert len(control.registrations) == 9  # a failing heartbeat backs off; it does not re-register
    log = agent.log()
    assert log.count("unreachable on registration") == 1 and log.count("unreachable on heartbeat") == 1, log


def test_agent_never_exits_when_the_control_plane_name_does_not_resolve(start_agent):
    # .invalid never resolves (RFC 2606); the debug log shows each backed-off try.
    agent = start_agent("http://llorch-control.invalid:9200", log_level="debug")
    wait_until(lambda: running(agent) and agent.log().count("next try in") >= 5, timeout=30, what="5 tries")
    log = agent.log()
    assert log.count("unreachable on registration") == 1 and "cannot connect" in log, log
    assert agent.signal(signal.SIGTERM) == 0


# --- stopping --------------------------------------------------------------------------------------------


def test_sigterm_against_a_hung_control_plane_deregisters_within_its_bound_and_exits_zero(
    control, start_agent
):
    async def hang(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(3600)
        return web.Response(status=204)

    control.deregister = hang
    agent = start_agent(control.url, request_timeout_s=20)
    wait_until(lambda: running(agent) and len(control.heartbeats) >= 2, timeout=20, what="heartbeats")
    started = time.monotonic()
    assert agent.signal(signal.SIGTERM, timeout=20) == 0
    took = time.monotonic() - started
    # The deregistration waits at most 3 s (DEREGISTER_TIMEOUT_S), not the 20 s request timeout.
    assert took < 3 + 3, took
    assert len(control.requests("DELETE", "/gpu-node-1")) == 1
    assert "could not deregister node gpu-node-1: no answer within 3 s" in agent.log()


# --- models ----------------------------------------------------------------------------------------------


def _models_of(beat) -> list[str]:
    return json.loads(beat.body)["pools"][0]["models_available"]


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_model_whose_file_is_damaged_stops_being_reported_at_the_next_heartbeat(control, start_agent, damage):
    agent = start_agent(control.url)
    (agent.models_dir / "a.gguf").write_bytes(b"a" * 100)
    (agent.models_dir / "b.gguf").write_bytes(b"b" * 100)
    agent.write_manifest(
        {
            "org/a": {"path": "a.gguf", "sha256": "0" * 64, "size_bytes": 100},
            "org/b": {"path": "b.gguf", "sha256": "1" * 64, "size_bytes": 100},
        }
    )
    wait_until(
        lambda: control.heartbeats and _models_of(control.heartbeats[-1]) == ["org/a", "org/b"],
        timeout=10,
        what="both models reported",
    )
    if damage == "deleted":
        (agent.models_dir / "b.gguf").unlink()
    else:
        with (agent.models_dir / "b.gguf").open("r+b") as handle:
            handle.truncate(50)
    seen = len(control.heartbeats)
    # The heartbeat in flight may have been built before the damage; the one after it must not list b.
    wait_until(lambda: len(control.heartbeats) >= seen + 2, timeout=10, what="2 more heartbeats")
    assert _models_of(control.heartbeats[seen + 1]) == ["org/a"]
    assert running(agent)


# --- a refusal against no way there: the retry's pace (agent.py RETRY_PACE) ---------------------------


def test_a_refused_connection_is_a_refusal_and_a_silent_one_is_unreachable():
    """A closed port (the daemon restarting: retried at the heartbeat's pace) against a host that takes the
    connection and never answers (as far as the agent can tell, a partition: retried within one interval)."""
    from pool_managerd.control import ControlPlane

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client gives up and closes: no answer ever
        writer.close()

    async def scenario() -> tuple:
        silent = await asyncio.start_server(hold, "127.0.0.1", 0)
        closed = await asyncio.start_server(lambda reader, writer: None, "127.0.0.1", 0)
        silent_port = silent.sockets[0].getsockname()[1]
        closed_port = closed.sockets[0].getsockname()[1]
        closed.close()
        await closed.wait_closed()
        async with silent:
            async with ControlPlane(f"http://127.0.0.1:{closed_port}", TEST_TOKEN, 0.5) as refusing:
                refused = await refusing.request("GET", "/health")
            async with ControlPlane(f"http://127.0.0.1:{silent_port}", TEST_TOKEN, 0.5) as hanging:
                unanswered = await hanging.request("GET", "/health")
        return refused, unanswered

    refused, unanswered = asyncio.run(scenario())
    assert refused.status is None and not refused.unreachable, refused
    assert unanswered.status is None and unanswered.unreachable, unanswered
    assert unanswered.problem == "no answer within 0.5 s"

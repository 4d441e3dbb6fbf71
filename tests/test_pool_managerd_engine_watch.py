"""The watcher's readings of answers the real engine is too fast or too well-behaved to give here: recorded
answers (tests/data/engine/) served by a small aiohttp server in the test, plus a hung and a huge one.

The loading state is one of them: llama-server answers /health with 503 while it loads its model, but the
tiny model loads in 0.1 s, so the 503 is replayed from a recording instead of caught live.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from support import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "files" / "pool_managerd"))

from pool_managerd.engine_config import EngineFile
from pool_managerd.engine_watch import EngineWatch, poll_interval_s

RECORDED = REPO_ROOT / "tests" / "data" / "engine"
THIS_BUILD = RECORDED / "llama-server-b0-unknown"
KEY = "engine-key-" + "k" * 40


def recorded(path: Path, status: int = 200, content_type: str = "application/json"):
    async def answer(request: web.Request) -> web.Response:
        return web.Response(status=status, body=path.read_bytes(), content_type=content_type)

    return answer


def needs_key(handler):
    async def answer(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {KEY}":
            return web.json_response({"error": {"code": 401, "message": "Invalid API Key"}}, status=401)
        return await handler(request)

    return answer


def healthy_engine() -> dict:
    return {
        "/health": recorded(THIS_BUILD / "health-200.json"),
        "/slots": needs_key(recorded(THIS_BUILD / "slots-one-of-two-processing.json")),
        "/metrics": needs_key(recorded(THIS_BUILD / "metrics-one-deferred.txt", content_type="text/plain")),
        "/props": needs_key(recorded(THIS_BUILD / "props.json")),
    }


async def read_engine(routes: dict, polls: int = 1, key: str = KEY, timeout_s: float = 1.0) -> EngineWatch:
    """Serve `routes` on 127.0.0.1 and let an EngineWatch poll them `polls` times."""
    app = web.Application()
    for path, handler in routes.items():
        app.router.add_get(path, handler)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    engine = EngineFile(
        pool_id="p0",
        kind="llama.cpp",
        model_id="llorch-lab/tiny",
        models_dir="/var/lib/llorch/models",
        binary="/opt/llorch-engine/current/llama-server",
        host="127.0.0.1",
        port=port,
        url=f"http://127.0.0.1:{port}",
        parallel=2,
    )
    watch = EngineWatch(engine)
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session:
            for _ in range(polls):
                await watch.poll(session, timeout_s)
    finally:
        await runner.cleanup()
    return watch


@pytest.mark.parametrize(
    "recording",
    [
        RECORDED / "llama-server-2025-source" / "health-503-loading.json",
        RECORDED / "llama-server-2024-readme" / "health-503-loading.json",
    ],
    ids=lambda path: path.parent.name,
)
def test_a_recorded_503_while_the_model_loads_reads_as_loading(recording, caplog):
    caplog.set_level(logging.INFO, logger="pool_managerd.engine_watch")
    watch = asyncio.run(read_engine({"/health": recorded(recording, status=503)}))
    reading = watch.reading()
    assert reading.status.state == "loading"
    assert not reading.serving
    assert (reading.slots_total, reading.slots_free) == (2, 2), "nothing in flight while it loads"
    assert "not read yet -> loading" in caplog.text and "pool not ready yet" in caplog.text


def test_recorded_answers_of_a_healthy_engine_read_as_ready_with_its_counts():
    reading = asyncio.run(read_engine(healthy_engine())).reading()
    assert reading.status.state == "ready"
    assert (reading.slots_total, reading.slots_free) == (2, 1)
    assert reading.status.requests_deferred == 1
    assert reading.status.version == "b0-unknown"


def test_every_slot_processing_reads_as_busy():
    routes = healthy_engine()
    routes["/slots"] = needs_key(recorded(THIS_BUILD / "slots-two-of-two-processing.json"))
    reading = asyncio.run(read_engine(routes)).reading()
    assert (reading.status.state, reading.slots_free, reading.serving) == ("busy", 0, True)


def test_slots_the_agent_cannot_read_with_its_key_report_no_free_slot(caplog):
    caplog.set_level(logging.INFO, logger="pool_managerd.engine_watch")
    watch = asyncio.run(read_engine(healthy_engine(), key="wrong-" + KEY))
    reading = watch.reading()
    assert (reading.status.state, reading.slots_free) == ("busy", 0)
    assert "HTTP 401: the engine refuses the agent's key" in caplog.text
    assert KEY not in caplog.text


def test_a_hung_engine_reads_as_dead_after_the_timeout():
    async def hang(request: web.Request) -> web.Response:
        await asyncio.sleep(30)
        return web.Response()

    watch = asyncio.run(read_engine({"/health": hang}, timeout_s=0.3))
    assert watch.reading().status.state == "dead"
    assert "no answer within the timeout" in watch.cause


def test_a_huge_slots_answer_is_not_read_past_its_bound():
    async def huge(request: web.Request) -> web.Response:
        return web.Response(body=b"[" + b" " * (8 * 1024 * 1024) + b"]", content_type="application/json")

    routes = healthy_engine()
    routes["/slots"] = huge
    watch = asyncio.run(read_engine(routes))
    assert (watch.reading().status.state, watch.reading().slots_free) == ("busy", 0)
    assert "an answer over" in watch.cause


def test_a_health_answer_other_than_200_or_503_is_dead():
    async def broken(request: web.Request) -> web.Response:
        return web.Response(status=500)

    watch = asyncio.run(read_engine({"/health": broken}))
    assert (watch.reading().status.state, watch.cause) == ("dead", "/health answers HTTP 500")


def test_repeated_polls_of_an_unchanged_engine_log_one_line(caplog):
    caplog.set_level(logging.INFO, logger="pool_managerd.engine_watch")
    asyncio.run(read_engine(healthy_engine(), polls=5))
    assert len([r for r in caplog.records if "engine of pool p0" in r.getMessage()]) == 1


def test_the_watch_interval_is_never_above_half_the_heartbeat():
    assert poll_interval_s(1.0, None) == 1.0
    assert poll_interval_s(1.0, 5.0) == 1.0
    assert poll_interval_s(1.0, 0.5) == 0.25

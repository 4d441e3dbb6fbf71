"""Chaos, the make-test subset: a network partition between the real agent and the real daemon.

The agent reaches orchestratord through a relay the test cuts. A cut relay behaves as a partition does, not
as a crash: nothing is refused or reset, bytes simply stop moving both ways (new connections are accepted
and left waiting) until it heals, when whatever was held goes through. What must hold: the node goes
offline after node_timeout_ms (within one heartbeat), leaves placement, and once healed is online again
within one heartbeat, with nothing restarted: the same agent and daemon processes, the same registration.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import pytest
from support import wait_until
from support_agent import make_agent
from support_engine import (
    BUILD_TIMEOUT_S,
    TINY_MODEL_ID,
    engine_archive,
    engine_settings,
    engine_unit,
    make_tiny_model,
    stage_model,
    unpack_engine,
)

# The engine archive is built once per machine (minutes); `make unit` builds it first.
pytestmark = pytest.mark.timeout(BUILD_TIMEOUT_S)

HEARTBEAT_MS = 500
NODE_TIMEOUT_MS = 2000
BEAT_S = HEARTBEAT_MS / 1000
NODE = "gpu-node-1"


class Relay:
    """A TCP relay on 127.0.0.1 to `upstream_port` that the test can cut and heal, in its own thread."""

    def __init__(self, upstream_port: int):
        self._upstream_port = upstream_port
        self._loop = asyncio.new_event_loop()
        self._open = asyncio.Event()  # set: bytes flow; clear: the partition holds them
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="relay", daemon=True)
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._open.set()
        server = self._loop.run_until_complete(asyncio.start_server(self._relay, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        server.close()
        pending = asyncio.all_tasks(self._loop)
        for task in pending:
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self._loop.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._open.wait()  # a connection opened during the cut waits, as a SYN would be retried
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self._upstream_port)
        except OSError:
            writer.close()
            return

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while chunk := await source.read(65536):
                    await self._open.wait()  # held, not dropped: TCP would retransmit it after the heal
                    sink.write(chunk)
                    await sink.drain()
            except OSError:
                pass
            finally:
                with contextlib.suppress(OSError):
                    sink.close()

        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))

    def cut(self) -> None:
        self._loop.call_soon_threadsafe(self._open.clear)

    def heal(self) -> None:
        self._loop.call_soon_threadsafe(self._open.set)

    def __enter__(self) -> Relay:
        self._thread.start()
        assert self._ready.wait(10), "the relay did not start"
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def node(daemon) -> dict:
    answer = daemon.api("GET", f"/v2/nodes/{NODE}")
    assert answer.status == 200, answer.text
    return answer.body


def placed_on(daemon) -> str | None:
    answer = daemon.api("POST", "/v2/placement", {"model_id": TINY_MODEL_ID})
    return answer.body["node_id"] if answer.status == 200 else None


def test_partitioned_node_goes_offline_on_time_leaves_placement_and_heals_within_a_heartbeat(
    daemon_factory, tmp_path
):
    daemon = daemon_factory(heartbeat_interval_ms=HEARTBEAT_MS, node_timeout_ms=NODE_TIMEOUT_MS)
    # A real llama-server serving the tiny model, so that placement has an engine to choose.
    binary = unpack_engine(engine_archive(), tmp_path / "built")
    models_dir = tmp_path / "node" / "models"
    stage_model(models_dir, TINY_MODEL_ID, make_tiny_model(tmp_path / "built" / "tiny.gguf"))
    unit = engine_unit(tmp_path / "node" / "engine", engine_settings("p0", binary, models_dir))
    with Relay(daemon.config["listen_port"]) as relay:
        # Retries never wait longer than a heartbeat, so a healed partition is seen within one.
        agent = make_agent(
            tmp_path / "node",
            daemon,
            control_url=relay.url,
            backoff_initial_s=0.1,
            backoff_max_s=BEAT_S,
            pools=[{"pool_id": "p0", "gpus": [0], "engine_file": str(unit.engine_file)}],
            engine_api_key_file=str(unit.credentials_dir / "engine-api-key"),
        )
        unit.start()
        agent.start()
        try:
            wait_until(
                lambda: placed_on(daemon) == NODE, timeout=30, what="the node online, its engine placed"
            )
            registered_at = node(daemon)["registered_at"]

            relay.cut()
            cut_at = time.monotonic()
            wait_until(lambda: node(daemon)["status"] == "offline", timeout=10, interval=0.02, what="offline")
            offline_after = time.monotonic() - cut_at
            placement_meanwhile = daemon.api("POST", "/v2/placement", {"model_id": TINY_MODEL_ID})

            relay.heal()
            healed_at = time.monotonic()
            wait_until(lambda: node(daemon)["status"] == "online", timeout=10, interval=0.02, what="online")
            online_after = time.monotonic() - healed_at
            placed_after = placed_on(daemon)
            after = node(daemon)
            agent_alive = agent.running()
        finally:
            agent.stop()
            unit.stop()
    print(
        f"\npartition: offline {offline_after:.2f} s after the cut (node_timeout_ms {NODE_TIMEOUT_MS}, "
        f"heartbeat {HEARTBEAT_MS} ms); online {online_after:.2f} s after the heal"
    )
    timeout_s = NODE_TIMEOUT_MS / 1000
    assert timeout_s - BEAT_S <= offline_after <= timeout_s + BEAT_S
    assert placement_meanwhile.status == 503, placement_meanwhile.text
    assert online_after <= BEAT_S + 0.1  # one heartbeat, and a poll of the test's
    assert placed_after == NODE
    # Nothing restarted: the same processes, and the node kept its registration (no re-register).
    assert daemon.proc.poll() is None and agent_alive
    assert after["registered_at"] == registered_at
    assert "registered again" not in agent.log()

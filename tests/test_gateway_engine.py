"""The gateway in front of the real llama-server (launched as a node launches it, by engine_exec, with its
API key): the same tokens as straight from the engine, a client that leaves stops the engine's work, and
the node's engine key read from engine_keys_dir, again after the engine refuses it (a rotated key).
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from support import Daemon, wait_until
from support_engine import (
    BUILD_TIMEOUT_S,
    ENGINE_API_KEY,
    TINY_MODEL_ID,
    EngineUnit,
    engine_archive,
    engine_settings,
    engine_unit,
    make_tiny_model,
    stage_model,
    unpack_engine,
    write_key_file,
)
from support_gateway import CLIENT_KEY, client_call, gateway_daemon, metric, raw_post, serve_pool

# The first test may build llama-server (minutes, once per machine) before it starts its clock.
pytestmark = pytest.mark.timeout(BUILD_TIMEOUT_S)

NODE = "gpu-1"
# Far more than a test waits for: at a few thousand tokens a second this runs for a minute or more
# (--context-shift lets it go past the context), so an idle slot within seconds is the cancel's doing.
ENDLESS = 200_000
CANCEL_DEADLINE_S = 10


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Iterator[EngineUnit]:
    """One pool's llama-server with 2 slots, as llorch-engine@p0.service runs it."""
    workdir = tmp_path_factory.mktemp("engine")
    binary = unpack_engine(engine_archive(), workdir)
    model = make_tiny_model(workdir / "tiny.gguf")
    models_dir = workdir / "models"
    stage_model(models_dir, TINY_MODEL_ID, model)
    unit = engine_unit(workdir / "unit", engine_settings("p0", binary, models_dir, parallel=2)).start()
    yield unit
    unit.stop()


def key_folder(path: Path, key: str = ENGINE_API_KEY) -> Path:
    """engine_keys_dir holding the node's key file, named by its node id, 0600."""
    path.mkdir()
    write_key_file(path / NODE, key)
    return path


@pytest.fixture
def gateway(tmp_path, engine) -> Iterator:
    """A daemon whose node NODE has one pool served by `engine`; `slots` is what its heartbeat says."""
    started: list[Daemon] = []

    def start(keys_dir: Path | None = None, slots: int = 2) -> Daemon:
        keys_dir = keys_dir or key_folder(tmp_path / "engine-keys")
        daemon = gateway_daemon(
            tmp_path / f"d{len(started)}",
            engine_keys_dir=str(keys_dir),
            # A busy 2-core machine: long enough never to end a request these tests end themselves.
            gateway_first_byte_timeout_ms=60_000,
            gateway_idle_timeout_ms=30_000,
        ).start()
        started.append(daemon)
        serve_pool(daemon, NODE, engine.url, model=TINY_MODEL_ID, slots=slots)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


def request_body(path: str, stream: bool, **extra) -> bytes:
    """A few greedy tokens; ignore_eos, as random weights may end the answer at any step."""
    body = {"model": TINY_MODEL_ID, "max_tokens": 8, "temperature": 0, "seed": 42, "ignore_eos": True}
    if path == "/v1/chat/completions":
        body["messages"] = [{"role": "user", "content": "Say hello."}]
    else:
        body["prompt"] = "Once upon a time"
    return json.dumps({**body, "stream": stream, **extra}).encode()


def answer_text(payload: bytes, stream: bool) -> tuple[str, list]:
    """The generated text and the finish reasons of an answer, streamed or not; ids and times left out."""
    chunks = []
    if stream:
        for line in payload.decode().splitlines():
            data = line.removeprefix("data:").strip()
            if line.startswith("data:") and data != "[DONE]":
                chunks.append(json.loads(data))
    else:
        chunks.append(json.loads(payload))
    text, reasons = "", []
    for chunk in chunks:
        for choice in chunk["choices"]:
            part = choice.get("delta") or choice.get("message") or {}
            text += choice.get("text") or part.get("content") or ""
            if choice.get("finish_reason"):
                reasons.append(choice["finish_reason"])
    return text, reasons


def slots_processing(engine: EngineUnit) -> int:
    answer = engine.api("GET", "/slots")
    assert answer.status == 200, answer.text
    return sum(1 for slot in answer.body if slot["is_processing"])


def deferred(engine: EngineUnit) -> float:
    """Requests the engine holds because every slot is busy (its own /metrics)."""
    text = engine.api("GET", "/metrics").text
    for line in text.splitlines():
        if line.startswith("llamacpp:requests_deferred"):
            return float(line.split()[-1])
    raise AssertionError("llamacpp:requests_deferred is not on the engine's /metrics")


def open_stream(daemon: Daemon, body: bytes) -> socket.socket:
    """A streamed request to the daemon on a raw socket, left open: closing it is the client leaving."""
    sock = socket.create_connection(("127.0.0.1", daemon.config["listen_port"]), timeout=30)
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {CLIENT_KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    return sock


def read_first_token(sock: socket.socket) -> bytes:
    """Read until the first data event: the gateway committed, tokens are flowing."""
    seen = b""
    while b"\ndata: " not in seen and not seen.startswith(b"data: "):
        chunk = sock.recv(65536)
        assert chunk, f"the daemon closed the stream: {seen[:300]!r}"
        seen += chunk
    assert seen.startswith(b"HTTP/1.1 200"), seen[:300]
    return seen


def endless_body() -> bytes:
    return json.dumps(
        {
            "model": TINY_MODEL_ID,
            "prompt": "Once upon a time",
            "max_tokens": ENDLESS,
            "ignore_eos": True,
            "stream": True,
        }
    ).encode()


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_the_daemon_answers_the_tokens_the_engine_answers(gateway, engine, path):
    daemon = gateway()
    models = client_call(daemon, "/v1/models", method="GET")
    assert models.status == 200, models.text
    assert [entry["id"] for entry in models.body["data"]] == [TINY_MODEL_ID]
    for stream in (False, True):
        body = request_body(path, stream)
        status, headers, direct = raw_post(engine.url, path, body, ENGINE_API_KEY)
        assert status == 200, direct
        status, through_headers, through = raw_post(daemon.url, path, body, CLIENT_KEY)
        assert status == 200, through
        assert through_headers["Content-Type"] == headers["Content-Type"]
        text, reasons = answer_text(direct, stream)
        assert text and reasons == ["length"], direct
        assert answer_text(through, stream) == (text, reasons)
        if stream:
            assert through.rstrip().endswith(b"data: [DONE]")


def test_a_client_that_leaves_a_stream_stops_the_engines_work(gateway, engine):
    daemon = gateway()
    wait_until(lambda: slots_processing(engine) == 0, timeout=30, what="an idle engine to start from")
    sock = open_stream(daemon, endless_body())
    try:
        read_first_token(sock)
        assert slots_processing(engine) == 1, "the generation is not running: nothing would be tested"
    finally:
        sock.close()
    left_at = time.monotonic()
    wait_until(
        lambda: slots_processing(engine) == 0,
        timeout=CANCEL_DEADLINE_S,
        interval=0.05,
        what="the engine's slot idle after the client left",
    )
    print(f"client left -> engine slot idle: {time.monotonic() - left_at:.2f} s")
    metrics = daemon.api("GET", "/metrics").text
    assert f'orchestratord_gateway_in_flight{{pool="{NODE}/pool-0"}} 0.0' in metrics


def test_a_client_that_leaves_while_the_engine_holds_its_request_is_never_served(gateway, engine):
    """The daemon believes in 3 slots, the engine has 2: the third request waits at the engine, before
    the gateway's commit point. Its client leaves: the daemon lets go of it at once (its connection to
    the engine closed); when the two running ones end too, nothing may go on generating.

    llama-server notices the closed connection of a request it holds only once its results go quiet for a
    second (server_response::recv_with_timeout restarts its 1 s wait on every other slot's token), or when
    the request gets a slot and its first token cannot be written: so the engine's own end is checked
    after the running streams end, not before."""
    daemon = gateway(slots=3)
    wait_until(lambda: slots_processing(engine) == 0, timeout=30, what="an idle engine to start from")
    running = [open_stream(daemon, endless_body()) for _ in range(2)]
    waiting = None
    try:
        for sock in running:
            read_first_token(sock)
        waiting = open_stream(daemon, endless_body())
        wait_until(lambda: deferred(engine) >= 1, timeout=10, what="the engine holding the third request")
        waiting.setblocking(False)
        with pytest.raises(BlockingIOError):  # before the commit point the client is sent nothing
            waiting.recv(1)
        waiting.close()
        wait_until(
            lambda: in_flight_and_cancelled(daemon) == (2, 1),
            timeout=CANCEL_DEADLINE_S,
            what="the daemon letting go of the request whose client left",
        )
    finally:
        for sock in [*running, *([waiting] if waiting else [])]:
            sock.close()
    left_at = time.monotonic()
    wait_until(
        lambda: slots_processing(engine) == 0 and deferred(engine) == 0,
        timeout=CANCEL_DEADLINE_S,
        what="every slot idle and nothing held: the left request was not served",
    )
    print(f"every client left -> engine idle, nothing held: {time.monotonic() - left_at:.2f} s")
    assert in_flight_and_cancelled(daemon) == (0, 3)


def in_flight_and_cancelled(daemon: Daemon) -> tuple[float, float]:
    """The daemon's requests in flight on the pool, and its requests ended by their client leaving."""
    values = {}
    for line in daemon.api("GET", "/metrics").text.splitlines():
        if line.startswith(f'orchestratord_gateway_in_flight{{pool="{NODE}/pool-0"}}'):
            values["in_flight"] = float(line.split()[-1])
        elif line.startswith("orchestratord_gateway_requests_total{") and 'outcome="cancelled"' in line:
            values["cancelled"] = float(line.split()[-1])
    return values.get("in_flight", 0.0), values.get("cancelled", 0.0)


def test_a_wrong_engine_key_is_a_502_and_the_rotated_key_is_read_without_a_restart(gateway, engine, tmp_path):
    keys_dir = key_folder(tmp_path / "wrong-keys", key="not-the-engine-key-" + "w" * 30)
    daemon = gateway(keys_dir=keys_dir)
    body = request_body("/v1/completions", False)
    status, _headers, payload = raw_post(daemon.url, "/v1/completions", body, CLIENT_KEY)
    assert status == 502, payload  # the engine's 401 is the daemon's problem, never the client's
    assert json.loads(payload)["error"]["code"] == "engine_unavailable"
    errors = daemon.api("GET", "/v2/placement/errors").body["errors"]
    assert [error["code"] for error in errors] == ["engine_unavailable", "engine_unauthorized"]
    assert "not-the-engine-key" not in json.dumps(errors) and "not-the-engine-key" not in daemon.log()

    # The key rotated on the control host (a new 0600 file put in place): read at the engine's next 401.
    fresh = write_key_file(keys_dir / f".{NODE}.new")
    os.replace(fresh, keys_dir / NODE)
    pid = daemon.proc.pid
    status, _headers, payload = raw_post(daemon.url, "/v1/completions", body, CLIENT_KEY)
    assert status == 200, payload
    assert answer_text(payload, False)[0]
    assert daemon.proc.pid == pid and daemon.proc.poll() is None


def test_streams_back_to_back_all_answer_though_the_engine_closes_their_connections(gateway):
    """llama-server closes its connection after every streamed answer, while answering Keep-Alive. A
    request that waited in the daemon's queue goes out the moment a stream ends, often on that very
    connection before its close arrived: it fails unsent and must go once more on a new connection, to
    the same engine, without a retry elsewhere, an error recorded, or the pool counted as failing."""
    daemon = gateway()
    body = request_body("/v1/completions", True)

    def client() -> list[int]:
        return [raw_post(daemon.url, "/v1/completions", body, CLIENT_KEY)[0] for _ in range(5)]

    with ThreadPoolExecutor(max_workers=4) as pool:  # twice the engine's slots: two wait each time
        statuses = [status for answers in pool.map(lambda _n: client(), range(4)) for status in answers]
    assert statuses == [200] * 20
    assert metric(daemon, "orchestratord_gateway_retries_total") == 0
    assert daemon.api("GET", "/v2/placement/errors").body["errors"] == []

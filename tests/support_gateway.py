"""Helpers for the gateway tests: a real daemon with client keys, and a scripted upstream.

The upstream is a real aiohttp server on 127.0.0.1 (its own thread and event loop) that answers the way
llama-server's OpenAI routes do — a role-only first chunk, one chunk per token, a finish chunk, `[DONE]` —
and can be told to refuse, answer 500, stall before its first token, hold every request until released,
or die in the middle of a stream. Every request it took is recorded, and every one whose client went
away before its answer ended.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import threading
from dataclasses import dataclass, field
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

from aiohttp import web
from support import Daemon, Response, free_port, http, make_daemon, sample_registration
from support_daemon import beat_pools, pool_reading

CLIENT_KEY = "client-key-alice-" + "a" * 32
OTHER_CLIENT_KEY = "client-key-bob-" + "b" * 32
MODEL = "tiny-model"


def write_client_keys(path: Path, keys: dict[str, str]) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write("# name key\n")
        for name, key in keys.items():
            handle.write(f"{name} {key}\n")
    return path


def gateway_daemon(workdir: Path, **overrides: Any) -> Daemon:
    """A daemon (not started) with two client keys (alice, bob) and timeouts short enough for tests."""
    workdir.mkdir(parents=True, exist_ok=True)
    keys = write_client_keys(workdir / "client-keys", {"alice": CLIENT_KEY, "bob": OTHER_CLIENT_KEY})
    settings = {
        "client_keys_file": str(keys),
        "node_timeout_ms": 60_000,  # nodes stay live through a test without heartbeats
        "gateway_connect_timeout_ms": 1000,
        "gateway_first_byte_timeout_ms": 3000,
        "gateway_idle_timeout_ms": 2000,
        "gateway_queue_timeout_ms": 3000,
        # Exactly the engine's slots, unless a test says otherwise: counts stay easy to reason about.
        "gateway_engine_backlog": 0,
    }
    settings.update(overrides)
    return make_daemon(workdir, **settings)


def serve_pool(daemon: Daemon, node_id: str, url: str, model: str = MODEL, slots: int = 4, **reading) -> None:
    """Register `node_id` with one pool whose engine at `url` serves `model` with `slots` slots."""
    registration = sample_registration(node_id)
    registration["pools"][0]["slots_total"] = slots
    answer = daemon.api("POST", "/v2/nodes/register", registration)
    assert answer.status == 200, answer.text
    beat_pool(daemon, node_id, url, model, slots, **reading)


def beat_pool(daemon: Daemon, node_id: str, url: str, model: str = MODEL, slots: int = 4, **reading) -> None:
    """One heartbeat of a node `serve_pool` registered: its pool's engine at `url` serves `model`."""
    engine = {"kind": "llama.cpp", "state": "ready", "model_id": model, "url": url}
    pool = pool_reading("pool-0", [model], slots_total=slots, slots_free=slots, engine=engine, **reading)
    beat_pools(daemon, node_id, [pool])


def chat_body(stream: bool, model: str = MODEL, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream, **extra}


def client_call(
    daemon: Daemon, path: str, body: Any = None, key: str | None = CLIENT_KEY, method: str = "POST", **kw
) -> Response:
    return http(method, daemon.url + path, body=body, token=key, **kw)


def raw_post(
    url: str, path: str, body: bytes, key: str | None, timeout: float = 15
) -> tuple[int, dict, bytes]:
    """POST and read the whole answer as bytes (chunked framing undone, nothing else)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    connection = HTTPConnection(host, int(port), timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"}
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        connection.request("POST", path, body=body, headers=headers)
        answer = connection.getresponse()
        return answer.status, dict(answer.headers), answer.read()
    finally:
        connection.close()


# --- the scripted upstream -----------------------------------------------------------------------------


def sse_answer(tokens: list[str], model: str = MODEL) -> list[bytes]:
    """The events llama-server streams for a chat completion: role chunk, token chunks, finish, [DONE]."""

    def chunk(delta: dict, finish: str | None = None) -> bytes:
        body = {
            "choices": [{"finish_reason": finish, "index": 0, "delta": delta}],
            "created": 1,
            "id": "chatcmpl-test",
            "model": model,
            "object": "chat.completion.chunk",
        }
        return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"

    events = [chunk({"role": "assistant", "content": None})]
    events += [chunk({"content": token}) for token in tokens]
    events.append(chunk({}, "stop"))
    events.append(b"data: [DONE]\n\n")
    return events


@dataclass
class Upstream:
    """A scripted engine. `mode`: ok, refuse (stops listening), error500, stall, die_after (dies after
    `die_after` events), hold (every request waits for `release()`), preamble_stall (streams the role-only
    first chunk, then stalls before any token), cut_plain and cut_plain_chunked (a plain answer that dies
    halfway through its body, sent with a Content-Length or chunked), drop_reused (a kept-alive connection
    that already carried an answer is closed, unanswered, when the next request arrives on it: what a
    request sent as llama-server closes its idle connection meets)."""

    tokens: list[str] = field(default_factory=lambda: [f"tok{n} " for n in range(20)])
    mode: str = "ok"
    die_after: int = 3
    event_gap_s: float = 0.0
    port: int = field(default_factory=free_port)
    requests: list[dict[str, Any]] = field(default_factory=list)
    client_gone: int = 0
    finished: int = 0
    dropped: int = 0  # requests closed unanswered on a reused connection (drop_reused)

    def __post_init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self._held = asyncio.Event()
        self._answered_on: set = set()  # connections that carried an answer (kept: tests are short)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Upstream:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def _call(self, coroutine, timeout: float = 10):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    async def _start(self) -> None:
        self._held = asyncio.Event()
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._answer)
        app.router.add_post("/v1/completions", self._answer)
        self._runner = web.AppRunner(app, handler_cancellation=True)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    def stop(self) -> None:
        if self._runner is not None:
            self._call(self._runner.cleanup())
            self._runner = None

    def close(self) -> None:
        self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def release(self) -> None:
        self._loop.call_soon_threadsafe(self._held.set)

    def expected(self) -> list[bytes]:
        return sse_answer(self.tokens)

    def plain_answer(self) -> bytes:
        body = {
            "choices": [
                {
                    "finish_reason": "stop",
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(self.tokens)},
                }
            ],
            "model": MODEL,
            "object": "chat.completion",
        }
        return json.dumps(body).encode()

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if self.mode == "drop_reused" and request.protocol in self._answered_on:
            self.dropped += 1
            assert request.transport is not None
            request.transport.close()  # a FIN, no status line: the request was not taken
            return web.Response()  # never sent: the transport is closed
        self.requests.append({"headers": dict(request.headers), "body": body})
        try:
            return await self._script(request, body)
        except asyncio.CancelledError:
            self.client_gone += 1
            raise
        finally:
            self._answered_on.add(request.protocol)

    async def _script(self, request: web.Request, body: bytes) -> web.StreamResponse:
        if self.mode == "error500":
            return web.json_response({"error": {"code": 500, "message": "boom"}}, status=500)
        if self.mode == "stall":
            await asyncio.sleep(3600)
        if self.mode == "hold":
            await self._held.wait()
        if self.mode in ("cut_plain", "cut_plain_chunked"):
            return await self._cut_plain(request)
        if json.loads(body).get("stream"):
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for number, event in enumerate(self.expected()):
                if self.mode == "die_after" and number == self.die_after:
                    assert request.transport is not None
                    request.transport.abort()
                    return response
                await response.write(event)
                if self.mode == "preamble_stall":
                    await asyncio.sleep(3600)
                if self.event_gap_s:
                    await asyncio.sleep(self.event_gap_s)
            await response.write_eof()
            self.finished += 1
            return response
        self.finished += 1
        return web.Response(body=self.plain_answer(), content_type="application/json")

    async def _cut_plain(self, request: web.Request) -> web.StreamResponse:
        """Half of the plain answer, flushed, then the connection dies."""
        payload = self.plain_answer()
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        if self.mode == "cut_plain":
            response.content_length = len(payload)
        await response.prepare(request)
        await response.write(payload[: len(payload) // 2])
        assert request.transport is not None
        request.transport.abort()
        return response


def metric(daemon: Daemon, name: str) -> float:
    """One unlabelled sample of the daemon's /metrics."""
    text = daemon.api("GET", "/metrics").text
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert found, f"{name} is not on /metrics"
    return float(found.group(1))


def placement_errors(daemon: Daemon) -> list[dict]:
    """The daemon's recent placement errors, newest first."""
    answer = daemon.api("GET", "/v2/placement/errors")
    assert answer.status == 200, answer.text
    return answer.body["errors"]

"""The gateway when a node goes offline under its requests, and right after a restart (issue 17's findings).

A partitioned node holds bytes rather than resetting them, so nothing on the engine's connection ever
fails: the scripted engines here hold their answers the same way (open, silent) and the test stops the
node's heartbeats. The registry's sweep finds the node offline and the gateway ends its requests in flight
at once: before the commit point they go to another pool, after it a stream ends with the
`engine_stream_broken` event and a plain answer is cut off. The timeouts are set far above the node
timeout, so only the node's going offline can end these requests on time.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from http.client import HTTPConnection, IncompleteRead

import pytest
from aiohttp import web
from support import wait_until
from support_gateway import (
    CLIENT_KEY,
    MODEL,
    Upstream,
    beat_pool,
    chat_body,
    client_call,
    raw_post,
    serve_pool,
)

NODE_TIMEOUT_MS = 1000
SLOW_TIMEOUTS = {  # far longer than the node timeout: these must not be what ends a request
    "node_timeout_ms": NODE_TIMEOUT_MS,
    "gateway_first_byte_timeout_ms": 60_000,
    "gateway_idle_timeout_ms": 60_000,
}
# The node's silence to offline is node_timeout_ms; the sweep runs every quarter of it (at most 1 s).
# What is left covers a slow test machine, and stays far below the 60 s timeouts above.
ENDED_WITHIN_S = NODE_TIMEOUT_MS / 1000 + 4.0
BROKEN_EVENT = re.compile(rb'data: \{"error":\{[^\n]*"code":"engine_stream_broken"\}\}\n\n$')


class HeldAfter(Upstream):
    """An engine that sends the start of its answer, then holds the rest, its connection open: what a
    partition does to an answer in flight. Streams: the role chunk and `sent_tokens` tokens (past the
    commit point); plain answers: the status line and half the body (Content-Length set)."""

    sent_tokens: int = 2

    async def _script(self, request: web.Request, body: bytes) -> web.StreamResponse:
        if json.loads(body).get("stream"):
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for event in self.expected()[: 1 + self.sent_tokens]:
                await response.write(event)
        else:
            payload = self.plain_answer()
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            response.content_length = len(payload)
            await response.prepare(request)
            await response.write(payload[: len(payload) // 2])
        await asyncio.sleep(3600)
        return response


class Beating:
    """Heartbeats of one node from a thread, so it stays live while another falls silent."""

    def __init__(self, daemon, node_id: str, url: str, slots: int) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(daemon, node_id, url, slots), name=f"beats-{node_id}", daemon=True
        )

    def _run(self, daemon, node_id: str, url: str, slots: int) -> None:
        while not self._stop.wait(0.1):
            beat_pool(daemon, node_id, url, slots=slots)

    def __enter__(self) -> Beating:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(10)


class Call(threading.Thread):
    """One client request in a thread, its answer and its time kept."""

    def __init__(self, daemon, stream: bool) -> None:
        super().__init__(daemon=True)
        self.url, self.body = daemon.url, json.dumps(chat_body(stream)).encode()
        self.answer: tuple[int, dict, bytes] | BaseException | None = None
        self.seconds = 0.0

    def run(self) -> None:
        started = time.monotonic()
        try:
            self.answer = raw_post(self.url, "/v1/chat/completions", self.body, CLIENT_KEY, timeout=90)
        except BaseException as exc:  # kept for the test to assert on
            self.answer = exc
        self.seconds = time.monotonic() - started

    def result(self) -> tuple[int, dict, bytes]:
        self.join(90)
        assert not self.is_alive(), "the request never ended"
        assert isinstance(self.answer, tuple), repr(self.answer)
        return self.answer


@pytest.fixture
def held_after():
    """A started HeldAfter engine, closed after the test."""
    upstream = HeldAfter().start()
    yield upstream
    upstream.close()


def metric_values(daemon, name: str) -> dict[str, float]:
    text = daemon.api("GET", "/metrics").text
    return {labels: float(value) for labels, value in re.findall(rf"^{name}(\S*) (\S+)$", text, re.MULTILINE)}


def node_lost(daemon, phase: str) -> float:
    return metric_values(daemon, "orchestratord_gateway_node_lost_total").get(f'{{phase="{phase}"}}', 0.0)


@pytest.mark.parametrize("stream", [True, False])
def test_a_request_held_by_a_node_that_goes_offline_is_retried_elsewhere_before_the_commit_point(
    gateway, upstreams, stream
):
    held = upstreams(mode="hold")  # takes the request, sends nothing
    good = upstreams()
    daemon = gateway(**SLOW_TIMEOUTS)
    serve_pool(daemon, "gpu-1", held.url, slots=8)  # most free places: the first pick
    serve_pool(daemon, "gpu-2", good.url, slots=1)
    with Beating(daemon, "gpu-2", good.url, slots=1):
        call = Call(daemon, stream)
        call.start()
        wait_until(lambda: len(held.requests) == 1, what="the request held at gpu-1")
        status, _headers, payload = call.result()  # gpu-1 beats no more: it goes offline
    # The client saw nothing of the lost node: the other pool's whole answer.
    assert status == 200, payload
    assert payload == (b"".join(good.expected()) if stream else good.plain_answer())
    print(f"\nnode lost before the commit point ({'stream' if stream else 'plain'}): {call.seconds:.2f} s")
    assert call.seconds < ENDED_WITHIN_S
    assert node_lost(daemon, "before_commit") == 1.0
    assert node_lost(daemon, "after_commit") == 0.0
    metrics = daemon.api("GET", "/metrics").text
    assert "orchestratord_gateway_retries_total 1.0" in metrics
    # Its slot was given back (a pool with nothing in flight that left the table is not listed).
    in_flight = metric_values(daemon, "orchestratord_gateway_in_flight")
    assert in_flight.get('{pool="gpu-1/pool-0"}', 0.0) == 0.0 and in_flight['{pool="gpu-2/pool-0"}'] == 0.0
    # The engine request on the lost node was ended, not left open on the engine.
    wait_until(lambda: held.client_gone == 1, what="the held engine request closed")
    codes = [error["code"] for error in daemon.api("GET", "/v2/placement/errors").body["errors"]]
    assert codes == ["node_lost"]


def test_a_stream_past_the_commit_point_ends_with_the_broken_event_when_its_node_goes_offline(
    gateway, held_after
):
    held = held_after
    daemon = gateway(**SLOW_TIMEOUTS)
    serve_pool(daemon, "gpu-1", held.url)
    call = Call(daemon, stream=True)
    call.start()
    status, headers, payload = call.result()
    assert status == 200 and headers["Content-Type"] == "text/event-stream"
    sent = b"".join(held.expected()[: 1 + held.sent_tokens])
    assert payload.startswith(sent)
    assert BROKEN_EVENT.fullmatch(payload[len(sent) :]), payload[len(sent) :]
    print(f"\nnode lost after the commit point (stream): {call.seconds:.2f} s")
    assert call.seconds < ENDED_WITHIN_S
    assert node_lost(daemon, "after_commit") == 1.0
    assert node_lost(daemon, "before_commit") == 0.0
    wait_until(lambda: held.client_gone == 1, what="the held engine request closed")
    outcomes = metric_values(daemon, "orchestratord_gateway_requests_total")
    assert outcomes[f'{{model="{MODEL}",outcome="stream_broken"}}'] == 1.0


def test_a_plain_answer_past_the_commit_point_is_cut_off_when_its_node_goes_offline(gateway, held_after):
    held = held_after
    daemon = gateway(**SLOW_TIMEOUTS)
    serve_pool(daemon, "gpu-1", held.url)
    host, port = daemon.url.removeprefix("http://").rsplit(":", 1)
    connection = HTTPConnection(host, int(port), timeout=90)
    started = time.monotonic()
    try:
        body = json.dumps(chat_body(False)).encode()
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {CLIENT_KEY}"}
        connection.request("POST", "/v1/chat/completions", body=body, headers=headers)
        answer = connection.getresponse()
        assert answer.status == 200
        # Begun (200, its Content-Length) and cut off: never a complete-looking answer.
        assert int(answer.headers["Content-Length"]) == len(held.plain_answer())
        with pytest.raises(IncompleteRead) as cut:
            answer.read()
    finally:
        connection.close()
    seconds = time.monotonic() - started
    assert cut.value.partial == held.plain_answer()[: len(held.plain_answer()) // 2]
    print(f"\nnode lost after the commit point (plain): {seconds:.2f} s")
    assert seconds < ENDED_WITHIN_S
    assert node_lost(daemon, "after_commit") == 1.0


# --- right after a restart


def test_after_a_restart_a_served_model_is_503_warming_up_until_its_restored_node_reports(gateway, upstreams):
    upstream = upstreams()
    daemon = gateway(node_timeout_ms=NODE_TIMEOUT_MS, heartbeat_interval_ms=1500)
    serve_pool(daemon, "gpu-1", upstream.url)
    daemon.stop()  # a clean stop writes the node's last readings to the store
    silent_from = time.monotonic()
    # Down longer than the node timeout: the node comes back from the store offline, not yet heard from.
    wait_until(lambda: time.monotonic() - silent_from > 1.5 * NODE_TIMEOUT_MS / 1000, what="a long stop")
    daemon.start()
    assert daemon.api("GET", "/v2/nodes/gpu-1").body["status"] == "offline"

    answer = client_call(daemon, "/v1/chat/completions", chat_body(False))
    assert answer.status == 503, answer.text
    assert answer.body["error"]["code"] == "warming_up"
    assert answer.headers["Retry-After"] == "2"  # the heartbeat interval, whole seconds, rounded up
    # A model nothing held: 503 only within node_timeout_ms of the start, then the usual 404.
    unknown = wait_until(
        lambda: (
            (
                found := client_call(daemon, "/v1/chat/completions", chat_body(False, model="never-held"))
            ).status
            == 404
            and found
        ),
        timeout=10,
        what="404 for a model nothing held, once node_timeout_ms has passed",
    )
    assert unknown.body["error"]["code"] == "model_not_found"
    # The model its silent restored node served stays 503 past that window...
    answer = client_call(daemon, "/v1/chat/completions", chat_body(False))
    assert (answer.status, answer.body["error"]["code"]) == (503, "warming_up"), answer.text
    # ...until the node reports: here it no longer serves it, so the model is unknown now.
    beat_pool(daemon, "gpu-1", upstream.url, model="other-model")
    answer = client_call(daemon, "/v1/chat/completions", chat_body(False))
    assert (answer.status, answer.body["error"]["code"]) == (404, "model_not_found"), answer.text
    assert upstream.requests == []
    outcomes = metric_values(daemon, "orchestratord_gateway_requests_total")
    assert outcomes[f'{{model="{MODEL}",outcome="warming_up"}}'] >= 2.0


def test_a_daemon_on_an_empty_store_answers_unknown_models_404_at_once(gateway):
    daemon = gateway(node_timeout_ms=60_000)
    answer = client_call(daemon, "/v1/chat/completions", chat_body(False))
    assert (answer.status, answer.body["error"]["code"]) == (404, "model_not_found"), answer.text

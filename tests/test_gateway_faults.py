"""The gateway under engine faults, against scripted upstreams: a pool that keeps failing is set aside until
its node's next heartbeat, a kept-alive connection the engine closed is no failure, a plain answer cut off
after the commit point reaches the client cut off, and a client that leaves before the commit point
closes the engine's connection."""

from __future__ import annotations

import http.client
import json
import socket
import time

import pytest
from support import wait_until
from support_gateway import (
    CLIENT_KEY,
    beat_pool,
    chat_body,
    metric,
    placement_errors,
    raw_post,
    serve_pool,
)


def error_codes(daemon) -> list[str]:
    return [error["code"] for error in placement_errors(daemon)]


def send_and_leave_later(daemon, body: dict) -> socket.socket:
    """A streamed chat request on a raw socket, left open: the caller closes it to leave."""
    sock = socket.create_connection(("127.0.0.1", daemon.config["listen_port"]))
    payload = json.dumps(body).encode()
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {CLIENT_KEY}\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    return sock


def test_a_pool_that_keeps_failing_is_set_aside_until_its_node_beats_again(gateway, upstreams):
    bad, good = upstreams(mode="error500"), upstreams()
    daemon = gateway(gateway_set_aside_after=3)
    serve_pool(daemon, "gpu-1", bad.url)
    serve_pool(daemon, "gpu-2", good.url)
    body = json.dumps(chat_body(True)).encode()
    expected = b"".join(good.expected())
    calls = 0
    while len(bad.requests) < 3:  # whichever pool goes first, the bad one's failures are retried
        assert calls < 12, f"the failing pool took {len(bad.requests)} of {calls} requests"
        status, _headers, payload = raw_post(daemon.url, "/v1/chat/completions", body, CLIENT_KEY)
        assert (status, payload) == (200, expected)
        calls += 1
    assert metric(daemon, "orchestratord_gateway_set_aside_total") == 1
    assert metric(daemon, "orchestratord_gateway_retries_total") == 3
    assert error_codes(daemon).count("engine_error") == 3

    # Set aside: nothing reaches it, and nothing is retried any more.
    for _ in range(4):
        status, _headers, payload = raw_post(daemon.url, "/v1/chat/completions", body, CLIENT_KEY)
        assert (status, payload) == (200, expected)
    assert len(bad.requests) == 3
    assert metric(daemon, "orchestratord_gateway_retries_total") == 3

    # Its node's next heartbeat gives it work again (it was mended meanwhile).
    bad.mode = "ok"
    beat_pool(daemon, "gpu-1", bad.url)
    for _ in range(4):
        status, _headers, payload = raw_post(daemon.url, "/v1/chat/completions", body, CLIENT_KEY)
        assert (status, payload) == (200, expected)
    assert bad.finished >= 1, "the pool was not given work after its node's heartbeat"
    assert metric(daemon, "orchestratord_gateway_set_aside_total") == 1


def test_a_kept_alive_connection_the_engine_closed_is_sent_again_not_failed(gateway, upstreams):
    upstream = upstreams(mode="drop_reused")
    daemon = gateway()
    serve_pool(daemon, "gpu-1", upstream.url)  # one pool: a failure here would be a 502
    # A plain answer's connection is pooled and dropped by the upstream when reused; a streamed answer's
    # is closed by the gateway itself (llama-server closes those), so only plain answers reuse one.
    answers = (False, False, True, False, False, True, False, False)
    for stream in answers:
        body = json.dumps(chat_body(stream)).encode()
        status, _headers, payload = raw_post(daemon.url, "/v1/chat/completions", body, CLIENT_KEY)
        assert status == 200, payload
        assert payload == (b"".join(upstream.expected()) if stream else upstream.plain_answer())
    assert upstream.dropped >= 3, "the gateway reused no kept-alive connection: nothing was tested"
    assert upstream.finished == len(answers)
    assert metric(daemon, "orchestratord_gateway_engine_resends_total") == upstream.dropped
    assert metric(daemon, "orchestratord_gateway_retries_total") == 0
    assert error_codes(daemon) == []


@pytest.mark.parametrize("mode", ["cut_plain", "cut_plain_chunked"])
def test_a_plain_answer_cut_off_after_the_commit_point_reaches_the_client_cut_off(gateway, upstreams, mode):
    upstream = upstreams(mode=mode)
    daemon = gateway()
    serve_pool(daemon, "gpu-1", upstream.url)
    spare = upstreams()
    serve_pool(daemon, "gpu-2", spare.url, slots=1)  # fewer free slots: the cut one is picked first
    whole = upstream.plain_answer()
    connection = http.client.HTTPConnection("127.0.0.1", daemon.config["listen_port"], timeout=10)
    try:
        connection.request(
            "POST",
            "/v1/chat/completions",
            json.dumps(chat_body(False)),
            {"Content-Type": "application/json", "Authorization": f"Bearer {CLIENT_KEY}"},
        )
        answer = connection.getresponse()
        assert answer.status == 200
        if mode == "cut_plain":
            assert answer.getheader("Content-Length") == str(len(whole)), "the engine's length, passed on"
        with pytest.raises(http.client.IncompleteRead) as cut:
            answer.read()
    finally:
        connection.close()
    assert 0 < len(cut.value.partial) < len(whole)
    assert whole.startswith(cut.value.partial)
    assert spare.requests == [], "an answer that had begun was retried"
    assert "engine_stream_broken" in error_codes(daemon)


@pytest.mark.parametrize("mode", ["stall", "preamble_stall"])
def test_a_client_leaving_before_the_first_token_closes_the_engine_connection(gateway, upstreams, mode):
    upstream = upstreams(mode=mode)
    # Timeouts far beyond the deadline below: only the client's leaving can end the engine request.
    daemon = gateway(gateway_first_byte_timeout_ms=60_000, gateway_idle_timeout_ms=60_000)
    serve_pool(daemon, "gpu-1", upstream.url)
    sock = send_and_leave_later(daemon, chat_body(True))
    try:
        wait_until(lambda: upstream.requests, what="the upstream took the request")
        # Before the commit point nothing reaches the client, not even the status line.
        sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            sock.recv(1)
    finally:
        sock.close()
    left_at = time.monotonic()
    wait_until(lambda: upstream.client_gone == 1, timeout=3, what="the upstream saw its connection closed")
    print(f"client left -> engine connection closed ({mode}): {time.monotonic() - left_at:.3f} s")

    def slot_given_back() -> str | None:
        text = daemon.api("GET", "/metrics").text
        return text if 'orchestratord_gateway_in_flight{pool="gpu-1/pool-0"} 0.0' in text else None

    text = wait_until(slot_given_back, what="the slot given back")
    assert 'orchestratord_gateway_requests_total{model="tiny-model",outcome="cancelled"} 1.0' in text
    assert upstream.finished == 0

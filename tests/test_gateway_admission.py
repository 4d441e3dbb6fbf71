"""Live load and admission: the last slot, the bounded fair queue, drain, and routing without a database."""

from __future__ import annotations

import json
import threading

from support import wait_until
from support_daemon import beat_pools, pool_reading
from support_gateway import (
    CLIENT_KEY,
    MODEL,
    OTHER_CLIENT_KEY,
    chat_body,
    client_call,
    raw_post,
    serve_pool,
)


class Calls:
    """Client requests on their own threads; answers kept in order of completion with their tag."""

    def __init__(self, daemon) -> None:
        self.daemon = daemon
        self.answers: list[tuple[str, int, dict, bytes]] = []
        self.threads: list[threading.Thread] = []

    def start(self, tag: str, key: str = CLIENT_KEY, stream: bool = False) -> None:
        body = json.dumps(chat_body(stream)).encode()

        def run() -> None:
            status, headers, payload = raw_post(self.daemon.url, "/v1/chat/completions", body, key)
            self.answers.append((tag, status, headers, payload))

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self.threads.append(thread)

    def join(self) -> None:
        for thread in self.threads:
            thread.join(20)


def queue_length(daemon) -> float:
    for line in daemon.api("GET", "/metrics").text.splitlines():
        if line.startswith(f'orchestratord_gateway_queue_length{{model="{MODEL}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_two_requests_at_once_never_take_the_same_last_slot(gateway, upstreams):
    first, second = upstreams(mode="hold"), upstreams(mode="hold")
    daemon = gateway()
    serve_pool(daemon, "gpu-1", first.url, slots=1)
    serve_pool(daemon, "gpu-2", second.url, slots=1)
    calls = Calls(daemon)
    calls.start("a")
    calls.start("b")
    wait_until(lambda: len(first.requests) + len(second.requests) == 2, what="both requests at an engine")
    assert len(first.requests) == len(second.requests) == 1
    first.release()
    second.release()
    calls.join()
    assert sorted(status for _tag, status, _h, _p in calls.answers) == [200, 200]


def test_the_queue_holds_what_exceeds_the_slots_and_times_out_with_503_and_retry_after(gateway, upstreams):
    upstream = upstreams(mode="hold")
    daemon = gateway(gateway_queue_timeout_ms=800)
    serve_pool(daemon, "gpu-1", upstream.url, slots=1)
    calls = Calls(daemon)
    calls.start("holder")
    wait_until(lambda: len(upstream.requests) == 1, what="the first request at the engine")
    answer = client_call(daemon, "/v1/chat/completions", chat_body(False))
    assert answer.status == 503, answer.text
    assert answer.body["error"]["code"] == "queue_timeout"
    assert answer.body["error"]["type"] == "server_error"
    assert answer.headers["Retry-After"].isdigit()
    upstream.release()
    calls.join()
    assert calls.answers[0][1] == 200


def test_a_queued_request_is_served_when_a_slot_frees(gateway, upstreams):
    upstream = upstreams(mode="hold")
    daemon = gateway()
    serve_pool(daemon, "gpu-1", upstream.url, slots=1)
    calls = Calls(daemon)
    calls.start("first")
    wait_until(lambda: len(upstream.requests) == 1, what="the first request at the engine")
    calls.start("second")
    wait_until(lambda: queue_length(daemon) == 1, what="the second request queued")
    assert len(upstream.requests) == 1
    upstream.release()
    calls.join()
    assert sorted(tag for tag, status, _h, _p in calls.answers if status == 200) == ["first", "second"]


def test_the_engine_backlog_sends_that_many_beyond_the_slots_and_queues_the_rest(gateway, upstreams):
    upstream = upstreams(mode="hold")
    daemon = gateway(gateway_engine_backlog=1)
    serve_pool(daemon, "gpu-1", upstream.url, slots=1)
    calls = Calls(daemon)
    calls.start("slot")
    calls.start("backlog")
    wait_until(lambda: len(upstream.requests) == 2, what="one request per slot plus one for the backlog")
    calls.start("queued")
    wait_until(lambda: queue_length(daemon) == 1, what="the third request in the daemon's queue")
    assert len(upstream.requests) == 2
    upstream.release()
    calls.join()
    assert sorted(tag for tag, status, _h, _p in calls.answers if status == 200) == [
        "backlog",
        "queued",
        "slot",
    ]


def test_a_full_queue_answers_429_to_a_key_over_its_share_and_503_to_another(gateway, upstreams):
    upstream = upstreams(mode="hold")
    daemon = gateway(gateway_queue_max=2, gateway_queue_timeout_ms=10_000)
    serve_pool(daemon, "gpu-1", upstream.url, slots=1)
    calls = Calls(daemon)
    calls.start("running")
    wait_until(lambda: len(upstream.requests) == 1, what="one request at the engine")
    calls.start("alice-1")
    calls.start("alice-2")
    wait_until(lambda: queue_length(daemon) == 2, what="alice's two requests queued")
    over = client_call(daemon, "/v1/chat/completions", chat_body(False))
    assert over.status == 429, over.text
    assert (over.body["error"]["type"], over.body["error"]["code"]) == ("rate_limit_error", "key_over_share")
    assert over.headers["Retry-After"].isdigit()
    full = client_call(daemon, "/v1/chat/completions", chat_body(False), key=OTHER_CLIENT_KEY)
    assert full.status == 503, full.text
    assert full.body["error"]["code"] == "queue_full"
    assert full.headers["Retry-After"].isdigit()
    upstream.release()
    calls.join()


def test_one_key_flooding_the_queue_does_not_starve_another(gateway, upstreams):
    upstream = upstreams(mode="hold")
    daemon = gateway(gateway_queue_max=16, gateway_queue_timeout_ms=10_000)
    serve_pool(daemon, "gpu-1", upstream.url, slots=1)
    calls = Calls(daemon)
    calls.start("running")
    wait_until(lambda: len(upstream.requests) == 1, what="one request at the engine")
    for number in range(5):
        calls.start(f"alice-{number}")
    wait_until(lambda: queue_length(daemon) == 5, what="alice's flood queued")
    calls.start("bob", key=OTHER_CLIENT_KEY)
    wait_until(lambda: queue_length(daemon) == 6, what="bob queued behind the flood")
    upstream.mode = "ok"
    upstream.release()
    calls.join()
    order = [tag for tag, status, _h, _p in calls.answers if status == 200]
    assert len(order) == 7
    # Served one key after the other: bob comes within the first three, not after alice's five.
    assert order.index("bob") <= 2, order


def test_no_routable_pool_is_503_no_capacity_at_once(gateway):
    daemon = gateway()
    serve_pool(daemon, "gpu-1", "http://127.0.0.1:9", slots=2)
    engine = {"kind": "llama.cpp", "state": "loading", "model_id": MODEL, "url": "http://127.0.0.1:9"}
    beat_pools(daemon, "gpu-1", [pool_reading("pool-0", [MODEL], engine=engine, slots_total=2, slots_free=2)])
    answer = client_call(daemon, "/v1/chat/completions", chat_body(False))
    assert answer.status == 503, answer.text
    assert answer.body["error"]["code"] == "no_capacity"
    assert answer.headers["Retry-After"].isdigit()


def test_a_drained_node_finishes_its_stream_and_gets_nothing_new(gateway, upstreams):
    slow = upstreams(event_gap_s=0.05)
    other = upstreams()
    daemon = gateway()
    serve_pool(daemon, "gpu-1", slow.url, slots=8)
    serve_pool(daemon, "gpu-2", other.url, slots=1)
    calls = Calls(daemon)
    calls.start("long", stream=True)
    wait_until(lambda: len(slow.requests) == 1, what="the long stream at gpu-1")
    assert daemon.api("POST", "/v2/nodes/gpu-1/drain", {"drain": True}).status == 200
    for _ in range(3):
        answer = client_call(daemon, "/v1/chat/completions", chat_body(False))
        assert answer.status == 200, answer.text
    assert len(slow.requests) == 1 and len(other.requests) == 3
    calls.join()
    tag, status, _headers, payload = calls.answers[0]
    assert (tag, status, payload) == ("long", 200, b"".join(slow.expected()))


def test_routing_goes_on_while_the_database_is_away(gateway, upstreams, tmp_path):
    from test_orchestratord_store_faults import fill, small_disk

    upstream = upstreams()
    with small_disk(tmp_path / "disk", "1m") as disk:
        daemon = gateway(db_path=str(disk / "registry.db"))
        serve_pool(daemon, "gpu-1", upstream.url)
        fill(disk)
        wait_until(lambda: daemon.api("GET", "/ready").status == 503, what="the database refusing writes")
        for stream in (True, False):
            answer = client_call(daemon, "/v1/chat/completions", chat_body(stream))
            assert answer.status == 200, answer.text
        daemon.stop()

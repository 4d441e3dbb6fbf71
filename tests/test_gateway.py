"""The client endpoint against scripted upstreams: fidelity, the commit point, retries, errors, keys."""

from __future__ import annotations

import json
import threading

import pytest
from support import TEST_TOKEN, wait_until
from support_daemon import run_daemon_once, write_yaml
from support_gateway import (
    CLIENT_KEY,
    MODEL,
    chat_body,
    client_call,
    gateway_daemon,
    placement_errors,
    raw_post,
    serve_pool,
    write_client_keys,
)


def test_a_stream_is_byte_identical_to_asking_the_upstream_directly(gateway, upstreams):
    upstream = upstreams()
    daemon = gateway()
    serve_pool(daemon, "gpu-1", upstream.url)
    body = json.dumps(chat_body(True, temperature=0, seed=7, extra_field={"kept": [1, 2]})).encode()
    direct = raw_post(upstream.url, "/v1/chat/completions", body, None)
    through = raw_post(daemon.url, "/v1/chat/completions", body, CLIENT_KEY)
    assert through[0] == direct[0] == 200
    assert through[2] == direct[2] == b"".join(upstream.expected())
    assert through[1]["Content-Type"] == direct[1]["Content-Type"] == "text/event-stream"
    # The body reached the engine as the bytes that came, the engine's key slot empty without a keys folder.
    assert upstream.requests[-1]["body"] == body
    assert "Authorization" not in upstream.requests[-1]["headers"]


def test_a_plain_answer_passes_through_status_type_and_body(gateway, upstreams):
    upstream = upstreams()
    daemon = gateway()
    serve_pool(daemon, "gpu-1", upstream.url)
    body = json.dumps(chat_body(False)).encode()
    status, headers, payload = raw_post(daemon.url, "/v1/chat/completions", body, CLIENT_KEY)
    assert (status, payload) == (200, upstream.plain_answer())
    assert headers["Content-Type"].startswith("application/json")
    status, _headers, payload = raw_post(daemon.url, "/v1/completions", body, CLIENT_KEY)
    assert (status, payload) == (200, upstream.plain_answer())


def test_models_lists_what_serving_engines_serve(gateway, upstreams):
    daemon = gateway()
    serve_pool(daemon, "gpu-1", upstreams().url, model="b-model")
    serve_pool(daemon, "gpu-2", upstreams().url, model="a-model")
    answer = client_call(daemon, "/v1/models", method="GET")
    assert answer.status == 200, answer.text
    assert answer.body == {
        "object": "list",
        "data": [
            {"id": "a-model", "object": "model", "created": 0, "owned_by": "llorch"},
            {"id": "b-model", "object": "model", "created": 0, "owned_by": "llorch"},
        ],
    }


@pytest.mark.parametrize("failure", ["error500", "refuse", "die_before_token"])
def test_a_failure_before_the_first_token_is_retried_once_on_another_pool(gateway, upstreams, failure):
    bad = upstreams(mode="die_after", die_after=1) if failure == "die_before_token" else upstreams()
    if failure == "error500":
        bad.mode = "error500"
    elif failure == "refuse":
        bad.stop()
    good = upstreams()
    daemon = gateway()
    serve_pool(daemon, "gpu-1", bad.url)
    serve_pool(daemon, "gpu-2", good.url)
    body = json.dumps(chat_body(True)).encode()
    for _ in range(4):  # whichever pool is picked first, every answer is the good one's, whole
        status, _headers, payload = raw_post(daemon.url, "/v1/chat/completions", body, CLIENT_KEY)
        assert (status, payload) == (200, b"".join(good.expected()))
    assert good.finished == 4
    assert any(
        error["source"] == "gateway" and "gpu-1" in error["message"] for error in placement_errors(daemon)
    )


def test_nothing_is_retried_after_the_first_token_and_the_stream_ends_with_one_error_event(
    gateway, upstreams
):
    dying = upstreams(mode="die_after", die_after=4)  # role chunk + 3 tokens, then the engine dies
    spare = upstreams()
    daemon = gateway()
    serve_pool(daemon, "gpu-1", dying.url, slots=8)
    serve_pool(daemon, "gpu-2", spare.url, slots=1)  # fewer free slots: gpu-1 is picked first
    body = json.dumps(chat_body(True)).encode()
    status, _headers, payload = raw_post(daemon.url, "/v1/chat/completions", body, CLIENT_KEY)
    assert status == 200
    events = [event for event in payload.split(b"\n\n") if event]
    assert events[:4] == [event.rstrip(b"\n") for event in dying.expected()[:4]]
    error = json.loads(events[4].removeprefix(b"data: "))
    assert error == {
        "error": {
            "message": error["error"]["message"],
            "type": "server_error",
            "param": None,
            "code": "engine_stream_broken",
        }
    }
    assert len(events) == 5 and b"[DONE]" not in payload
    assert spare.requests == []


def test_both_tries_failing_is_502_and_a_stall_is_504(gateway, upstreams):
    daemon = gateway(gateway_first_byte_timeout_ms=500)
    first, second = upstreams(mode="error500"), upstreams(mode="error500")
    serve_pool(daemon, "gpu-1", first.url)
    serve_pool(daemon, "gpu-2", second.url)
    answer = client_call(daemon, "/v1/chat/completions", chat_body(True))
    assert answer.status == 502, answer.text
    assert answer.body["error"]["code"] == "engine_unavailable"
    assert len(first.requests) == len(second.requests) == 1

    stalled = gateway(gateway_first_byte_timeout_ms=500)
    serve_pool(stalled, "gpu-3", upstreams(mode="stall").url)
    answer = client_call(stalled, "/v1/chat/completions", chat_body(False))
    assert answer.status == 504, answer.text
    assert answer.body["error"] == {
        "message": answer.body["error"]["message"],
        "type": "server_error",
        "param": None,
        "code": "engine_timeout",
    }


def test_an_engines_own_4xx_is_passed_through_not_retried(gateway, upstreams):
    import support_gateway

    daemon = gateway()
    upstream = upstreams()
    serve_pool(daemon, "gpu-1", upstream.url)
    # A body the upstream refuses the way llama-server does: its own 400, as it came.
    answer = client_call(
        daemon, "/v1/chat/completions", raw=b'{"model": "%s", "stream": "x"}' % MODEL.encode()
    )
    assert answer.status == 400 and answer.body["error"]["code"] == "invalid_params"  # ours: stream not bool
    assert support_gateway.MODEL == MODEL


def test_bad_requests_get_openai_shaped_4xx(gateway, upstreams):
    daemon = gateway(max_body_bytes=4096)
    serve_pool(daemon, "gpu-1", upstreams().url)
    cases = [
        (b"{not json", 400, "invalid_request_error", "invalid_json"),
        (b'{"messages": []}', 400, "invalid_request_error", "invalid_params"),
        (b'{"model": "bad model id"}', 400, "invalid_request_error", "invalid_params"),
        (b"[1, 2]", 400, "invalid_request_error", "invalid_params"),
        (b'{"model": "no-such-model"}', 404, "invalid_request_error", "model_not_found"),
        (b'{"model": "x", "pad": "' + b"p" * 5000 + b'"}', 413, "invalid_request_error", "payload_too_large"),
    ]
    for raw, status, error_type, code in cases:
        answer = client_call(daemon, "/v1/chat/completions", raw=raw)
        assert answer.status == status, (raw[:30], answer.text)
        assert answer.body["error"]["type"] == error_type, answer.text
        assert answer.body["error"]["code"] == code, answer.text
        assert answer.body["error"]["param"] is None
    assert daemon.proc.poll() is None


def test_client_keys_and_the_cluster_token_open_only_their_own_routes(gateway, upstreams):
    daemon = gateway()
    serve_pool(daemon, "gpu-1", upstreams().url)
    assert client_call(daemon, "/v1/models", method="GET").status == 200
    for key in (TEST_TOKEN, None, "x" * 40):
        answer = client_call(daemon, "/v1/models", key=key, method="GET")
        assert answer.status == 401, answer.text
        assert answer.body["error"]["type"] == "authentication_error"
        assert answer.body["error"]["code"] == "invalid_api_key"
    assert daemon.api("GET", "/v2/nodes", token=CLIENT_KEY).status == 401
    assert daemon.api("GET", "/v2/nodes").status == 200


def test_without_client_keys_every_v1_call_is_401(tmp_path, upstreams):
    daemon = gateway_daemon(tmp_path / "d", client_keys_file=None).start()
    try:
        answer = client_call(daemon, "/v1/models", method="GET")
        assert answer.status == 401
        assert answer.body["error"]["message"] == "no client keys configured"
    finally:
        daemon.stop()


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("alice short\n", "line 1: the key must be at least 32"),
        ("alice " + "a" * 40 + "\nalice " + "b" * 40 + "\n", "line 2: the name 'alice' is already used"),
        ("alice " + "a" * 40 + "\n\nbob " + "a" * 40 + "\n", "line 3: the same key as client 'alice'"),
        ("# comment\nalice " + TEST_TOKEN + "\n", "line 2: the key of 'alice' is the cluster token"),
        ("alice key with spaces " + "a" * 40 + "\n", "line 1: expected `<name> <key>`"),
        ("bad/name " + "a" * 40 + "\n", "line 1: the name must be"),
    ],
)
def test_a_bad_client_keys_file_stops_the_start_with_one_line(tmp_path, content, expected):
    keys = tmp_path / "client-keys"
    keys.write_text(content)
    keys.chmod(0o600)
    token_file = tmp_path / "token"
    token_file.write_text(TEST_TOKEN)
    token_file.chmod(0o600)
    config = write_yaml(
        tmp_path / "c.yml", {"token_file": str(token_file), "client_keys_file": str(keys), "db_path": "x.db"}
    )
    done = run_daemon_once(config)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], done.stderr
    assert "a" * 40 not in done.stderr and TEST_TOKEN not in done.stderr


def test_a_client_keys_file_others_can_read_or_a_link_is_refused(tmp_path):
    keys = write_client_keys(tmp_path / "client-keys", {"alice": CLIENT_KEY})
    link = tmp_path / "link"
    link.symlink_to(keys)
    token_file = tmp_path / "token"
    token_file.write_text(TEST_TOKEN)
    token_file.chmod(0o600)
    for path, expected in ((link, "symbolic link"), (keys, "readable by group or others")):
        if path == keys:
            keys.chmod(0o644)
        config = write_yaml(
            tmp_path / "c.yml",
            {"token_file": str(token_file), "client_keys_file": str(path), "db_path": "x.db"},
        )
        done = run_daemon_once(config)
        assert done.returncode == 2 and expected in done.stderr, done.stderr


def test_engine_keys_are_sent_and_a_rotated_key_is_read_again(gateway, upstreams, tmp_path):
    keys_dir = tmp_path / "engine-keys"
    keys_dir.mkdir()
    key_file = keys_dir / "gpu-1"
    key_file.write_text("first-key-" + "1" * 30 + "\n")
    key_file.chmod(0o600)
    upstream = upstreams()
    daemon = gateway(engine_keys_dir=str(keys_dir))
    serve_pool(daemon, "gpu-1", upstream.url)
    assert client_call(daemon, "/v1/chat/completions", chat_body(False)).status == 200
    assert upstream.requests[-1]["headers"]["Authorization"] == "Bearer first-key-" + "1" * 30
    assert CLIENT_KEY not in json.dumps(upstream.requests[-1]["headers"])


def test_placement_errors_list_placement_refusals_newest_first(gateway):
    daemon = gateway()
    assert daemon.api("POST", "/v2/placement", {"model_id": "nowhere"}).status == 503
    assert client_call(daemon, "/v1/chat/completions", chat_body(False, model="elsewhere")).status == 404
    answer = daemon.api("GET", "/v2/placement/errors")
    assert answer.status == 200
    assert answer.body["count"] == 2
    newest, oldest = answer.body["errors"]
    assert (newest["source"], newest["model_id"], newest["code"]) == (
        "gateway",
        "elsewhere",
        "model_not_found",
    )
    assert (oldest["source"], oldest["model_id"], oldest["code"]) == (
        "placement",
        "nowhere",
        "MODEL_NOT_AVAILABLE",
    )
    assert newest["at"].endswith("Z")
    assert daemon.api("GET", "/v2/placement/errors", token=CLIENT_KEY).status == 401


def test_a_client_that_leaves_cancels_the_engine_request(gateway, upstreams):
    import socket

    upstream = upstreams(event_gap_s=0.2)
    daemon = gateway(gateway_idle_timeout_ms=5000)
    serve_pool(daemon, "gpu-1", upstream.url)
    for stream in (True, False):
        upstream.mode = "ok" if stream else "hold"
        before, asked = upstream.client_gone, len(upstream.requests)
        sock = socket.create_connection(("127.0.0.1", daemon.config["listen_port"]))
        body = json.dumps(chat_body(stream)).encode()
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {CLIENT_KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        if stream:
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")  # committed: tokens are flowing
        else:
            wait_until(lambda a=asked: len(upstream.requests) > a, what="the upstream took the request")
        sock.close()
        wait_until(lambda b=before: upstream.client_gone > b, timeout=5, what="the engine request cancelled")
    metrics = daemon.api("GET", "/metrics").text
    assert 'orchestratord_gateway_in_flight{pool="gpu-1/pool-0"} 0.0' in metrics


def test_metrics_count_requests_by_model_and_outcome(gateway, upstreams):
    daemon = gateway()
    serve_pool(daemon, "gpu-1", upstreams().url)
    assert client_call(daemon, "/v1/chat/completions", chat_body(True)).status == 200
    assert client_call(daemon, "/v1/chat/completions", chat_body(False, model="never-served")).status == 404
    text = daemon.api("GET", "/metrics").text
    assert f'orchestratord_gateway_requests_total{{model="{MODEL}",outcome="ok"}} 1.0' in text
    assert 'orchestratord_gateway_requests_total{model="_unknown",outcome="model_not_found"} 1.0' in text
    assert "never-served" not in text
    assert f'orchestratord_gateway_first_byte_seconds_count{{model="{MODEL}"}} 1.0' in text
    assert "orchestratord_gateway_retries_total 0.0" in text


def test_requests_on_many_threads_all_complete(gateway, upstreams):
    daemon = gateway()
    serve_pool(daemon, "gpu-1", upstreams().url, slots=4)
    serve_pool(daemon, "gpu-2", upstreams().url, slots=4)
    results: list[int] = []
    body = json.dumps(chat_body(True)).encode()

    def call() -> None:
        results.append(raw_post(daemon.url, "/v1/chat/completions", body, CLIENT_KEY)[0])

    threads = [threading.Thread(target=call) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results == [200] * 16

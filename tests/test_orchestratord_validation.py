"""Bad input: every body is checked by its schema; each mistake is a 4xx envelope naming the field."""

from __future__ import annotations

import copy
import json

import pytest
from support import engine_status, make_daemon, sample_heartbeat, sample_registration

REGISTRATION = sample_registration("gpu-1", pools=2)
HEARTBEAT = sample_heartbeat(REGISTRATION, ["llama"])
for _number, _pool in enumerate(HEARTBEAT["pools"]):
    _pool["engine"] = engine_status(
        "llama", f"http://10.89.0.11:{8101 + _number}", version="b6000", requests_deferred=0
    )


@pytest.fixture(scope="module")
def shared_daemon(tmp_path_factory):
    daemon = make_daemon(tmp_path_factory.mktemp("validation")).start()
    assert daemon.api("POST", "/v2/nodes/register", REGISTRATION).status == 200
    yield daemon
    daemon.stop()


def changed(body: dict, path: str, value) -> dict:
    """A deep copy of `body` with the dotted `path` set to `value` (or removed when value is ...)."""
    body = copy.deepcopy(body)
    *parents, last = path.split(".")
    target = body
    for part in parents:
        target = target[int(part)] if part.isdigit() else target[part]
    if value is ...:
        del target[last]
    elif last.isdigit():
        target[int(last)] = value
    else:
        target[last] = value
    return body


def assert_invalid(answer, field: str) -> None:
    assert answer.status == 400, answer.text
    assert set(answer.body) == {"code", "message"}
    assert answer.body["code"] == "INVALID_PARAMS"
    assert field in answer.body["message"], answer.body["message"]
    assert "Traceback" not in answer.text


BAD_REGISTRATIONS = {
    "node id with a space": (changed(REGISTRATION, "node_id", "gpu 1"), "$.node_id"),
    "node id with a trailing newline": (changed(REGISTRATION, "node_id", "gpu-1\n"), "$.node_id"),
    "address with a newline": (changed(REGISTRATION, "address", "http://a\nforged log line"), "$.address"),
    "gpu name with a control character": (
        changed(REGISTRATION, "capabilities.gpus.0.name", "H100\x1b[2J"),
        "$.capabilities.gpus[0].name",
    ),
    "node id too long": (changed(REGISTRATION, "node_id", "n" * 129), "$.node_id"),
    "empty node id": (changed(REGISTRATION, "node_id", ""), "$.node_id"),
    "node id missing": (changed(REGISTRATION, "node_id", ...), "node_id"),
    "node id a number": (changed(REGISTRATION, "node_id", 7), "$.node_id"),
    "pool id with a slash": (changed(REGISTRATION, "pools.0.pool_id", "a/b"), "$.pools[0].pool_id"),
    "slots_total a string": (changed(REGISTRATION, "pools.1.slots_total", "4"), "$.pools[1].slots_total"),
    "negative slots_total": (changed(REGISTRATION, "pools.0.slots_total", -1), "$.pools[0].slots_total"),
    "negative vram": (
        changed(REGISTRATION, "capabilities.gpus.0.vram_total_bytes", -1),
        "$.capabilities.gpus[0].vram_total_bytes",
    ),
    "negative ram": (
        changed(REGISTRATION, "capabilities.ram_total_bytes", -5),
        "$.capabilities.ram_total_bytes",
    ),
    "pools not a list": (changed(REGISTRATION, "pools", {"pool_id": "x"}), "$.pools"),
    "duplicate pool": (
        changed(REGISTRATION, "pools.1.pool_id", REGISTRATION["pools"][0]["pool_id"]),
        "$.pools[1].pool_id",
    ),
    "capabilities missing": (changed(REGISTRATION, "capabilities", ...), "capabilities"),
}


@pytest.mark.parametrize("case", BAD_REGISTRATIONS)
def test_bad_registration_is_400_naming_the_field(shared_daemon, case):
    body, field = BAD_REGISTRATIONS[case]
    assert_invalid(shared_daemon.api("POST", "/v2/nodes/register", body), field)


BAD_HEARTBEATS = {
    "slots_free above slots_total": (changed(HEARTBEAT, "pools.1.slots_free", 5), "$.pools[1].slots_free"),
    "negative vram free": (changed(HEARTBEAT, "pools.0.vram_free_bytes", -1), "$.pools[0].vram_free_bytes"),
    "ready not a bool": (changed(HEARTBEAT, "pools.0.ready", "yes"), "$.pools[0].ready"),
    "timestamp not a time": (changed(HEARTBEAT, "timestamp", "yesterday"), "$.timestamp"),
    "model id with a trailing newline": (
        changed(HEARTBEAT, "pools.0.models_available", ["llama\n"]),
        "$.pools[0].models_available[0]",
    ),
    "timestamp with a trailing newline": (
        changed(HEARTBEAT, "timestamp", HEARTBEAT["timestamp"] + "\n"),
        "$.timestamp",
    ),
    "model id with a space": (
        changed(HEARTBEAT, "pools.0.models_available", ["bad model"]),
        "$.pools[0].models_available[0]",
    ),
    "pools missing": (changed(HEARTBEAT, "pools", ...), "pools"),
    "engine state unknown": (
        changed(HEARTBEAT, "pools.0.engine.state", "serving"),
        "$.pools[0].engine.state",
    ),
    "engine state a number": (changed(HEARTBEAT, "pools.1.engine.state", 1), "$.pools[1].engine.state"),
    "engine kind unknown": (changed(HEARTBEAT, "pools.0.engine.kind", "vllm"), "$.pools[0].engine.kind"),
    "engine a bare string": (changed(HEARTBEAT, "pools.0.engine", "llama.cpp"), "$.pools[0].engine"),
    "engine url without a scheme": (
        changed(HEARTBEAT, "pools.0.engine.url", "10.89.0.11:8101"),
        "$.pools[0].engine.url",
    ),
    "engine url of another scheme": (
        changed(HEARTBEAT, "pools.0.engine.url", "file:///etc/passwd"),
        "$.pools[0].engine.url",
    ),
    "engine url with a newline": (
        changed(HEARTBEAT, "pools.0.engine.url", "http://10.89.0.11:8101\nforged"),
        "$.pools[0].engine.url",
    ),
    "engine url with a space": (
        changed(HEARTBEAT, "pools.0.engine.url", "http://10.89.0.11:8101/a b"),
        "$.pools[0].engine.url",
    ),
    "engine model id with a space": (
        changed(HEARTBEAT, "pools.0.engine.model_id", "bad model"),
        "$.pools[0].engine.model_id",
    ),
    "engine without a model": (changed(HEARTBEAT, "pools.0.engine.model_id", ...), "model_id"),
    "engine deferred count negative": (
        changed(HEARTBEAT, "pools.0.engine.requests_deferred", -1),
        "$.pools[0].engine.requests_deferred",
    ),
    "engine version with a control character": (
        changed(HEARTBEAT, "pools.0.engine.version", "b1234\x1b[2J"),
        "$.pools[0].engine.version",
    ),
}


@pytest.mark.parametrize("case", BAD_HEARTBEATS)
def test_bad_heartbeat_is_400_naming_the_field(shared_daemon, case):
    body, field = BAD_HEARTBEATS[case]
    answer = shared_daemon.api("POST", "/v2/nodes/gpu-1/heartbeat", body)
    assert_invalid(answer, field)
    assert "\n" not in answer.body["message"]  # one line, whatever the body held


def test_the_valid_engine_heartbeat_is_taken(shared_daemon):
    answer = shared_daemon.api("POST", "/v2/nodes/gpu-1/heartbeat", HEARTBEAT)
    assert answer.status == 200, answer.text
    node = shared_daemon.api("GET", "/v2/nodes/gpu-1").body
    assert [pool["engine"] for pool in node["pools"]] == [pool["engine"] for pool in HEARTBEAT["pools"]]


BAD_PLACEMENTS = {
    "unknown strategy": ({"strategy": "cheapest"}, "$.strategy"),
    "negative vram": ({"vram_bytes": -1}, "$.vram_bytes"),
    "vram a string": ({"vram_bytes": "lots"}, "$.vram_bytes"),
    "model id too odd": ({"model_id": "a b"}, "$.model_id"),
    "body a list": ([], "PlacementRequest"),
}


@pytest.mark.parametrize("case", BAD_PLACEMENTS)
def test_bad_placement_is_400_naming_the_field(shared_daemon, case):
    body, field = BAD_PLACEMENTS[case]
    assert_invalid(shared_daemon.api("POST", "/v2/placement", body), field)


def test_drain_not_a_bool_is_400(shared_daemon):
    assert_invalid(shared_daemon.api("POST", "/v2/nodes/gpu-1/drain", {"drain": "yes"}), "$.drain")


@pytest.mark.parametrize(
    "path", ["/v2/nodes/register", "/v2/nodes/gpu-1/heartbeat", "/v2/nodes/gpu-1/drain", "/v2/placement"]
)
@pytest.mark.parametrize("raw", [b"{not json", b"", b"\xff\xfe", b'{"a": 1'])
def test_malformed_json_is_400(shared_daemon, path, raw):
    answer = shared_daemon.api("POST", path, raw=raw)
    assert answer.status == 400
    assert answer.body["code"] == "INVALID_PARAMS"
    assert "JSON" in answer.body["message"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v2/nodes/bad%20id"),
        ("DELETE", "/v2/nodes/bad%20id"),
        ("GET", "/v2/nodes/" + "n" * 129),
        ("GET", "/v2/nodes/gpu-1%0A"),
    ],
)
def test_bad_node_id_in_the_path_is_400(shared_daemon, method, path):
    assert_invalid(shared_daemon.api(method, path), "node_id")


def test_bad_node_id_in_a_heartbeat_path_is_400(shared_daemon):
    assert_invalid(shared_daemon.api("POST", "/v2/nodes/bad%21id/heartbeat", HEARTBEAT), "node_id")


def test_unknown_status_filter_is_400(shared_daemon):
    assert_invalid(shared_daemon.api("GET", "/v2/nodes?status=sleeping"), "status")


def test_body_over_the_limit_is_413(shared_daemon):
    oversized = b'{"node_id": "' + b"x" * (1024 * 1024 + 1) + b'"}'
    answer = shared_daemon.api("POST", "/v2/nodes/register", raw=oversized)
    assert answer.status == 413
    assert answer.body["code"] == "PAYLOAD_TOO_LARGE"
    assert "1048576" in answer.body["message"]


def test_configured_body_limit_applies(daemon_factory):
    daemon = daemon_factory(max_body_bytes=2048)
    answer = daemon.api("POST", "/v2/placement", raw=b'{"model_id": "' + b"m" * 3000 + b'"}')
    assert answer.status == 413
    assert answer.body["code"] == "PAYLOAD_TOO_LARGE"


def test_unknown_path_is_404_envelope(shared_daemon):
    answer = shared_daemon.api("GET", "/v2/nowhere")
    assert answer.status == 404
    assert answer.body["code"] == "NOT_FOUND"
    answer = shared_daemon.api("GET", "/nowhere", token=None)
    assert answer.status == 404
    assert answer.body["code"] == "NOT_FOUND"


def test_wrong_method_is_405_envelope(shared_daemon):
    answer = shared_daemon.api("PUT", "/v2/placement", {})
    assert answer.status == 405
    assert answer.body["code"] == "METHOD_NOT_ALLOWED"
    assert "POST" in answer.headers["Allow"]


def test_bad_input_changed_nothing(daemon_factory):
    # Its own daemon and its own bad bodies: the check means the same whichever tests ran before it. A long
    # node timeout keeps the node's status still however slowly the machine runs the requests.
    daemon = daemon_factory(node_timeout_ms=600_000)
    assert daemon.api("POST", "/v2/nodes/register", REGISTRATION).status == 200
    assert daemon.api("POST", "/v2/nodes/gpu-1/heartbeat", HEARTBEAT).status == 200
    before = daemon.api("GET", "/v2/nodes").body
    for body, field in BAD_REGISTRATIONS.values():
        assert_invalid(daemon.api("POST", "/v2/nodes/register", body), field)
    for body, field in BAD_HEARTBEATS.values():
        assert_invalid(daemon.api("POST", "/v2/nodes/gpu-1/heartbeat", body), field)
    assert daemon.api("POST", "/v2/nodes/gpu-1/drain", {"drain": "yes"}).status == 400
    assert daemon.api("GET", "/v2/nodes").body == before
    assert "Traceback" not in daemon.log()


def test_unknown_query_parameter_is_400(shared_daemon):
    assert_invalid(shared_daemon.api("GET", "/v2/nodes?stauts=offline"), "stauts")
    assert_invalid(shared_daemon.api("GET", "/v2/catalog/models?model=x"), "model")


def test_whole_number_written_as_a_float_is_an_integer(shared_daemon):
    # JSON Schema, and so the published document, counts 4.0 as an integer.
    body = changed(HEARTBEAT, "pools.0.slots_free", 2.0)
    assert shared_daemon.api("POST", "/v2/nodes/gpu-1/heartbeat", body).status == 200
    assert shared_daemon.api("GET", "/v2/nodes/gpu-1").body["pools"][0]["slots_free"] == 2
    assert_invalid(
        shared_daemon.api("POST", "/v2/nodes/gpu-1/heartbeat", changed(HEARTBEAT, "pools.0.slots_free", 2.5)),
        "$.pools[0].slots_free",
    )


def nested(body: dict, depth: int) -> bytes:
    """`body` with one more field holding lists nested `depth` deep, as raw JSON."""
    return json.dumps(body)[:-1].encode() + b', "x": ' + b"[" * depth + b"]" * depth + b"}"


DEEP_BODIES = {  # route: (path, a valid body, the same with a whole float, what the float one answers)
    "register": (
        "/v2/nodes/register",
        REGISTRATION,
        changed(REGISTRATION, "capabilities.cpu_cores", 32.0),
        200,
    ),
    "heartbeat": ("/v2/nodes/gpu-1/heartbeat", HEARTBEAT, changed(HEARTBEAT, "pools.0.slots_free", 2.0), 200),
    "drain": ("/v2/nodes/gpu-1/drain", {"drain": False}, {"drain": 1.0}, 400),  # 1 is no bool
    "placement": ("/v2/placement", {"model_id": "llama"}, {"model_id": "llama", "vram_bytes": 1.0}, 200),
}


@pytest.mark.parametrize("route", DEEP_BODIES)
@pytest.mark.parametrize("with_float", [False, True])
@pytest.mark.parametrize("depth", [10_000, 100_000])
def test_body_nested_too_deeply_is_400(shared_daemon, route, depth, with_float):
    path, plain, whole_float, _ = DEEP_BODIES[route]
    answer = shared_daemon.api("POST", path, raw=nested(whole_float if with_float else plain, depth))
    assert answer.status == 400, answer.text
    assert set(answer.body) == {"code", "message"}
    assert answer.body["code"] == "INVALID_PARAMS"
    assert "nested too deeply" in answer.body["message"]
    assert "Traceback" not in shared_daemon.log()


@pytest.mark.parametrize("route", DEEP_BODIES)
@pytest.mark.parametrize("depth", [50, 500, 900])
def test_nesting_the_decoder_takes_is_fine_on_the_whole_float_path_too(shared_daemon, route, depth):
    # A whole float sends the body through the slower path, which must reach as deep as the decoder.
    path, _, whole_float, float_status = DEEP_BODIES[route]
    answer = shared_daemon.api("POST", path, raw=nested(whole_float, depth))
    assert answer.status == float_status, answer.text
    assert "Traceback" not in shared_daemon.log()

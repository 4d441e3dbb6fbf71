"""Seeded mutations of valid bodies against the running daemon: no 5xx on any of them, every error in the
envelope. schemathesis (test_orchestratord_fuzz.py) generates from the schema; this starts from real
bodies and breaks them the way a careless or hostile peer would, with the numbers JSON Schema tools never
write (1.5e308, 1e-09, 1e400, integers past 64 bits) and bytes that are not JSON or not UTF-8.
"""

from __future__ import annotations

import copy
import json
import random
import urllib.parse
from typing import Any

import pytest
from support import make_daemon, sample_heartbeat, sample_registration
from support_daemon import online_node

SEED = 20260101
MUTATIONS_PER_ROUTE = 300

# Raw JSON number texts json.dumps cannot write; they go in through a placeholder string.
RAW_NUMBERS = ["1.5e308", "1e-09", "1e400", "-1e400", "-0.0", "4.0", "18446744073709551616", "1" + "0" * 40]
ODD_VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    2**62 + 1,
    "",
    ".",
    "..",
    "x" * 300,
    "\u0000",
    "é",
    [],
    {},
    [[[[[]]]]],
    {"pool_id": "p"},
]


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every place in a JSON value that a mutation can hit, the root included."""
    found = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for number, item in enumerate(value):
            found += _paths(item, (*prefix, number))
    return found


def _replace(body: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    target = body
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return body


def _remove(body: Any, path: tuple) -> Any:
    if path:
        parent = body
        for step in path[:-1]:
            parent = parent[step]
        del parent[path[-1]]
    return body


def mutate(valid: dict, rng: random.Random) -> bytes:
    """One mutated body: one to three structural changes, then now and then a byte-level one."""
    body = copy.deepcopy(valid)
    raw_numbers: dict[str, str] = {}
    for _ in range(rng.randint(1, 3)):
        path = rng.choice(_paths(body))
        kind = rng.random()
        if kind < 0.4:
            marker = f"@@raw{len(raw_numbers)}@@"
            raw_numbers[marker] = rng.choice(RAW_NUMBERS)
            body = _replace(body, path, marker)
        elif kind < 0.7:
            body = _replace(body, path, copy.deepcopy(rng.choice(ODD_VALUES)))
        elif kind < 0.85 and path:
            body = _remove(body, path)
        elif isinstance(body, dict):
            body[rng.choice(["extra", "node_id", "pools", "timestamp"])] = f"@@raw{len(raw_numbers)}@@"
            raw_numbers[f"@@raw{len(raw_numbers)}@@"] = rng.choice(RAW_NUMBERS)
    text = json.dumps(body)
    for marker, number in raw_numbers.items():
        text = text.replace(json.dumps(marker), number)
    data = bytearray(text.encode())
    kind = rng.random()
    if kind < 0.1 and data:
        data[rng.randrange(len(data))] = rng.choice([0xFF, 0xC3, 0x80, 0x00, ord("{"), ord('"')])
    elif kind < 0.15:
        del data[rng.randrange(len(data)) :]
    return bytes(data)


REGISTRATION = sample_registration("gpu-1", pools=2)
HEARTBEAT = sample_heartbeat(REGISTRATION, ["llama", "org/model:q4"])
# Every route that takes a body or changes state; {node} is a registered node's id.
WRITE_ROUTES = [
    ("POST", "/v2/nodes/register", REGISTRATION),
    ("POST", "/v2/nodes/gpu-1/heartbeat", HEARTBEAT),
    ("POST", "/v2/nodes/gpu-1/drain", {"drain": True}),
    ("POST", "/v2/placement", {"model_id": "llama", "vram_bytes": 1024, "strategy": "round-robin"}),
]


@pytest.fixture(scope="module")
def mutated_daemon(tmp_path_factory):
    daemon = make_daemon(tmp_path_factory.mktemp("mutations")).start()
    online_node(daemon, "gpu-1", ["llama"], serve="llama", pools=2)
    yield daemon
    daemon.stop()


def assert_envelope(answer, what: str) -> None:
    assert answer.status < 500 or answer.body.get("code") in ("NO_CAPACITY", "MODEL_NOT_AVAILABLE"), what
    if answer.status >= 400:
        assert isinstance(answer.body, dict) and set(answer.body) == {"code", "message"}, what
        assert answer.body["code"].replace("_", "").isalpha() and answer.body["code"].isupper(), what
        assert "\n" not in answer.body["message"], what


@pytest.mark.parametrize(("method", "path", "valid"), WRITE_ROUTES, ids=[r[1] for r in WRITE_ROUTES])
def test_mutated_bodies_never_get_a_server_error(mutated_daemon, method, path, valid):
    rng = random.Random(f"{SEED}:{path}")
    statuses: dict[int, int] = {}
    for number in range(MUTATIONS_PER_ROUTE):
        raw = mutate(valid, rng)
        answer = mutated_daemon.api(method, path, raw=raw)
        what = f"mutation {number} of {path}: {raw[:300]!r} -> {answer.status} {answer.text}"
        assert_envelope(answer, what)
        statuses[answer.status] = statuses.get(answer.status, 0) + 1
        if method == "POST" and path == "/v2/nodes/register" and answer.status == 200:
            # A mutation that still registers gpu-1 must not leave later heartbeats without their node.
            mutated_daemon.api(method, path, REGISTRATION)
    assert statuses.get(400, 0) > MUTATIONS_PER_ROUTE // 3, statuses  # most mutations really are bad input
    assert "Traceback" not in mutated_daemon.log()


def test_mutated_path_ids_never_get_a_server_error(mutated_daemon):
    rng = random.Random(SEED)
    for _ in range(100):
        node_id = "".join(rng.choice("ab.-_%/\\ é\x7f") for _ in range(rng.randint(1, 6)))
        quoted = urllib.parse.quote(node_id, safe="")
        for method, suffix, body in (
            ("GET", "", None),
            ("DELETE", "", None),
            ("POST", "/drain", {"drain": False}),
            ("POST", "/heartbeat", HEARTBEAT),
        ):
            answer = mutated_daemon.api(method, f"/v2/nodes/{quoted}{suffix}", body)
            assert_envelope(answer, f"{method} {quoted}{suffix} -> {answer.status} {answer.text}")


def test_heartbeat_with_a_huge_float_timestamp_is_400(mutated_daemon):
    raw = json.dumps(HEARTBEAT).replace(json.dumps(HEARTBEAT["timestamp"]), "1.5e308").encode()
    answer = mutated_daemon.api("POST", "/v2/nodes/gpu-1/heartbeat", raw=raw)
    assert answer.status == 400, answer.text
    assert "$.timestamp" in answer.body["message"]


def test_registration_with_a_float_id_next_to_a_huge_integer_is_400(mutated_daemon):
    body = json.dumps({**REGISTRATION, "node_id": "@id@", "extra": "@int@"})
    raw = body.replace('"@id@"', "1e-09").replace('"@int@"', "1" + "0" * 40).encode()
    answer = mutated_daemon.api("POST", "/v2/nodes/register", raw=raw)
    assert answer.status == 400, answer.text
    assert "$.node_id" in answer.body["message"]


@pytest.mark.parametrize("path", ["/v2/nodes/register", "/v2/nodes/gpu-1/heartbeat", "/v2/placement"])
@pytest.mark.parametrize("key", ["node_id", "a field the route does not know"])
def test_body_that_is_not_utf8_is_400(mutated_daemon, path, key):
    answer = mutated_daemon.api("POST", path, raw=b'{"' + key.encode() + b'": "\xff\xfe"}')
    assert answer.status == 400, answer.text
    assert answer.body["code"] == "INVALID_PARAMS"
    assert "UTF-8" in answer.body["message"]
    assert "Traceback" not in mutated_daemon.log()

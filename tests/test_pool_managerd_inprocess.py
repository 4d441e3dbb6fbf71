"""The agent's model manifest reader and its control-plane client, driven in this process.

The same promises are tested end to end with the real agent process (test_pool_managerd*.py); these run in
about a second, so a mutation tool can run them for every mutant. Nothing is mocked: real files in a temporary
folder, real HTTP to a ScriptedControlPlane, a real TLS handshake.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from aiohttp import web
from support import REPO_ROOT, TEST_TOKEN, free_port
from support_agent import ScriptedControlPlane, TlsFront
from support_tls import write_ca, write_server_certificate

sys.path.insert(0, str(REPO_ROOT / "files" / "pool_managerd"))
from pool_managerd.control import MAX_ANSWER_BYTES, ControlPlane
from pool_managerd.models import ModelManifest
from pool_managerd.wire import (
    Capabilities,
    Heartbeat,
    HeartbeatAnswer,
    PoolStatus,
    RegisterAnswer,
    Registration,
)

# --- the model manifest ----------------------------------------------------------------------------------


def write_manifest(models_dir: Path, entries: dict | str) -> None:
    """Atomically, as staging does; a str is written verbatim (a torn manifest)."""
    temporary = models_dir / ".manifest.json.tmp"
    temporary.write_text(entries if isinstance(entries, str) else json.dumps(entries))
    os.replace(temporary, models_dir / "manifest.json")


def entry(path: str, size_bytes: int) -> dict:
    return {"path": path, "sha256": "0" * 64, "size_bytes": size_bytes}


def test_models_are_listed_sorted_only_with_their_file_at_the_recorded_size(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    (models / "b.gguf").write_bytes(b"b" * 10)
    (models / "a.gguf").write_bytes(b"a" * 10)
    (models / "short.gguf").write_bytes(b"s" * 9)
    (models / "long.gguf").write_bytes(b"l" * 11)  # growing again (a download in place): not the staged file
    (tmp_path / "abs.gguf").write_bytes(b"x" * 3)  # an absolute path outside models_dir
    write_manifest(
        models,
        {
            "org/b": entry("b.gguf", 10),
            "org/a": entry("a.gguf", 10),
            "short": entry("short.gguf", 10),
            "long": entry("long.gguf", 10),
            "missing": entry("missing.gguf", 1),
            "absolute": entry(str(tmp_path / "abs.gguf"), 3),
        },
    )
    assert ModelManifest(str(models)).available() == ["absolute", "org/a", "org/b"]


def test_a_model_whose_file_is_deleted_or_truncated_drops_out_at_the_next_read(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"a" * 10)
    (tmp_path / "b.gguf").write_bytes(b"b" * 10)
    write_manifest(tmp_path, {"a": entry("a.gguf", 10), "b": entry("b.gguf", 10)})
    manifest = ModelManifest(str(tmp_path))
    assert manifest.available() == ["a", "b"]
    with (tmp_path / "b.gguf").open("r+b") as handle:
        handle.truncate(5)
    assert manifest.available() == ["a"]
    (tmp_path / "a.gguf").unlink()
    assert manifest.available() == []
    (tmp_path / "a.gguf").write_bytes(b"a" * 10)  # staged again: back without a new manifest
    assert manifest.available() == ["a"]


def test_a_changed_manifest_is_read_again_and_a_torn_one_keeps_the_last_good(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pool_managerd.models")
    (tmp_path / "a.gguf").write_bytes(b"a")
    (tmp_path / "b.gguf").write_bytes(b"b")
    manifest = ModelManifest(str(tmp_path))
    assert manifest.available() == []  # no manifest yet: nothing, and nothing to complain about
    write_manifest(tmp_path, {"a": entry("a.gguf", 1)})
    assert manifest.available() == ["a"]
    write_manifest(tmp_path, {"a": entry("a.gguf", 1), "b": entry("b.gguf", 1)})
    assert manifest.available() == ["a", "b"]
    write_manifest(tmp_path, '{"a": {"path": "a.gg')
    assert manifest.available() == manifest.available() == ["a", "b"]
    torn = [r.getMessage() for r in caplog.records if "torn or invalid" in r.getMessage()]
    assert len(torn) == 1 and "keeping the last good one (2 models)" in torn[0], torn
    (tmp_path / "manifest.json").unlink()
    assert manifest.available() == manifest.available() == []
    gone = [r for r in caplog.records if "is gone" in r.getMessage()]
    assert len(gone) == 1 and gone[0].levelno == logging.WARNING


def test_a_bad_entry_costs_only_itself_and_is_logged_once(tmp_path, caplog):
    (tmp_path / "a.gguf").write_bytes(b"a")
    write_manifest(tmp_path, {"a": entry("a.gguf", 1), "has space": entry("a.gguf", 1)})
    manifest = ModelManifest(str(tmp_path))
    assert manifest.available() == ["a"]
    write_manifest(tmp_path, {"a": entry("a.gguf", 1), "has space": entry("a.gguf", 1), "c": entry("c", 1)})
    assert manifest.available() == ["a"]
    left_out = [r.getMessage() for r in caplog.records if "not reported" in r.getMessage()]
    assert len(left_out) == 1 and "has space" in left_out[0], left_out


def test_models_dir_that_is_a_link_reports_no_models_and_says_so_once(tmp_path, caplog):
    real = tmp_path / "real"
    real.mkdir()
    (real / "a.gguf").write_bytes(b"a")
    write_manifest(real, {"a": entry("a.gguf", 1)})
    link = tmp_path / "models"
    link.symlink_to(real)  # inside the test's tmp dir, pointing at its own folder
    manifest = ModelManifest(str(link))
    assert manifest.available() == manifest.available() == []
    refused = [r.getMessage() for r in caplog.records if "cannot be used" in r.getMessage()]
    assert len(refused) == 1 and "symbolic link" in refused[0], refused
    assert ModelManifest(str(tmp_path / "absent")).available() == []


# --- the control-plane client ----------------------------------------------------------------------------


@pytest.fixture
def control() -> Iterator[ScriptedControlPlane]:
    with ScriptedControlPlane() as plane:
        yield plane


def ask(url: str, method: str, path: str, answer_type=None, ca_file=None, timeout_s: float = 2):
    async def go():
        async with ControlPlane(url, TEST_TOKEN, timeout_s, ca_file) as client:
            return await client.request(method, path, None, answer_type)

    return asyncio.run(go())


def answering(raw: bytes, status: int = 200, **headers: str):
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(body=raw, status=status, headers={"Content-Type": "application/json", **headers})

    return handler


def test_a_contract_answer_is_decoded_and_the_token_is_sent(control):
    seen_auth = []

    async def beat(request: web.Request) -> web.StreamResponse:
        seen_auth.append(request.headers.get("Authorization"))
        return web.json_response({"next_heartbeat_ms": 250, "drain": True})

    control.heartbeat = beat
    answer = ask(control.url, "POST", "/v2/nodes/n/heartbeat", HeartbeatAnswer)
    assert answer.ok and (answer.body.next_heartbeat_ms, answer.body.drain) == (250, True)
    assert seen_auth == [f"Bearer {TEST_TOKEN}"]
    assert TEST_TOKEN not in answer.describe()


@pytest.mark.parametrize(
    ("raw", "status", "headers", "problem"),
    [
        (
            b'{"next_heartbeat_ms": "soon", "drain": false}',
            200,
            {},
            "an answer that is not a HeartbeatAnswer",
        ),
        (b"x" * (MAX_ANSWER_BYTES + 1), 200, {}, f"an answer over {MAX_ANSWER_BYTES} bytes"),
        (b"{}", 200, {"Content-Encoding": "gzip"}, "a compressed answer (not asked for)"),
    ],
    ids=["not-the-contract", "too-large", "compressed"],
)
def test_an_answer_the_agent_cannot_use_is_a_problem_not_ok(control, raw, status, headers, problem):
    control.heartbeat = answering(raw, status, **headers)
    answer = ask(control.url, "POST", "/v2/nodes/n/heartbeat", HeartbeatAnswer)
    assert not answer.ok and answer.status == status and answer.problem.startswith(problem), answer


def test_an_answer_of_exactly_the_bound_is_read(control):
    padding = MAX_ANSWER_BYTES - len(b'{"next_heartbeat_ms": 100, "drain": false, "pad": ""}')
    raw = b'{"next_heartbeat_ms": 100, "drain": false, "pad": "' + b"p" * padding + b'"}'
    assert len(raw) == MAX_ANSWER_BYTES
    control.heartbeat = answering(raw)
    assert ask(control.url, "POST", "/v2/nodes/n/heartbeat", HeartbeatAnswer).ok


def test_register_heartbeat_and_deregister_send_their_bodies_to_their_routes(control):
    registration = Registration(
        node_id="n1",
        address="http://n1:8000",
        pools=[],
        capabilities=Capabilities(gpus=[], cpu_cores=2, ram_total_bytes=1),
    )
    pool = PoolStatus(
        pool_id="p",
        ready=True,
        draining=False,
        slots_total=1,
        slots_free=1,
        vram_total_bytes=2,
        vram_free_bytes=1,
    )
    beat = Heartbeat(timestamp="2026-01-01T00:00:00Z", pools=[pool])

    async def go():
        async with ControlPlane(control.url, TEST_TOKEN, 2) as client:
            return (
                await client.register(registration),
                await client.heartbeat("n1", beat),
                await client.deregister("n1", 1),
            )

    registered, beaten, deregistered = asyncio.run(go())
    assert registered.ok and registered.body.node_id == "n1" and registered.body.node_timeout_ms == 3000
    assert beaten.ok and beaten.body.next_heartbeat_ms == 100 and beaten.body.drain is False
    assert (deregistered.ok, deregistered.status) == (True, 204)
    seen = [(s.method, s.path, json.loads(s.body) if s.body else None) for s in control.seen]
    assert seen == [
        ("POST", "/v2/nodes/register", json.loads(msgspec.json.encode(registration))),
        ("POST", "/v2/nodes/n1/heartbeat", json.loads(msgspec.json.encode(beat))),
        ("DELETE", "/v2/nodes/n1", None),
    ]


async def announced_huge(request: web.Request) -> web.StreamResponse:
    """A Content-Length over the bound with a short body: refused on the header, before any byte is read."""
    response = web.StreamResponse(status=200, headers={"Content-Length": str(MAX_ANSWER_BYTES + 1)})
    await response.prepare(request)
    await response.write(b"{")
    return response


async def trickled(request: web.Request) -> web.StreamResponse:
    """A valid answer sent in many small writes, as a slow proxy would."""
    response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
    await response.prepare(request)
    raw = b'{"next_heartbeat_ms": 700, "drain": false, "pad": "' + b"p" * 4000 + b'"}'
    for start in range(0, len(raw), 500):
        await response.write(raw[start : start + 500])
        await asyncio.sleep(0.01)
    return response


def test_an_announced_huge_answer_is_refused_on_its_header(control):
    control.heartbeat = announced_huge
    answer = ask(control.url, "POST", "/v2/nodes/n/heartbeat", HeartbeatAnswer)
    assert (answer.ok, answer.status) == (False, 200)
    assert answer.problem == f"an answer over {MAX_ANSWER_BYTES} bytes"


def test_an_answer_in_many_pieces_is_read_whole(control):
    control.heartbeat = trickled
    answer = ask(control.url, "POST", "/v2/nodes/n/heartbeat", HeartbeatAnswer)
    assert answer.ok and answer.body.next_heartbeat_ms == 700, answer


def test_the_client_asks_for_uncompressed_answers_only(control):
    asked = []

    async def beat(request: web.Request) -> web.StreamResponse:
        asked.append(request.headers.get("Accept-Encoding"))
        return web.json_response({"next_heartbeat_ms": 100, "drain": False})

    control.heartbeat = beat
    assert ask(control.url, "POST", "/v2/nodes/n/heartbeat", HeartbeatAnswer).ok
    assert asked == ["identity"]


def test_an_error_envelope_is_described_with_its_code_and_message(control):
    control.register = answering(b'{"code": "INVALID_PARAMS", "message": "pools[0]: bad"}', 400)
    answer = ask(control.url, "POST", "/v2/nodes/register", RegisterAnswer)
    assert (answer.ok, answer.status) == (False, 400)
    assert answer.describe() == "HTTP 400 'INVALID_PARAMS': 'pools[0]: bad'"


def test_a_redirect_is_not_followed(control):
    with ScriptedControlPlane() as elsewhere:

        async def redirect(request: web.Request) -> web.StreamResponse:
            raise web.HTTPFound(f"{elsewhere.url}/v2/nodes/register?sig=secret")

        control.register = redirect
        answer = ask(control.url, "POST", "/v2/nodes/register", RegisterAnswer)
        assert elsewhere.seen == []
    assert (answer.ok, answer.status) == (False, 302)
    assert answer.problem.startswith(f"a redirect to '{elsewhere.url}/v2/nodes/register'"), answer.problem
    assert "sig=secret" not in answer.problem


def test_no_answer_is_status_none_with_the_reason():
    refused = ask(f"http://127.0.0.1:{free_port()}", "POST", "/v2/nodes/register", RegisterAnswer)
    assert (refused.ok, refused.status) == (False, None) and refused.problem.startswith("cannot connect")


def test_a_hung_answer_times_out_within_the_request_timeout(control):
    async def hang(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(3600)
        return web.Response(status=204)

    control.deregister = hang
    answer = ask(control.url, "DELETE", "/v2/nodes/n", timeout_s=0.3)
    assert (answer.ok, answer.status, answer.problem) == (False, None, "no answer within 0.3 s")


def test_tls_is_verified_against_the_ca_file(control, tmp_path):
    ca = write_ca(tmp_path / "ca.pem")
    write_server_certificate(ca, tmp_path / "server.pem", tmp_path / "server-key.pem")
    write_ca(tmp_path / "other-ca.pem", "some other CA")
    registered = (
        b'{"node_id": "n", "status": "online", "heartbeat_interval_ms": 100, "node_timeout_ms": 3000}'
    )
    control.register = answering(registered)
    with TlsFront(control.port, tmp_path / "server.pem", tmp_path / "server-key.pem") as front:
        trusted = ask(front.url, "POST", "/v2/nodes/register", RegisterAnswer, ca_file=tmp_path / "ca.pem")
        untrusted = ask(
            front.url, "POST", "/v2/nodes/register", RegisterAnswer, ca_file=tmp_path / "other-ca.pem"
        )
    assert trusted.ok and trusted.body.heartbeat_interval_ms == 100 and not trusted.untrusted_certificate
    assert (untrusted.ok, untrusted.status, untrusted.untrusted_certificate) == (False, None, True)
    assert untrusted.problem == "certificate not trusted: 'unable to get local issuer certificate'"
    assert len(control.registrations) == 1  # only the trusted handshake reached the server

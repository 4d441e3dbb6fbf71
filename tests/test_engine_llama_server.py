"""The real llama-server, from the cached build, serves the tiny model: health, completions, SSE, slots, keys.

One engine is started for the module (loading takes well under a second, but the build behind it is the
expensive part, and it is cached outside the clone by scripts/build-engine.sh).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import wait_until
from support_engine import (
    BUILD_TIMEOUT_S,
    ENGINE_API_KEY,
    Engine,
    engine_archive,
    make_tiny_model,
    unpack_engine,
    write_key_file,
)

MAX_TOKENS = 8
PARALLEL_SLOTS = 2

# The first test may build llama-server (minutes, once per machine) before it starts its clock.
pytestmark = pytest.mark.timeout(BUILD_TIMEOUT_S)


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Iterator[Engine]:
    workdir = tmp_path_factory.mktemp("engine")
    binary = unpack_engine(engine_archive(), workdir)
    model = make_tiny_model(workdir / "tiny.gguf")
    key_file = write_key_file(workdir / "api-key")
    running = Engine(binary, model, key_file, workdir / "llama-server.log", parallel=PARALLEL_SLOTS).start()
    yield running
    running.stop()


def chat_request(**extra) -> dict:
    # ignore_eos: random weights may pick the end-of-text token at any step; the count must be exact.
    return {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": MAX_TOKENS,
        "ignore_eos": True,
        **extra,
    }


def test_health_is_ok_once_the_model_is_loaded(engine):
    answer = engine.api("GET", "/health", key=None)
    assert answer.status == 200, answer.text
    assert answer.body == {"status": "ok"}
    assert engine.healthy_after_s < 60


def test_chat_completion_answers_max_tokens_in_openai_shape(engine):
    answer = engine.api("POST", "/v1/chat/completions", chat_request())
    assert answer.status == 200, answer.text
    body = answer.body
    assert body["object"] == "chat.completion"
    assert body["id"] and isinstance(body["created"], int)
    assert body["model"] == "tiny"
    [choice] = body["choices"]
    assert choice["index"] == 0
    assert choice["finish_reason"] == "length"
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert body["usage"]["completion_tokens"] == MAX_TOKENS
    assert body["usage"]["prompt_tokens"] > 0
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + MAX_TOKENS


def test_streamed_chat_completion_sends_chunks_then_done(engine):
    payloads = list(engine.stream("/v1/chat/completions", chat_request(stream=True)))
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(payload) for payload in payloads[:-1]]
    assert chunks and all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert len({chunk["id"] for chunk in chunks}) == 1, "every chunk belongs to one completion"
    finish_reasons = [chunk["choices"][0]["finish_reason"] for chunk in chunks if chunk["choices"]]
    assert finish_reasons[-1] == "length"
    content_deltas = [
        chunk["choices"][0]["delta"]["content"]
        for chunk in chunks
        if chunk["choices"] and chunk["choices"][0]["delta"].get("content") is not None
    ]
    # One delta per generated token at most (a token can be part of a UTF-8 character, sent later).
    assert 0 < len(content_deltas) <= MAX_TOKENS


def test_slots_report_each_parallel_slot_idle_after_the_work(engine):
    assert engine.api("POST", "/v1/chat/completions", chat_request()).status == 200

    def idle_slots():
        answer = engine.api("GET", "/slots")
        assert answer.status == 200, answer.text
        return answer.body if not any(slot["is_processing"] for slot in answer.body) else None

    slots = wait_until(idle_slots, timeout=10, what="every slot idle")
    assert sorted(slot["id"] for slot in slots) == list(range(PARALLEL_SLOTS))
    assert all(slot["n_ctx"] > 0 for slot in slots)


def test_metrics_count_the_generated_tokens(engine):
    assert engine.api("POST", "/v1/chat/completions", chat_request()).status == 200
    answer = engine.api("GET", "/metrics")
    assert answer.status == 200, answer.text
    counters = {
        name: float(value)
        for name, _, value in (line.partition(" ") for line in answer.text.splitlines())
        if name and not name.startswith("#")
    }
    assert counters["llamacpp:tokens_predicted_total"] >= MAX_TOKENS
    assert "llamacpp:requests_processing" in counters


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/slots", "/metrics", "/v1/models"])
def test_requests_without_the_key_are_401(engine, path):
    method, body = ("POST", chat_request()) if path == "/v1/chat/completions" else ("GET", None)
    assert engine.api(method, path, body, key=None).status == 401
    assert engine.api(method, path, body, key="wrong-" + ENGINE_API_KEY).status == 401


def test_the_key_is_in_no_argv_and_no_environment(engine):
    proc = Path("/proc") / str(engine.process.pid)
    assert ENGINE_API_KEY.encode() not in (proc / "cmdline").read_bytes()
    assert ENGINE_API_KEY.encode() not in (proc / "environ").read_bytes()
    assert os.stat(engine.key_file).st_mode & 0o777 == 0o600


def test_the_engine_log_never_shows_the_key(engine):
    assert engine.api("GET", "/slots", key="wrong-" + ENGINE_API_KEY).status == 401
    assert ENGINE_API_KEY not in engine.log_path.read_text(errors="replace")

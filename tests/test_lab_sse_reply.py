"""lab/sse_reply.py: what `make lab` prints of the completion streamed through the controller's gateway.

Each test feeds the script a stream shaped as llama-server sends it (a role-only first chunk, content chunks,
a finish chunk, [DONE]) or as the gateway ends a broken one, the way lab/up.sh pipes curl into it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "lab" / "sse_reply.py"


def run(stream: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "0"], input=stream, capture_output=True, text=True, timeout=30
    )


def event(payload: object) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def chunk(content: str | None = None, finish: str | None = None) -> str:
    delta = {"role": "assistant"} if content is None and finish is None else {"content": content or ""}
    return event(
        {
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
    )


def test_a_whole_stream_prints_the_reply_text_and_the_chunk_count():
    result = run(chunk() + chunk("Hel") + chunk("lo, lab") + chunk(finish="length") + "data: [DONE]\n\n")
    assert result.returncode == 0, result.stdout
    first, reply = result.stdout.splitlines()
    assert first.startswith("streamed 4 chunks; first token after ")
    assert reply == '  "Hello, lab"'


def test_the_gateways_error_event_after_the_first_token_fails_the_run_and_is_shown():
    error = {
        "message": "engine stream broke",
        "type": "server_error",
        "param": None,
        "code": "engine_stream_broken",
    }
    result = run(chunk("Hel") + event({"error": error}))
    assert result.returncode == 1
    assert "engine_stream_broken" in result.stdout and "error event" in result.stdout


def test_an_openai_shaped_refusal_instead_of_a_stream_is_printed_as_it_came():
    body = {
        "error": {
            "message": "invalid API key",
            "type": "authentication_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }
    result = run(json.dumps(body) + "\n")
    assert result.returncode == 1
    assert result.stdout.startswith("no stream came back; the answer was: ")
    assert "invalid_api_key" in result.stdout


def test_a_stream_cut_short_without_done_fails_the_run():
    result = run(chunk("Hel") + chunk("lo"))
    assert result.returncode == 1
    assert result.stdout.strip() == "the stream ended after 2 chunks without [DONE]"


def test_a_line_past_the_bound_stops_the_reading():
    result = run("data: " + "x" * 70_000 + "\n")
    assert result.returncode == 1
    assert "stopped reading" in result.stdout

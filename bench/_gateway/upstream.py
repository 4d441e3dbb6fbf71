"""A minimal stand-in for llama-server's OpenAI routes: the floor every gateway leg shares.

`POST /v1/chat/completions` and `POST /v1/completions` answer in llama-server's shapes. Streamed: a role-only
first chunk, `--tokens` content chunks, a finish chunk, `data: [DONE]`, each its own write (a real engine
sends each token as it is decoded). Not streamed: one JSON object holding the same text. No work beyond the
framing, so what the legs add on top of it is the proxy's or the daemon's own cost.
"""

from __future__ import annotations

import argparse
import json

from aiohttp import web

CREATED = 1767225600  # fixed: the answer's bytes are the same on every leg


def chunk(kind: str, delta_or_text: dict | str, finish_reason: str | None) -> bytes:
    if kind == "chat":
        choice = {"finish_reason": finish_reason, "index": 0, "delta": delta_or_text}
        body = {"choices": [choice], "created": CREATED, "id": "chatcmpl-bench", "model": "bench"}
        body["object"] = "chat.completion.chunk"
    else:
        choice = {"finish_reason": finish_reason, "index": 0, "text": delta_or_text}
        body = {"choices": [choice], "created": CREATED, "id": "cmpl-bench", "model": "bench"}
        body["object"] = "text_completion"
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


def stream_frames(kind: str, tokens: int) -> list[bytes]:
    """The frames of one streamed answer, built once: role-only preamble, tokens, finish, [DONE]."""
    if kind == "chat":
        frames = [chunk(kind, {"role": "assistant", "content": None}, None)]
        frames += [chunk(kind, {"content": f" tok{n}"}, None) for n in range(tokens)]
        frames.append(chunk(kind, {}, "length"))
    else:
        frames = [chunk(kind, f" tok{n}", None) for n in range(tokens)]
        frames.append(chunk(kind, "", "length"))
    frames.append(b"data: [DONE]\n\n")
    return frames


def whole_answer(kind: str, tokens: int) -> bytes:
    text = "".join(f" tok{n}" for n in range(tokens))
    if kind == "chat":
        choice = {"finish_reason": "length", "index": 0, "message": {"role": "assistant", "content": text}}
    else:
        choice = {"finish_reason": "length", "index": 0, "text": text}
    usage = {"completion_tokens": tokens, "prompt_tokens": 4, "total_tokens": tokens + 4}
    return json.dumps({"choices": [choice], "created": CREATED, "id": "bench", "usage": usage}).encode()


def make_app(tokens: int) -> web.Application:
    frames = {kind: stream_frames(kind, tokens) for kind in ("chat", "text")}
    answers = {kind: whole_answer(kind, tokens) for kind in ("chat", "text")}

    def handler(kind: str):
        async def answer(request: web.Request) -> web.StreamResponse:
            body = json.loads(await request.read())
            if not body.get("stream"):
                return web.Response(body=answers[kind], content_type="application/json")
            response = web.StreamResponse(
                headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
            )
            await response.prepare(request)
            for frame in frames[kind]:
                await response.write(frame)
            await response.write_eof()
            return response

        return answer

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler("chat"))
    app.router.add_post("/v1/completions", handler("text"))
    app.router.add_get("/health", lambda request: web.json_response({"status": "ok"}))
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tokens", type=int, required=True)
    args = parser.parse_args()
    # reuse_port: the bench may start one such process per upstream CPU on the same port.
    web.run_app(
        make_app(args.tokens),
        host="127.0.0.1",
        port=args.port,
        access_log=None,
        print=None,
        reuse_port=True,
    )


if __name__ == "__main__":
    main()

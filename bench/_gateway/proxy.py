"""The baseline the daemon is held to: a minimal aiohttp pass-through proxy, no auth, no routing, no queue.

Every POST goes to the one upstream with its body as it came; the answer's status and Content-Type come
back, its body copied chunk by chunk as it arrives (what a streaming gateway must do at the least).
"""

from __future__ import annotations

import argparse

import aiohttp
from aiohttp import web


def make_app(upstream: str) -> web.Application:
    async def session_ctx(app: web.Application):
        # No pool limit: the load generator bounds the connections, as it does for the daemon.
        connector = aiohttp.TCPConnector(limit=0)
        app["session"] = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        yield
        await app["session"].close()

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
        session: aiohttp.ClientSession = request.app["session"]
        async with session.post(upstream + request.path, data=body, headers=headers) as answer:
            response = web.StreamResponse(status=answer.status)
            response.content_type = answer.content_type
            await response.prepare(request)
            async for piece in answer.content.iter_any():
                await response.write(piece)
            await response.write_eof()
            return response

    app = web.Application()
    app.cleanup_ctx.append(session_ctx)
    app.router.add_post("/v1/{tail:.*}", forward)
    app.router.add_get("/health", lambda request: web.json_response({"status": "ok"}))
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="http://host:port of the stand-in engine")
    args = parser.parse_args()
    web.run_app(make_app(args.upstream), host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()

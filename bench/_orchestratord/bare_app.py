"""The floor the daemon is measured against: a bare aiohttp app with no auth, validation or storage.

heartbeat mode: parse the JSON body with the standard library and keep it in a dict.
placement mode: parse the JSON body and answer a fixed pick.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent))
from certs import server_context

FIXED_PICK = {
    "node_id": "bench-00000",
    "pool_id": "pool-0",
    "address": "http://bench:8080",
    "strategy": "least-loaded",
}


def make_app(mode: str) -> web.Application:
    last_heartbeat: dict[str, dict] = {}

    async def heartbeat(request: web.Request) -> web.Response:
        last_heartbeat[request.match_info["node_id"]] = json.loads(await request.read())
        return web.json_response({"next_heartbeat_ms": 5000, "drain": False})

    async def placement(request: web.Request) -> web.Response:
        json.loads(await request.read())
        return web.json_response(FIXED_PICK)

    app = web.Application()
    if mode == "heartbeat":
        app.router.add_post("/v2/nodes/{node_id}/heartbeat", heartbeat)
    else:
        app.router.add_post("/v2/placement", placement)
    app.router.add_get("/health", lambda request: web.json_response({"status": "ok"}))
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mode", choices=["heartbeat", "placement"], required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert", help="serve HTTPS with this certificate (and --key), as orchestratord does")
    parser.add_argument("--key")
    args = parser.parse_args()
    context = server_context(Path(args.cert), Path(args.key)) if args.cert else None
    app = make_app(args.mode)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None, ssl_context=context)


if __name__ == "__main__":
    main()

"""The heartbeat load every heartbeat bench sends: 1,000 registered nodes (2 pools, 3 models each),
each heartbeat changing a pool's free slots, so the placement index moves on every request.

One home for the bodies, the registrations and the wrk script, so that bench/heartbeat.py (daemon
against bare aiohttp) and bench/store_heartbeat.py (SQLite against PostgreSQL) measure the same work.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import harness

NODES = 1000
CONNECTIONS = 64
MODELS = ["llama-3.1-8b", "qwen2.5-7b", "mistral-7b"]
SLOT_STEPS = 5  # each node's heartbeats cycle through this many free-slot readings


def node_id(number: int) -> str:
    return f"bench-{number:04d}"


def heartbeat_bodies() -> list[str]:
    return [
        json.dumps(
            harness.heartbeat_body(
                [
                    harness.pool_status("pool-0", 8 - step, 60, MODELS),
                    harness.pool_status("pool-1", 8, 70, MODELS),
                ]
            )
        )
        for step in range(SLOT_STEPS)
    ]


def seed(daemon: harness.Daemon) -> float:
    """Register every node and send its first heartbeat over HTTP; the seconds it took."""
    first_beat = json.loads(heartbeat_bodies()[0])
    nodes = [(harness.registration(node_id(n), pools=2), first_beat) for n in range(NODES)]
    return harness.seed_nodes(daemon.url, daemon.token, nodes)


def write_lua(path: Path, token: str | None) -> Path:
    """wrk's script: node after node, round robin, each visit with the next free-slot reading."""
    bodies = ", ".join(harness.lua_string(body) for body in heartbeat_bodies())
    auth = f'wrk.headers["Authorization"] = {harness.lua_string("Bearer " + token)}' if token else ""
    path.write_text(
        f"""
local ids = {{}}
for i = 0, {NODES - 1} do ids[#ids + 1] = string.format("bench-%04d", i) end
local bodies = {{ {bodies} }}
local counter = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
{auth}
request = function()
  local node = counter % {NODES}
  local visit = math.floor(counter / {NODES})
  counter = counter + 1
  local body = bodies[(visit % {SLOT_STEPS}) + 1]
  return wrk.format(nil, "/v2/nodes/" .. ids[node + 1] .. "/heartbeat", nil, body)
end
"""
    )
    path.chmod(0o600)
    return path

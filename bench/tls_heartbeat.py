"""Heartbeats over TLS with a credential per node, against a bare aiohttp app behind the same TLS settings.

The deployed shape of issue 15: orchestratord serves HTTPS (its own tls.py context: the library's server
defaults, TLS 1.2 at least), each of the nodes joins with one join credential (`uses` = the node count),
gets its own node token, registers and heartbeats with it. First the join of every node is timed, from the
bootstrap secret to the node online (each join and each registration is a committed, fsynced write). Then
wrk drives authenticated heartbeats, each node with its own token, over keep-alive connections (a handshake
is not paid per heartbeat), alternating with the bare app behind the same certificate and TLS settings.
Server pinned to CPU 0, wrk to CPU 1. A round with any answer that is not 2xx fails the bench.

    python bench/tls_heartbeat.py [--nodes 1000] [--duration 4] [--rounds 6]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _orchestratord import certs, harness
from heartbeat import CONNECTIONS, SLOT_STEPS, heartbeat_bodies


async def join_all(daemon: harness.Daemon, count: int, concurrency: int = 32) -> tuple[dict[str, str], dict]:
    """Every node joins with one shared join credential, registers and heartbeats once with its own token.
    Returns the node tokens and the phases' seconds."""
    admin = {"Authorization": f"Bearer {daemon.token}"}
    limit = asyncio.Semaphore(concurrency)
    tokens: dict[str, str] = {}
    joined_s: list[float] = []
    beat = json.loads(heartbeat_bodies()[0])
    connector = aiohttp.TCPConnector(ssl=daemon.client_context)
    async with aiohttp.ClientSession(connector=connector) as session:
        asked = {"name": "bench-join", "scope": "join", "uses": count, "ttl_s": 3600}
        async with session.post(f"{daemon.url}/v2/credentials", json=asked, headers=admin) as answer:
            if answer.status != 201:
                sys.exit(f"issuing the join credential: {answer.status} {await answer.text()}")
            join_secret = (await answer.json())["secret"]
        started = time.perf_counter()

        async def one(node_id: str) -> None:
            async with limit:
                headers = {"Authorization": f"Bearer {join_secret}"}
                async with session.post(
                    f"{daemon.url}/v2/join", json={"node_id": node_id}, headers=headers
                ) as answer:
                    if answer.status != 200:
                        raise RuntimeError(f"join {node_id}: {answer.status} {await answer.text()}")
                    tokens[node_id] = (await answer.json())["node_token"]
                joined_s.append(time.perf_counter() - started)
                own = {"Authorization": f"Bearer {tokens[node_id]}"}
                registration = harness.registration(node_id, pools=2)
                async with session.post(
                    f"{daemon.url}/v2/nodes/register", json=registration, headers=own
                ) as answer:
                    if answer.status != 200:
                        raise RuntimeError(f"register {node_id}: {answer.status} {await answer.text()}")
                async with session.post(
                    f"{daemon.url}/v2/nodes/{node_id}/heartbeat", json=beat, headers=own
                ) as answer:
                    if answer.status != 200:
                        raise RuntimeError(f"heartbeat {node_id}: {answer.status} {await answer.text()}")

        await asyncio.gather(*(one(f"bench-{n:04d}") for n in range(count)))
        online_s = time.perf_counter() - started
    return tokens, {"joins_s": max(joined_s), "online_s": online_s}


def write_lua(path: Path, tokens: dict[str, str] | None, count: int) -> Path:
    """Each node's heartbeats with its own token (None: no Authorization, for the bare app)."""
    bodies = ", ".join(harness.lua_string(body) for body in heartbeat_bodies())
    ids = [f"bench-{n:04d}" for n in range(count)]
    auth = ", ".join(harness.lua_string("Bearer " + tokens[node_id]) for node_id in ids) if tokens else ""
    path.write_text(
        f"""
local ids = {{ {", ".join(harness.lua_string(node_id) for node_id in ids)} }}
local auth = {{ {auth} }}
local bodies = {{ {bodies} }}
local counter = 0
request = function()
  local node = counter % {count}
  local visit = math.floor(counter / {count})
  counter = counter + 1
  local headers = {{ ["Content-Type"] = "application/json" }}
  if #auth > 0 then headers["Authorization"] = auth[node + 1] end
  return wrk.format("POST", "/v2/nodes/" .. ids[node + 1] .. "/heartbeat", headers,
                    bodies[(visit % {SLOT_STEPS}) + 1])
end
"""
    )
    path.chmod(0o600)  # it holds the node tokens
    return path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, default=1000, help="nodes that join and heartbeat (1000)")
    parser.add_argument("--duration", type=int, default=4, help="seconds per measured run (default 4)")
    parser.add_argument("--rounds", type=int, default=6, help="alternating daemon/bare rounds (default 6)")
    args = parser.parse_args()
    harness.require_tools()
    print(
        f"TLS heartbeat benchmark: {args.nodes} nodes with their own tokens, {CONNECTIONS} keep-alive "
        f"connections, {harness.machine_note()}"
    )
    with harness.scratch_dir("tls-bench-") as scratch, harness.scratch_dir("tls-db-", memory=False) as db_dir:
        scratch, db_dir = Path(scratch), Path(db_dir)
        ca, cert, key = certs.write_ca_and_server(scratch)
        daemon = harness.Daemon(
            scratch,
            db_dir,
            ca_file=ca,
            tls_cert_file=str(cert),
            tls_key_file=str(key),
            tls_ca_file=str(ca),
            node_timeout_ms=600_000,
            heartbeat_interval_ms=5000,
        )
        bare = harness.BareApp("heartbeat", tls=(ca, cert, key))
        try:
            tokens, phases = asyncio.run(join_all(daemon, args.nodes))
            print(
                f"join of {args.nodes} nodes over TLS: every join answered after {phases['joins_s']:.1f} s, "
                f"every node registered and online after {phases['online_s']:.1f} s "
                f"({args.nodes / phases['online_s']:.0f} nodes/s; 32 at a time)"
            )
            daemon_script = write_lua(scratch / "daemon.lua", tokens, args.nodes)
            bare_script = write_lua(scratch / "bare.lua", None, args.nodes)
            daemon_runs, bare_runs = harness.paired_rounds(
                daemon, daemon_script, bare, bare_script, args.rounds, args.duration, CONNECTIONS, " over TLS"
            )
            online = harness.online_count(daemon.url, daemon.token, daemon.client_context)
        finally:
            daemon.stop()
            bare.stop()

    pairs = list(zip(daemon_runs, bare_runs, strict=True))
    print(f"median of {args.rounds} rounds of {args.duration} s, both over TLS with keep-alive:")
    print("  " + harness.describe("orchestratord", harness.median_result(daemon_runs)))
    print("  " + harness.describe("bare aiohttp", harness.median_result(bare_runs)))
    throughput = statistics.median(d.requests_per_s / b.requests_per_s for d, b in pairs)
    efficiency = statistics.median(
        b.server_cpu_us_per_request / d.server_cpu_us_per_request for d, b in pairs
    )
    print(f"  throughput daemon/bare       {throughput:.2f}  (goal >= 0.85)")
    print(f"  CPU efficiency daemon/bare   {efficiency:.2f}  (bare's CPU per request / the daemon's)")
    print(f"  nodes online at the end: {online} of {args.nodes}")


if __name__ == "__main__":
    main()

"""Placement throughput at 1,000 and 10,000 online nodes, against a bare aiohttp app in the same run.

Every node has one pool holding the benchmarked model among others, with seeded-random free slots and
VRAM (some pools full), so least-loaded has a real order to keep. wrk (one thread, 64 connections)
asks `{"model_id": ...}` with the default strategy. Server pinned to CPU 0, wrk to CPU 1. The bare app
parses the same body and answers a fixed pick. Prints req/s, p50/p99 and ratios.

    python bench/placement.py [--duration 4] [--rounds 4] [--strategy least-loaded]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _orchestratord import harness

SIZES = (1_000, 10_000)
CONNECTIONS = 64
MODEL = "llama-3.1-8b"
OTHER_MODELS = ["qwen2.5-7b", "mistral-7b", "phi-3-mini", "gemma-2-9b"]


def seeded_nodes(count: int) -> list[tuple[dict, dict]]:
    rng = harness.rng(count)
    nodes = []
    for n in range(count):
        models = [MODEL, *rng.sample(OTHER_MODELS, 2)]
        pool = harness.pool_status("pool-0", rng.randint(0, 8), rng.randint(4, 76), models)
        nodes.append((harness.registration(f"bench-{n:05d}", pools=1), harness.heartbeat_body([pool])))
    return nodes


def write_lua(path: Path, token: str | None, strategy: str) -> Path:
    body = json.dumps({"model_id": MODEL, "strategy": strategy})
    auth = f'wrk.headers["Authorization"] = {harness.lua_string("Bearer " + token)}' if token else ""
    path.write_text(
        f"""
wrk.method = "POST"
wrk.path = "/v2/placement"
wrk.body = {harness.lua_string(body)}
wrk.headers["Content-Type"] = "application/json"
{auth}
"""
    )
    path.chmod(0o600)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=int, default=4, help="seconds per measured run (default 4)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds over all targets (default 4)")
    parser.add_argument(
        "--strategy", default="least-loaded", choices=["least-loaded", "round-robin", "random"]
    )
    args = parser.parse_args()
    harness.require_tools()
    print(f"placement benchmark ({args.strategy}): {CONNECTIONS} connections, {harness.machine_note()}")

    with harness.scratch_dir("pl-bench-", memory=True) as scratch:
        scratch = Path(scratch)
        targets: dict[str, tuple[str, Path, int]] = {}
        servers = []
        try:
            for size in SIZES:
                workdir = scratch / f"daemon-{size}"
                workdir.mkdir()
                # The database lives in memory here: placement never writes, and seeding 10,000
                # fsynced registrations on a disk would only make the setup slow.
                daemon = harness.Daemon(workdir, workdir, node_timeout_ms=3_600_000)
                servers.append(daemon)
                seconds = harness.seed_nodes(daemon.url, daemon.token, seeded_nodes(size))
                online = harness.online_count(daemon.url, daemon.token)
                print(f"{size} nodes registered and online over HTTP in {seconds:.1f} s ({online} online)")
                script = write_lua(workdir / "placement.lua", daemon.token, args.strategy)
                targets[f"orchestratord {size} nodes"] = (daemon.url, script, daemon.proc.pid)
            bare = harness.BareApp("placement")
            servers.append(bare)
            targets["bare aiohttp"] = (
                bare.url,
                write_lua(scratch / "bare.lua", None, args.strategy),
                bare.proc.pid,
            )

            for url, script, pid in targets.values():
                harness.run_wrk(url, script, 2, CONNECTIONS, pid)  # warm-up
            runs: dict[str, list[harness.WrkResult]] = {name: [] for name in targets}
            for round_number in range(1, args.rounds + 1):
                print(f"round {round_number}:")
                for name, (url, script, pid) in targets.items():
                    runs[name].append(harness.run_wrk(url, script, args.duration, CONNECTIONS, pid))
                    print("  " + harness.describe(name, runs[name][-1]))
        finally:
            for server in servers:
                server.stop()

    medians = {name: harness.median_result(results) for name, results in runs.items()}
    print(f"median of {args.rounds} rounds of {args.duration} s:")
    for name, result in medians.items():
        print("  " + harness.describe(name, result))
    small_runs, large_runs = runs[f"orchestratord {SIZES[0]} nodes"], runs[f"orchestratord {SIZES[1]} nodes"]
    rounds = list(zip(small_runs, large_runs, runs["bare aiohttp"], strict=True))
    ratios = [
        (
            "throughput 10k nodes / bare",
            [big.requests_per_s / bare.requests_per_s for _, big, bare in rounds],
            "goal >= 0.70",
        ),
        (
            "throughput 10k / 1k nodes",
            [big.requests_per_s / one.requests_per_s for one, big, _ in rounds],
            "goal >= 0.90",
        ),
        (
            "CPU per decision 10k / 1k nodes",
            [big.server_cpu_us_per_request / one.server_cpu_us_per_request for one, big, _ in rounds],
            "1.00 = independent of size",
        ),
        (
            "CPU efficiency 10k nodes vs bare",
            [bare.server_cpu_us_per_request / big.server_cpu_us_per_request for _, big, bare in rounds],
            "bare's CPU per request / the daemon's",
        ),
    ]
    print("ratios, median over the rounds (each round runs the three targets back to back):")
    for label, values, note in ratios:
        print(f"  {label:<34} {statistics.median(values):.2f}  ({note})")


if __name__ == "__main__":
    main()

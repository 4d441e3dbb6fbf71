"""Placement throughput at 1,000 and 10,000 online nodes, against a bare aiohttp app in the same run,
and placement as it runs: a mixed fleet, mixed requests and heartbeats arriving during the rounds.

Plain rows (the ratios with goals): every node has one pool holding the benchmarked model among others,
with seeded-random free slots and VRAM (some pools full), so least-loaded has a real order to keep. wrk
(one thread, 64 connections) asks `{"model_id": ...}` with the chosen strategy. The bare app parses the
same body and answers a fixed pick.

Mixed rows (their own daemon, 10,000 nodes): three in four nodes have an 80 GiB card, one in four a
24 GiB card; each node holds two or three of five models; the requests cycle over every model, without
`vram_bytes` and with 16 and 40 GiB (which no 24 GiB card fits), plus one with no model. Meanwhile a
second wrk sends heartbeats for random nodes (HB_CONNECTIONS = 32 connections, HB_DELAY_MS = 12 ms apart
on each: about 2,000/s, what 10,000 agents send at the default 5 s interval, when an answer takes 4 ms; the
rate reached is printed), each with new free slots and VRAM, so least-loaded meets stale heap entries and
pools leaving and entering the index. Its database is in memory (/dev/shm) like the plain daemons': the
once-a-second write-back runs its SQL, without the disk's fsync.

Server pinned to CPU 0, wrk to CPU 1. Prints req/s, p50/p99, server CPU per request and ratios; a round
with any answer that is not 2xx (placement or heartbeat) fails the bench instead.

    python bench/placement.py [--duration 4] [--rounds 4] [--strategy least-loaded]
"""

from __future__ import annotations

import argparse
import dataclasses
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

MIXED_NODES = 10_000
MIXED_MODELS = [MODEL, *OTHER_MODELS]
MIXED_VRAM_NEEDS_GIB = (None, 16, 40)
CARDS = {"big": (80, 4, 76), "small": (24, 2, 22)}  # total GiB, and the range of free GiB a pool reports
# Heartbeats during the mixed rounds: per connection one every HB_DELAY_MS plus the answer's latency.
HB_CONNECTIONS = 32
HB_DELAY_MS = 12
MIXED_LABEL = "mixed 10k + heartbeats"
BEATS_LABEL = "  heartbeats meanwhile"


def seeded_nodes(count: int) -> list[tuple[dict, dict]]:
    rng = harness.rng(count)
    nodes = []
    for n in range(count):
        models = [MODEL, *rng.sample(OTHER_MODELS, 2)]
        pool = harness.pool_status("pool-0", rng.randint(0, 8), rng.randint(4, 76), models)
        nodes.append((harness.registration(f"bench-{n:05d}", pools=1), harness.heartbeat_body([pool])))
    return nodes


def mixed_fleet(count: int) -> tuple[list[tuple[dict, dict]], list[tuple[str, tuple[str, ...]]]]:
    """The mixed daemon's nodes (registration, first heartbeat) and each node's (card, models)."""
    rng = harness.rng(count + 1)
    nodes, shapes = [], []
    for n in range(count):
        card = "big" if rng.random() < 0.75 else "small"
        total_gib, low_gib, high_gib = CARDS[card]
        models = tuple(rng.sample(MIXED_MODELS, rng.choice((2, 3))))
        registration = harness.registration(f"mixed-{n:05d}", pools=1)
        gpu = registration["capabilities"]["gpus"][0]
        gpu["vram_total_bytes"] = total_gib * 1024**3
        if card == "small":
            gpu["name"] = "NVIDIA L4"
        pool = harness.pool_status(
            "pool-0", rng.randint(0, 8), rng.randint(low_gib, high_gib), list(models), total_gib
        )
        nodes.append((registration, harness.heartbeat_body([pool])))
        shapes.append((card, models))
    return nodes, shapes


def mixed_placement_bodies(strategy: str) -> list[str]:
    bodies = []
    for model in MIXED_MODELS:
        for need_gib in MIXED_VRAM_NEEDS_GIB:
            body = {"model_id": model, "strategy": strategy}
            if need_gib is not None:
                body["vram_bytes"] = need_gib * 1024**3
            bodies.append(json.dumps(body))
    bodies.append(json.dumps({"strategy": strategy}))
    return bodies


def write_mixed_lua(path: Path, token: str, strategy: str) -> Path:
    bodies = ", ".join(harness.lua_string(body) for body in mixed_placement_bodies(strategy))
    path.write_text(
        f"""
local bodies = {{ {bodies} }}
local counter = 0
wrk.method = "POST"
wrk.path = "/v2/placement"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = {harness.lua_string("Bearer " + token)}
request = function()
  counter = counter + 1
  return wrk.format(nil, nil, nil, bodies[(counter % #bodies) + 1])
end
"""
    )
    path.chmod(0o600)
    return path


def heartbeat_template(card: str) -> str:
    """A heartbeat body as a Lua format string: free slots (%d), free VRAM bytes (%.0f), the model its
    engine serves (%s) and the models staged (%s)."""
    total_gib = CARDS[card][0]
    body = json.dumps(
        harness.heartbeat_body([harness.pool_status("pool-0", 7777777, 999, ["@M@"], total_gib, "@E@")])
    )
    assert body.index('"@E@"') < body.index('"@M@"')  # the order of the format's arguments
    body = body.replace("7777777", "%d").replace(str(999 * 1024**3), "%.0f")
    return body.replace('"@E@"', "%s").replace('"@M@"', "%s")


def write_heartbeat_lua(path: Path, token: str, shapes: list[tuple[str, tuple[str, ...]]]) -> Path:
    """Heartbeats for random nodes of the mixed fleet, each keeping the node's card and models."""
    model_sets = sorted({models for _, models in shapes})
    set_number = {models: number for number, models in enumerate(model_sets, start=1)}
    lua_sets = ", ".join(harness.lua_string(",".join(json.dumps(m) for m in models)) for models in model_sets)
    # Each pool's engine serves the first of its models (as harness.pool_status does for the first beat).
    lua_served = ", ".join(harness.lua_string(json.dumps(models[0])) for models in model_sets)
    # One small integer per node: its model set, and its card in the sign.
    per_node = ",".join(str(set_number[models] * (1 if card == "big" else -1)) for card, models in shapes)
    big_low, big_high, small_low, small_high = *CARDS["big"][1:], *CARDS["small"][1:]
    path.write_text(
        f"""
local sets = {{ {lua_sets} }}
local served = {{ {lua_served} }}
local nodes = {{ {per_node} }}
local big = {harness.lua_string(heartbeat_template("big"))}
local small = {harness.lua_string(heartbeat_template("small"))}
math.randomseed(42)
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = {harness.lua_string("Bearer " + token)}
delay = function() return {HB_DELAY_MS} end
request = function()
  local n = math.random(1, #nodes)
  local shape = nodes[n]
  local body
  if shape > 0 then
    body = string.format(big, math.random(0, 8), math.random({big_low}, {big_high}) * 1073741824,
                         served[shape], sets[shape])
  else
    body = string.format(small, math.random(0, 8), math.random({small_low}, {small_high}) * 1073741824,
                         served[-shape], sets[-shape])
  end
  return wrk.format(nil, string.format("/v2/nodes/mixed-%05d/heartbeat", n - 1), nil, body)
end
"""
    )
    path.chmod(0o600)
    return path


def run_mixed(
    url: str, placements: Path, heartbeats: Path, duration_s: int, pid: int, label: str
) -> tuple[harness.WrkResult, harness.WrkResult]:
    """Placements for duration_s while heartbeats arrive (started first, stopped after, so they cover it).

    The server CPU per request (the same in both results) counts every request the server answered in
    the placements' window, heartbeats included: the cost of the mix, not of a decision alone.
    """
    beating = harness.start_wrk(url, heartbeats, duration_s + 2, HB_CONNECTIONS)
    try:
        cpu_before = harness.process_cpu_s(pid)
        placed = harness.finish_wrk(
            harness.start_wrk(url, placements, duration_s, CONNECTIONS), duration_s, f"{label}, placements"
        )
        cpu_s = harness.process_cpu_s(pid) - cpu_before
    finally:
        beats = harness.finish_wrk(beating, duration_s + 2, f"{label}, heartbeats")
    answered = placed.requests + beats.requests_per_s * duration_s
    cpu_us = cpu_s / max(answered, 1) * 1e6
    placed = dataclasses.replace(placed, server_cpu_us_per_request=cpu_us)
    return placed, dataclasses.replace(beats, server_cpu_us_per_request=cpu_us)


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
            workdir = scratch / "daemon-mixed"
            workdir.mkdir()
            mixed = harness.Daemon(workdir, workdir, node_timeout_ms=3_600_000)
            servers.append(mixed)
            fleet, shapes = mixed_fleet(MIXED_NODES)
            seconds = harness.seed_nodes(mixed.url, mixed.token, fleet)
            online = harness.online_count(mixed.url, mixed.token)
            print(f"{MIXED_NODES} mixed nodes registered and online in {seconds:.1f} s ({online} online)")
            mixed_scripts = (
                write_mixed_lua(workdir / "placements.lua", mixed.token, args.strategy),
                write_heartbeat_lua(workdir / "heartbeats.lua", mixed.token, shapes),
            )

            for name, (url, script, pid) in targets.items():
                harness.run_wrk(url, script, 2, CONNECTIONS, pid, f"warm-up, {name}")
            run_mixed(mixed.url, *mixed_scripts, 2, mixed.proc.pid, "warm-up, mixed")
            runs: dict[str, list[harness.WrkResult]] = {name: [] for name in targets}
            mixed_runs: list[harness.WrkResult] = []
            beat_runs: list[harness.WrkResult] = []
            for round_number in range(1, args.rounds + 1):
                print(f"round {round_number}:")
                for name, (url, script, pid) in targets.items():
                    label = f"round {round_number}, {name}"
                    runs[name].append(harness.run_wrk(url, script, args.duration, CONNECTIONS, pid, label))
                    print("  " + harness.describe(name, runs[name][-1]))
                placed, beats = run_mixed(
                    mixed.url, *mixed_scripts, args.duration, mixed.proc.pid, f"round {round_number}, mixed"
                )
                mixed_runs.append(placed)
                beat_runs.append(beats)
                print("  " + harness.describe(MIXED_LABEL, placed))
                print("  " + harness.describe(BEATS_LABEL, beats))
        finally:
            for server in servers:
                server.stop()

    medians = {name: harness.median_result(results) for name, results in runs.items()}
    medians[MIXED_LABEL] = harness.median_result(mixed_runs)
    medians[BEATS_LABEL] = harness.median_result(beat_runs)
    print(f"median of {args.rounds} rounds of {args.duration} s:")
    for name, result in medians.items():
        print("  " + harness.describe(name, result))
    small_runs, large_runs = runs[f"orchestratord {SIZES[0]} nodes"], runs[f"orchestratord {SIZES[1]} nodes"]
    rounds = list(zip(small_runs, large_runs, runs["bare aiohttp"], mixed_runs, strict=True))
    ratios = [
        (
            "throughput 10k nodes / bare",
            [big.requests_per_s / bare.requests_per_s for _, big, bare, _ in rounds],
            "goal >= 0.70",
        ),
        (
            "throughput 10k / 1k nodes",
            [big.requests_per_s / one.requests_per_s for one, big, _, _ in rounds],
            "goal >= 0.90",
        ),
        (
            "CPU per decision 10k / 1k nodes",
            [big.server_cpu_us_per_request / one.server_cpu_us_per_request for one, big, _, _ in rounds],
            "1.00 = independent of size",
        ),
        (
            "CPU efficiency 10k nodes vs bare",
            [bare.server_cpu_us_per_request / big.server_cpu_us_per_request for _, big, bare, _ in rounds],
            "bare's CPU per request / the daemon's",
        ),
        (
            "throughput mixed / bare",
            [mix.requests_per_s / bare.requests_per_s for _, _, bare, mix in rounds],
            "placements only; the heartbeats share the server",
        ),
        (
            "throughput mixed / plain 10k",
            [mix.requests_per_s / big.requests_per_s for _, big, _, mix in rounds],
            "what the realistic mix costs",
        ),
        (
            "p99 mixed / plain 10k",
            [mix.p99_ms / big.p99_ms for _, big, _, mix in rounds],
            "tail latency of the mix",
        ),
    ]
    print("ratios, median over the rounds (each round runs the four targets back to back):")
    for label, values, note in ratios:
        print(f"  {label:<34} {statistics.median(values):.2f}  ({note})")
    print(
        f"  heartbeats during the mixed rounds: {medians[BEATS_LABEL].requests_per_s:.0f}/s (median), "
        f"{sum(r.requests for r in beat_runs)} in all, every answer 2xx"
    )


if __name__ == "__main__":
    main()

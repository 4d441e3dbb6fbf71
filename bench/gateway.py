"""The gateway's cost: OpenAI-style streamed completions through orchestratord against going direct.

Part 1, the daemon's own cost. A stand-in engine (aiohttp, llama-server's SSE shape: a role-only chunk,
--tokens content chunks, a finish chunk, [DONE]) is the upstream of three legs measured in the same run:
direct to it, through a bare aiohttp pass-through proxy written here (the floor), and through orchestratord
as shipped (a client keys file, fake nodes registered and heartbeating over /v2 whose engines are the
stand-in). Each leg is an open loop at --rate requests/s for --duration s; it records time to first token
and total time per request (P50/P95/P99), the throughput achieved and the generator's own lag. Then wrk
loads the proxy and the daemon closed-loop for --saturation-duration s: the capacity ratio.

Part 2, the real engine (the cached llama-server and the tiny model, as tests/support_engine.py builds
them): closed loop at the engine's saturation (concurrency = its parallel slots, then twice that), direct
and through the daemon: throughput ratio and first-token / total percentiles.

Every request must end well (status 200, a stream ending with [DONE]); one that does not fails the bench.
The CPU layout adapts to the CPUs present and is printed.

    python bench/gateway.py [--rate 1000] [--duration 30] [--tokens 16] [--part 1|2|all]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _gateway import cluster, layout, legs, saturation
from _orchestratord import harness

BENCH_DIR = Path(__file__).resolve().parent
MODEL_ID = "bench/stand-in"
SLOTS_PER_POOL = 256  # the stand-in has no slots: enough that the daemon never queues in part 1


def chat_body(model: str, stream: bool = True, **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "Hello"}], "stream": stream, **extra}


def start_server(cpu: str, script: str, log: Path, *args: str) -> subprocess.Popen:
    """One of the bench's own aiohttp servers, pinned; its output (a client leaving mid-answer when wrk
    stops logs a traceback) goes to a file in the scratch folder, not into the figures."""
    with log.open("ab") as output:
        return subprocess.Popen(
            ["taskset", "-c", cpu, sys.executable, str(BENCH_DIR / "_gateway" / script), *args],
            stdout=output,
            stderr=subprocess.STDOUT,
        )


def start_upstream(cpus: list[str], tokens: int, scratch: Path) -> tuple[str, list[subprocess.Popen]]:
    port = harness.free_port()
    argv = ("--port", str(port), "--tokens", str(tokens))
    procs = [start_server(cpu, "upstream.py", scratch / "upstream.log", *argv) for cpu in cpus]
    url = f"http://127.0.0.1:{port}"
    harness.wait_healthy(url, procs[0])
    return url, procs


def start_proxy(cpu: str, upstream_url: str, scratch: Path) -> tuple[str, subprocess.Popen]:
    port = harness.free_port()
    proc = start_server(
        cpu, "proxy.py", scratch / "proxy.log", "--port", str(port), "--upstream", upstream_url
    )
    url = f"http://127.0.0.1:{port}"
    harness.wait_healthy(url, proc)
    return url, proc


def stop(*procs: subprocess.Popen) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.wait(timeout=30)


def lagging(result: legs.LegResult, max_lag_ms: float) -> str | None:
    """Why the generator's figures for this leg cannot be trusted, or None."""
    lag = result.p("lag_ms", 0.99)
    if lag > max_lag_ms:
        return (
            f"{result.label}: the load generator itself ran {lag:.2f} ms late at p99 (limit {max_lag_ms} ms)"
        )
    return None


def part_one(args, plan: layout.Layout, scratch: Path) -> list[str]:
    """The daemon's own cost against the stand-in engine; returns the complaints about the generator."""
    print(
        f"part 1: stand-in engine, {args.tokens} tokens per answer, open loop at {args.rate:g} requests/s "
        f"for {args.duration} s per leg, then wrk closed loop ({args.connections} connections) for "
        f"{args.saturation_duration} s"
    )
    upstream_url, upstream_procs = start_upstream(plan.upstream, args.tokens, scratch)
    proxy_url, proxy_proc = start_proxy(plan.server, upstream_url, scratch)
    gateway = None
    if cluster.daemon_has_gateway():
        gateway = cluster.GatewayCluster(
            scratch / "part1", upstream_url, MODEL_ID, nodes=args.nodes, slots_per_pool=SLOTS_PER_POOL
        )
        key_file = gateway.client_key_file
    else:
        print("  orchestratord in this checkout has no gateway (issue 14) yet: its legs are not run")
        key_file = cluster.write_secret(scratch / "dummy-key", "sk-bench-" + "x" * 40)
    body = chat_body(MODEL_ID)
    path = "/v1/chat/completions"
    targets = [("direct", upstream_url), ("bare proxy", proxy_url)]
    if gateway is not None:
        targets.append(("orchestratord", gateway.url))
    complaints: list[str] = []
    results: dict[str, legs.LegResult] = {}
    capacity = {}
    try:
        for label, url in targets:  # warm-up: connections opened, code paths hot; not counted
            legs.run_leg(
                f"warm-up {label}", url + path, body, key_file, plan.load, 2, scratch, rate=args.rate
            )
        for label, url in targets:
            try:
                results[label] = legs.run_leg(
                    label, url + path, body, key_file, plan.load, args.duration, scratch, rate=args.rate
                )
            except legs.BenchFailed:
                report_daemon_errors(gateway)
                raise
            print("  " + results[label].describe(), flush=True)
            if (complaint := lagging(results[label], args.max_lag_ms)) is not None:
                complaints.append(complaint)
        for label, url in targets:
            script = saturation.write_script(
                scratch / f"sat-{label[:6]}.lua", json.dumps(body), key_file.read_text()
            )
            capacity[label] = saturation.run(
                url + path,
                script,
                plan.load,
                args.connections,
                args.saturation_duration,
                f"saturation {label}",
            )
            print(
                f"  saturation {label:<24} {capacity[label].requests_per_s:9.0f} req/s   "
                f"p50 {capacity[label].p50_ms:6.2f} ms   p99 {capacity[label].p99_ms:6.2f} ms",
                flush=True,
            )
        errors = gateway.placement_errors() if gateway is not None else []
    finally:
        if gateway is not None:
            gateway.stop()
        stop(proxy_proc, *upstream_procs)
    print_part_one_ratios(results, capacity, args.tokens, complaints)
    if errors:
        print(f"  recent placement errors reported by the daemon: {len(errors)} (first: {errors[0]})")
    return complaints


def overheads(leg: legs.LegResult, direct: legs.LegResult, tokens: int) -> tuple[float, float, float, float]:
    """(first token added at p50, at p99, total added at p99 (ms), per-token added at p50 (µs))."""
    ft50 = leg.p("first_token_ms", 0.5) - direct.p("first_token_ms", 0.5)
    ft99 = leg.p("first_token_ms", 0.99) - direct.p("first_token_ms", 0.99)
    total99 = leg.p("total_ms", 0.99) - direct.p("total_ms", 0.99)
    # What the tokens after the first cost: (total - first token), median, over the tokens that follow it.
    after = [t - f for t, f in zip(leg.total_ms, leg.first_token_ms, strict=True)]
    after_direct = [t - f for t, f in zip(direct.total_ms, direct.first_token_ms, strict=True)]
    per_token_us = (legs.percentile(after, 0.5) - legs.percentile(after_direct, 0.5)) / max(tokens, 1) * 1000
    return ft50, ft99, total99, per_token_us


def print_part_one_ratios(results: dict, capacity: dict, tokens: int, complaints: list[str]) -> None:
    direct = results["direct"]
    print("part 1 figures:")
    for label in ("bare proxy", "orchestratord"):
        if label not in results:
            continue
        ft50, ft99, total99, per_token = overheads(results[label], direct, tokens)
        print(
            f"  {label} over direct: first token +{ft50:.2f} ms at p50, +{ft99:.2f} ms at p99; total "
            f"+{total99:.2f} ms at p99; +{per_token:.1f} us per token at p50"
        )
    if "orchestratord" in results:
        daemon, proxy = results["orchestratord"], results["bare proxy"]
        _ft50, _ft99, total99, _per_token = overheads(daemon, direct, tokens)
        print(
            "  open-loop throughput orchestratord / bare proxy: "
            f"{daemon.served_per_s / proxy.served_per_s:.3f} (both should be the offered rate)"
        )
        ratio = capacity["orchestratord"].requests_per_s / capacity["bare proxy"].requests_per_s
        print(f"  capacity orchestratord / bare proxy (wrk closed loop): {ratio:.2f}  (goal >= 0.85)")
        verdict = "not judged: see the generator's lag below" if complaints else "goal <= 2 ms"
        print(f"  p99 total added over direct by orchestratord: {total99:.2f} ms  ({verdict})")
        served = " / ".join(f"{capacity[label].requests_per_s:.0f}" for label in capacity)
        print(f"  capacity direct / bare proxy / orchestratord: {served} req/s")


def part_two(args, plan: layout.Layout, scratch: Path) -> list[str]:
    """Direct vs through the daemon against the real llama-server at its saturation."""
    sys.path.insert(0, str(harness.REPO_ROOT / "tests"))
    import support_engine  # the tests' own helpers: the cached archive and the tiny model

    binary = support_engine.unpack_engine(support_engine.engine_archive(), scratch / "engine")
    model = support_engine.make_tiny_model(scratch / "tiny.gguf")
    key_file = support_engine.write_key_file(scratch / "engine-api-key")
    engine = support_engine.Engine(
        binary, model, key_file, scratch / "engine.log", parallel=args.engine_parallel
    )
    engine.start()
    # The engine gets every CPU that is neither the server's nor a generator's (all of them when shared).
    engine_cpus = {int(cpu) for cpu in plan.upstream} | (
        set(os.sched_getaffinity(0)) - {int(plan.server)} - {int(c) for c in plan.load}
    )
    os.sched_setaffinity(engine.process.pid, engine_cpus)
    print(
        f"part 2: llama-server {binary.parent.name} on CPUs {sorted(engine_cpus)}, --parallel "
        f"{args.engine_parallel}, {args.engine_tokens} tokens per answer, "
        f"closed loop {args.engine_duration} s per leg"
    )
    gateway = None
    try:
        targets = [("direct", engine.url, key_file)]
        if cluster.daemon_has_gateway():
            gateway = cluster.GatewayCluster(
                scratch / "part2",
                engine.url,
                support_engine.TINY_MODEL_ID,
                nodes=1,
                slots_per_pool=args.engine_parallel,
                engine_key=support_engine.ENGINE_API_KEY,
            )
            targets.append(("orchestratord", gateway.url, gateway.client_key_file))
        else:
            print("  orchestratord in this checkout has no gateway (issue 14) yet: its legs are not run")
        body = chat_body(support_engine.TINY_MODEL_ID, max_tokens=args.engine_tokens, ignore_eos=True)
        path = "/v1/chat/completions"
        legs.run_leg(
            "warm-up engine",
            engine.url + path,
            body,
            key_file,
            plan.load,
            2,
            scratch,
            concurrency=args.engine_parallel,
        )
        for concurrency in (args.engine_parallel, 2 * args.engine_parallel):
            pair = {}
            for label, url, key in targets:
                try:
                    pair[label] = legs.run_leg(
                        f"{label} c={concurrency}",
                        url + path,
                        body,
                        key,
                        plan.load,
                        args.engine_duration,
                        scratch,
                        concurrency=concurrency,
                    )
                except legs.BenchFailed:
                    report_daemon_errors(gateway)
                    raise
                print("  " + pair[label].describe(), flush=True)
            if gateway is None:
                continue
            ratio = pair["orchestratord"].served_per_s / pair["direct"].served_per_s
            ft = pair["orchestratord"].p("first_token_ms", 0.5) - pair["direct"].p("first_token_ms", 0.5)
            print(
                f"  concurrency {concurrency}: throughput orchestratord / direct {ratio:.3f} (goal >= 0.97); "
                f"first token +{ft:.2f} ms at p50"
            )
        if gateway is not None:
            # Requests the daemon had to send again because the engine had closed a pooled connection.
            resends = gateway.counter("orchestratord_gateway_engine_resends_total")
            print(
                f"  the daemon sent {resends:.0f} request(s) again on a fresh connection"
                if resends is not None
                else "  (no resend count on /metrics)"
            )
    finally:
        if gateway is not None:
            gateway.stop()
        engine.stop()
    return []


def report_daemon_errors(gateway: cluster.GatewayCluster | None) -> None:
    """What the daemon itself says went wrong (its recent placement errors), before the bench fails."""
    if gateway is None:
        return
    by_message: dict[tuple, int] = {}
    for error in gateway.placement_errors():  # the newest 100, newest first
        what = (error.get("code"), error.get("message"))
        by_message[what] = by_message.get(what, 0) + 1
    for (code, message), count in list(by_message.items())[:8]:
        print(f"  daemon, {count} of its last errors: {code}: {message}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", choices=["1", "2", "all"], default="all")
    parser.add_argument("--rate", type=float, default=1000.0, help="open loop, requests/s (default 1000)")
    parser.add_argument("--duration", type=int, default=30, help="seconds per open-loop leg (default 30)")
    parser.add_argument("--tokens", type=int, default=16, help="tokens per stand-in answer (default 16)")
    parser.add_argument("--nodes", type=int, default=4, help="fake nodes behind the daemon (default 4)")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections (default 64)")
    parser.add_argument(
        "--saturation-duration", type=int, default=10, help="seconds per wrk run (default 10)"
    )
    parser.add_argument(
        "--max-lag-ms",
        type=float,
        default=5.0,
        help="the generator's p99 lag beyond which its latency figures are not judged (default 5)",
    )
    parser.add_argument("--engine-parallel", type=int, default=2, help="llama-server --parallel (default 2)")
    parser.add_argument("--engine-tokens", type=int, default=32, help="tokens per engine answer (default 32)")
    parser.add_argument("--engine-duration", type=int, default=20, help="seconds per engine leg (default 20)")
    args = parser.parse_args()
    harness.require_tools()
    plan = layout.plan()
    harness.SERVER_CPU = plan.server  # harness.Daemon pins the daemon there
    print(f"gateway benchmark: {harness.machine_note()}")
    print(plan.describe())
    complaints = []
    with harness.scratch_dir("gw-bench-") as scratch:
        scratch = Path(scratch)
        if args.part in ("1", "all"):
            complaints += part_one(args, plan, scratch)
        if args.part in ("2", "all"):
            complaints += part_two(args, plan, scratch)
    if complaints:
        print("the load generator could not keep the rate; its latency figures above are not judged:")
        for complaint in complaints:
            print("  " + complaint)
        sys.exit(1)


if __name__ == "__main__":
    try:
        main()
    except legs.BenchFailed as failure:
        sys.exit(str(failure))

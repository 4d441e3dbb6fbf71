"""What watching engines costs the agent, and how fast the registry learns an engine's state.

Real parts only: the cached llama-server (launched by pool_managerd.engine_exec with the tiny model), the
real agent (pool-managerd, the nvidia-smi stand-in for the GPUs) and the real orchestratord, all on
127.0.0.1, with orchestratord's default heartbeat interval (5 s) and the agent's default watch interval
(1 s).

1. CPU: the agent's process CPU time (utime + stime from /proc) over a fixed window while it watches N
   idle engines, minus the same agent with the same N pools and no engine; printed as % of one core per
   pool.
2. Latency: from an engine answering /health 200 (polled every 10 ms) to its pool `ready` in the
   registry (polled every 10 ms), and from a kill -9 to the pool not ready; several rounds.

    python bench/engine_watch.py [--pools 4] [--window 20] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))

from support import http, make_daemon, wait_until  # noqa: E402
from support_agent import make_agent  # noqa: E402
from support_engine import (  # noqa: E402
    TINY_MODEL_ID,
    engine_archive,
    engine_settings,
    engine_unit,
    make_tiny_model,
    stage_model,
    unpack_engine,
)

TICKS = os.sysconf("SC_CLK_TCK")
NODE = "gpu-node-1"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime (fields 14 and 15 of stat)


def pools_of(daemon) -> dict[str, dict]:
    answer = daemon.api("GET", f"/v2/nodes/{NODE}")
    return {pool["pool_id"]: pool for pool in answer.body["pools"]} if answer.status == 200 else {}


def agent_cpu(workdir: Path, daemon, pools: list[dict], key_file: Path | None, window_s: float) -> float:
    """CPU seconds the agent used over `window_s`, measured once it reports every pool's engine ready."""
    extra = {"engine_api_key_file": str(key_file)} if key_file else {}
    agent = make_agent(workdir, daemon, pools=pools, **extra).start()
    try:
        wanted = "ready" if key_file else None

        def settled():
            seen = pools_of(daemon)
            states = [(pool.get("engine") or {}).get("state") for pool in seen.values()]
            return len(seen) == len(pools) and all(state == wanted for state in states)

        wait_until(settled, timeout=60, interval=0.1, what="every pool reported")
        time.sleep(2)  # past the start: imports, registration, first reads
        before = cpu_seconds(agent.proc.pid)
        time.sleep(window_s)
        return cpu_seconds(agent.proc.pid) - before
    finally:
        agent.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pools", type=int, default=4)
    parser.add_argument("--window", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-engine-watch-") as temporary:
        root = Path(temporary)
        binary = unpack_engine(engine_archive(), root / "engine")
        model = make_tiny_model(root / "tiny.gguf")
        models_dir = root / "node" / "models"
        stage_model(models_dir, TINY_MODEL_ID, model)
        daemon = make_daemon(
            root / "orchestratord", heartbeat_interval_ms=5000, node_timeout_ms=15000
        ).start()
        units = []
        try:
            for number in range(args.pools):
                settings = engine_settings(
                    f"p{number}", binary, models_dir, parallel=1, extra_args=["--threads", "1"]
                )
                units.append(engine_unit(root / "node" / "engine", settings).start())
            key_file = units[0].credentials_dir / "engine-api-key"
            with_engines = [
                {"pool_id": f"p{n}", "gpus": [], "engine_file": str(unit.engine_file)}
                for n, unit in enumerate(units)
            ]
            without = [{"pool_id": f"p{n}", "gpus": [], "slots_total": 1} for n in range(args.pools)]

            watching = agent_cpu(root / "node", daemon, with_engines, key_file, args.window)
            daemon.api("DELETE", f"/v2/nodes/{NODE}")
            bare = agent_cpu(root / "node", daemon, without, None, args.window)
            daemon.api("DELETE", f"/v2/nodes/{NODE}")
            per_pool = (watching - bare) / args.window / args.pools * 100
            print(
                f"agent CPU over {args.window:g} s: {watching:.2f} s watching {args.pools} engines, "
                f"{bare:.2f} s with none"
            )
            print(f"engine watching: {per_pool:.3f} % of one core per pool (1 s watch interval)")

            agent = make_agent(
                root / "node", daemon, pools=with_engines[:1], engine_api_key_file=str(key_file)
            )
            for unit in units[1:]:
                unit.stop()
            unit = units[0]
            agent.start()
            to_ready, to_gone = [], []
            try:
                wait_until(lambda: pools_of(daemon).get("p0", {}).get("ready"), timeout=60, interval=0.05)
                for _ in range(args.rounds):
                    unit.kill()
                    killed = time.monotonic()
                    wait_until(lambda: not pools_of(daemon)["p0"]["ready"], timeout=30, interval=0.01)
                    to_gone.append(time.monotonic() - killed)
                    unit.launch()
                    wait_until(
                        lambda: http("GET", unit.url + "/health", timeout=1).status == 200,
                        timeout=60,
                        interval=0.01,
                    )
                    healthy = time.monotonic()
                    wait_until(lambda: pools_of(daemon)["p0"]["ready"], timeout=30, interval=0.01)
                    to_ready.append(time.monotonic() - healthy)
            finally:
                agent.stop()
            for name, values in (
                ("engine healthy -> pool ready", to_ready),
                ("kill -9 -> pool not ready", to_gone),
            ):
                print(
                    f"{name}: median {statistics.median(values):.2f} s, max {max(values):.2f} s over "
                    f"{len(values)} rounds (heartbeat interval 5 s)"
                )
        finally:
            for unit in units:
                unit.stop()
            daemon.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`make chaos`: fault scenarios against the running podman lab under client load, then one table.

    python lab/chaos/run.py [SCENARIO ...] [--rate 4] [--away-s 60] [--swarm 1000] [--tasks-rate 1000]
    python lab/chaos/run.py --no-lab [replica_kill db_restart] [--swarm 1000]   # the HA rows, no lab

The first row is the load test on its own: 1,000 tasks (placements) a second for 30 s with P50/P95/P99.
Then the client load (chat completions through the gateway, open loop) starts and runs through every other
scenario; the next row is that load alone, before any fault. Each scenario checks its expected outcome and
times its recovery; the table says scenario, expected, measured, pass/fail, and the exit status is 1 on any
fail (2: the lab is not up). Scenarios run one after the other, each starting from a lab whose GPU nodes are
online and ready.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1] / "bench")]

from _chaos.load import ClientLoad  # noqa: E402
from common import Context, Row, poll  # noqa: E402
from target import LabError, lab  # noqa: E402

# In order: the load alone first, then the faults. Each name is a module here with run(ctx) -> [Row].
SCENARIOS = (
    "tasks",
    "baseline",
    "partition",
    "kill_daemon",
    "daemon_away",
    "engine_crash",
    "engine_hang",
    "gpu_hang",
    "disk_full",
    "node_reboot",
    "replica_kill",
    "db_restart",
)
# The HA rows: two replicas, their database and a swarm on this machine's loopback (replicas_ha.py), no lab
# needed; `--no-lab` runs these alone.
LOOPBACK = ("replica_kill", "db_restart")


def lab_ready(ctx: Context) -> bool:
    for node in ctx.lab.gpu_nodes:
        view = ctx.lab.node(node) or {}
        pools = view.get("pools") or [{}]
        if view.get("status") != "online" or not pools[0].get("ready"):
            return False
    return True


def table(rows: list[Row]) -> str:
    header = ("scenario", "expected", "measured", "result")
    cells = [header, *((r.scenario, r.expected, r.measured, "pass" if r.ok else "FAIL") for r in rows)]
    widths = [max(len(c[i]) for c in cells) for i in range(3)]
    lines = []
    for number, row in enumerate(cells):
        lines.append(" | ".join(cell.ljust(widths[i]) if i < 3 else cell for i, cell in enumerate(row)))
        if number == 0:
            lines.append("-+-".join("-" * w for w in [*widths, 6]))
    return "\n".join(lines)


def run_scenario(name: str, ctx: Context) -> list[Row]:
    print(f"== {name}", flush=True)
    started = time.monotonic()
    try:
        new = importlib.import_module(name).run(ctx)
    except Exception as error:  # a scenario that breaks is a failed row, and the run goes on
        traceback.print_exc()
        new = [Row(name, "runs to the end", f"{type(error).__name__}: {error}", False)]
    for row in new:
        print(f"   {'pass' if row.ok else 'FAIL'}: {row.scenario}: {row.measured}", flush=True)
    print(f"   ({time.monotonic() - started:.0f} s, load average {os.getloadavg()[0]:.2f})", flush=True)
    return new


def loopback_only(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """The HA rows without the lab: they build their own control plane on loopback."""
    names = LOOPBACK if args.scenarios == list(SCENARIOS) else args.scenarios  # none named: both
    others = [name for name in names if name not in LOOPBACK]
    if others:
        parser.error(f"--no-lab runs only {', '.join(LOOPBACK)}; not {', '.join(others)}")
    ctx = Context(None, None, args.away_s, args.swarm, args.tasks_rate)
    rows = [row for name in names for row in run_scenario(name, ctx)]
    print()
    print(table(rows))
    return 0 if all(row.ok for row in rows) else 1


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("scenarios", nargs="*", default=list(SCENARIOS), help=f"of: {', '.join(SCENARIOS)}")
    parser.add_argument("--rate", type=float, default=4.0, help="client requests per second (default 4)")
    parser.add_argument(
        "--away-s", type=float, default=60.0, help="daemon away: seconds stopped (default 60)"
    )
    parser.add_argument("--swarm", type=int, default=1000, help="simulated agents for kill -9 (default 1000)")
    parser.add_argument(
        "--tasks-rate", type=float, default=1000.0, help="the first row's tasks a second (default 1000)"
    )
    parser.add_argument(
        "--no-lab", action="store_true", help=f"run only the loopback rows ({', '.join(LOOPBACK)}), no lab"
    )
    args = parser.parse_args()
    if args.no_lab:
        return loopback_only(parser, args)
    unknown = [name for name in args.scenarios if name not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    try:
        target = lab()
    except LabError as error:
        print(f"chaos: {error}", file=sys.stderr)
        return 2
    load = ClientLoad(target.control_url, target.client_key, target.model(), args.rate, target.ssl_context())
    ctx = Context(target, load, args.away_s, args.swarm, args.tasks_rate)
    if poll(lambda: lab_ready(ctx), 120, 1) is None:
        print(
            "chaos: the lab's GPU nodes are not online with ready pools; run `make lab` first",
            file=sys.stderr,
        )
        return 2
    rows: list[Row] = []
    loading = False
    try:
        for name in args.scenarios:
            if name != "tasks" and not loading:  # the tasks row runs on its own, before the client load
                load.start()
                loading = True
            rows += run_scenario(name, ctx)
            if poll(lambda: lab_ready(ctx), 180, 1) is None:
                rows.append(Row(f"after {name}", "lab back to ready", "GPU nodes not ready in 180 s", False))
                break
    finally:
        if loading:
            load.stop()
    print()
    print(table(rows))
    return 0 if all(row.ok for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

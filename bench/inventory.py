"""How much time the llorch_registry inventory plugin adds on top of Ansible's own cost.

For each size (1,000 and 10,000 nodes by default) it registers that many nodes with a real orchestratord
on 127.0.0.1 (two pools, two of 40 models each), then times `ansible-inventory --graph`:

- cold:   the plugin asks the registry (`--flush-cache`), builds the hosts, writes the cache;
- cached: the plugin reads the jsonfile cache written by the cold run, no request;
- floor:  a throwaway plugin re-adds the exact groups, hosts and variables the real plugin produced (its
          `--list` output, read from a JSON file) and nothing else: Ansible's own cost for that inventory.

The variants take turns, --repeat rounds of them. It prints each one's median wall seconds with the spread
(lowest-highest) and its median CPU seconds, all from the same runs, and the median over the rounds of the
per-round ratio against the floor (goal at 10,000 nodes: cold within 1.3x, cached within 1.1x): a ratio of
two runs made side by side, never of minima picked from different rounds. Then one cold run with
detailed_vars (whole pool and GPU records) to show what lean host variables save.

    .venv/bin/python bench/inventory.py [--nodes 1000,10000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))
from support import make_daemon, sample_heartbeat, sample_registration  # noqa: E402
from support_registry import plain  # noqa: E402

VENV_BIN = Path(sys.executable).parent
MODELS = [f"org-{i % 8}/model-{i}-8b-instruct" for i in range(40)]
CONCURRENCY = 16

# The floor: adds what it is given, the same calls the real plugin makes, no HTTP, no cache, no checks.
FLOOR_PLUGIN = '''
from __future__ import annotations

import json

from ansible.plugins.inventory import BaseInventoryPlugin

DOCUMENTATION = r"""
name: llorch_floor
short_description: benchmark floor, re-adds a saved inventory
options:
  plugin:
    required: true
    choices: [llorch_floor]
  data_file:
    required: true
    type: path
"""


class InventoryModule(BaseInventoryPlugin):
    NAME = "llorch_floor"

    def verify_file(self, path):
        return path.endswith(".llorch_floor.yml")

    def parse(self, inventory, loader, path, cache=True):
        super().parse(inventory, loader, path, cache)
        self._read_config_data(path)
        with open(self.get_option("data_file"), encoding="utf-8") as handle:
            saved = json.load(handle)
        for group in saved["groups"]:
            inventory.add_group(group)
        for host, variables in saved["hostvars"].items():
            first, *others = saved["memberships"][host]
            inventory.add_host(host, group=first)
            for name, value in variables.items():
                inventory.set_variable(host, name, value)
            for group in others:
                inventory.add_child(group, host)
'''


async def register_nodes(url: str, token: str, count: int) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    limit = asyncio.Semaphore(CONCURRENCY)
    async with aiohttp.ClientSession(headers=headers) as session:

        async def one(index: int) -> None:
            registration = sample_registration(f"gpu-{index:05d}", pools=2)
            models = [MODELS[index % len(MODELS)], MODELS[(index * 7 + 3) % len(MODELS)]]
            async with limit:
                async with session.post(f"{url}/v2/nodes/register", json=registration) as answer:
                    answer.raise_for_status()
                heartbeat = sample_heartbeat(registration, models)
                async with session.post(
                    f"{url}/v2/nodes/{registration['node_id']}/heartbeat", json=heartbeat
                ) as answer:
                    answer.raise_for_status()

        await asyncio.gather(*(one(index) for index in range(count)))


def ansible_inventory(env: dict[str, str], *args: str) -> tuple[float, float, subprocess.CompletedProcess]:
    """One run: wall seconds, CPU seconds of ansible-inventory itself (user + system), its output."""
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(
        [str(VENV_BIN / "ansible-inventory"), *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - started
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    if done.returncode != 0 or "Unable to parse" in done.stderr:
        raise SystemExit(f"ansible-inventory {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return wall, cpu, done


def in_turns(
    repeat: int, env: dict[str, str], variants: dict[str, list[str]]
) -> dict[str, list[tuple[float, float]]]:
    """(wall, CPU) seconds of every run of each variant; the variants take turns, so a burst of load from
    elsewhere on the machine hits them alike, and round i of one pairs with round i of another."""
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for _ in range(repeat):
        for name, args in variants.items():
            wall, cpu, _ = ansible_inventory(env, *args)
            runs[name].append((wall, cpu))
    return runs


def summary(runs: list[tuple[float, float]]) -> str:
    """Median wall seconds, its spread over the runs, and median CPU seconds: `0.50 (0.47-0.58) cpu 0.49`."""
    walls = [wall for wall, _ in runs]
    cpu = statistics.median(cpu for _, cpu in runs)
    return f"{statistics.median(walls):5.2f} ({min(walls):.2f}-{max(walls):.2f}) cpu {cpu:4.2f}"


def ratio(runs: list[tuple[float, float]], floor: list[tuple[float, float]]) -> str:
    """The median over rounds of this variant's wall (and CPU) seconds over the floor's in the same round."""
    wall = statistics.median(mine[0] / base[0] for mine, base in zip(runs, floor, strict=True))
    cpu = statistics.median(mine[1] / base[1] for mine, base in zip(runs, floor, strict=True))
    return f"{wall:5.2f}x ({cpu:.2f}x)"


def save_floor_data(listing: dict, path: Path) -> int:
    """The groups, host variables and memberships of a `--list` output, for the floor plugin."""
    listing = plain(listing)
    hostvars = listing.pop("_meta")["hostvars"]
    groups = [name for name in listing if name not in ("all", "ungrouped")]
    memberships: dict[str, list[str]] = {host: [] for host in hostvars}
    for name in groups:
        for host in listing[name].get("hosts", []):
            memberships[host].append(name)
    path.write_text(json.dumps({"groups": groups, "hostvars": hostvars, "memberships": memberships}))
    return len(groups)


def measure(count: int, repeat: int, workdir: Path) -> dict:
    daemon = make_daemon(workdir / "orchestratord", node_timeout_ms=3_600_000, log_level="warning")
    daemon.start()
    try:
        started = time.perf_counter()
        asyncio.run(register_nodes(daemon.url, daemon.token, count))
        registered_s = time.perf_counter() - started

        env = {
            name: value for name, value in os.environ.items() if not name.startswith(("ANSIBLE_", "LLORCH_"))
        }
        env.update(
            ANSIBLE_CONFIG=str(REPO_ROOT / "ansible.cfg"),
            ANSIBLE_INVENTORY_PLUGINS=str(workdir),  # the floor; the real plugin comes from the collection
            ANSIBLE_INVENTORY_ENABLED="llorch.kit.llorch_registry,llorch_floor",
            LLORCH_URL=daemon.url,
            LLORCH_API_TOKEN=daemon.token,
        )
        cache = {"cache": True, "cache_plugin": "jsonfile", "cache_connection": str(workdir / "cache")}
        source = workdir / "bench.llorch_registry.yml"
        source.write_text(yaml.safe_dump({"plugin": "llorch.kit.llorch_registry", **cache}))
        detailed = workdir / "detailed.llorch_registry.yml"
        detailed.write_text(yaml.safe_dump({"plugin": "llorch.kit.llorch_registry", "detailed_vars": True}))
        (workdir / "llorch_floor.py").write_text(FLOOR_PLUGIN)
        floor_source = workdir / "bench.llorch_floor.yml"
        floor_source.write_text(
            yaml.safe_dump({"plugin": "llorch_floor", "data_file": str(workdir / "floor.json")})
        )

        _, _, listed = ansible_inventory(env, "-i", str(source), "--list", "--flush-cache")
        groups = save_floor_data(json.loads(listed.stdout), workdir / "floor.json")
        timings = in_turns(
            repeat,
            env,
            {
                "floor": ["-i", str(floor_source), "--graph"],
                "cold": ["-i", str(source), "--graph", "--flush-cache"],
                "cached": ["-i", str(source), "--graph"],
            },
        )
        timings.update(in_turns(1, env, {"detailed": ["-i", str(detailed), "--graph"]}))
        return {"nodes": count, "groups": groups, "register_s": registered_s, **timings}
    finally:
        daemon.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="1000,10000", help="comma-separated node counts")
    parser.add_argument("--repeat", type=int, default=5, help="rounds; each variant runs once per round")
    args = parser.parse_args()

    print(
        f"ansible-inventory --graph, {args.repeat} rounds: median wall s (lowest-highest), median CPU s;"
        " ratios: median over rounds of wall (CPU) over the same round's floor"
    )
    for count in (int(part) for part in args.nodes.split(",")):
        with tempfile.TemporaryDirectory(prefix="llorch-bench-inventory-") as workdir:
            f = measure(count, args.repeat, Path(workdir))
        print(f"{count} nodes, {f['groups']} groups, registered in {f['register_s']:.1f} s")
        for name in ("floor", "cold", "cached"):
            against = "" if name == "floor" else f"  {name}/floor {ratio(f[name], f['floor'])}"
            print(f"  {name:<8} {summary(f[name])}{against}")
        print(f"  {'detailed':<8} {summary(f['detailed'])}  (cold, detailed_vars: true, one run)", flush=True)


if __name__ == "__main__":
    main()

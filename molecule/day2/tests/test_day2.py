"""Day-2 jobs on the converged cluster, run as an operator runs them, each judged by the registry.

The tests run in file order and each starts from the state the one before left (molecule.yml runs pytest
with -x): drain and undrain a node, upgrade after a change in the agent's sources, an upgrade that fails on
purpose, remove a node. The playbooks are the real ones under playbooks/, run with ansible-playbook against
molecule's inventory; the registry is the real orchestratord on the control host, asked over HTTP from here.
Each playbook waits for the state it promises before it returns, so the registry is read once afterwards,
not polled: polling would hide a playbook that returns too early.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

import testinfra.utils.ansible_runner

PROJECT = Path(os.environ["MOLECULE_PROJECT_DIRECTORY"])
INVENTORY_FILE = os.environ["MOLECULE_INVENTORY_FILE"]
# The folder: molecule writes group_vars and host_vars beside the inventory file.
INVENTORY_DIR = Path(INVENTORY_FILE).parent
RUNNER = testinfra.utils.ansible_runner.AnsibleRunner(INVENTORY_FILE)

CONTROL = "molecule-day2-control"
GPU_1 = "molecule-day2-gpu-1"
GPU_2 = "molecule-day2-gpu-2"
# llorch_controller_url in molecule.yml: where the playbooks reach the registry from this machine.
REGISTRY_URL = "https://10.89.240.30:9200"
# The scenarios' CA on this machine (llorch_pki_dir in molecule.yml): the registry serves HTTPS only.
CA_FILE = PROJECT / ".lab" / "molecule" / "pki" / "ca.crt"
HEARTBEAT_S = 5  # orchestratord's default heartbeat interval, which the scenario keeps
# The token the inventory reads (llorch_api_token in molecule.yml), made 0600 by lab/molecule_setup.sh.
TOKEN_FILE = PROJECT / ".lab" / "molecule" / "api-token"

AGENT_SOURCES = PROJECT / "files" / "pool_managerd"
# The play of upgrade.yml that takes the GPU nodes one at a time (serial: 1).
UPGRADE_NODES_PLAY = "Upgrade the GPU nodes one at a time"
PLAYBOOK_TIMEOUT_S = 600


# --- the registry ---------------------------------------------------------------------------------


def registry(method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    """One call to the registry: (status, decoded JSON or None). The token goes in a header, never argv."""
    request = urllib.request.Request(
        REGISTRY_URL + path,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={
            "Authorization": "Bearer " + TOKEN_FILE.read_text().strip(),
            "Content-Type": "application/json",
        },
    )
    try:
        context = ssl.create_default_context(cafile=str(CA_FILE))
        with urllib.request.urlopen(request, timeout=10, context=context) as answer:
            raw = answer.read()
            return answer.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as error:
        raw = error.read()
        return error.code, json.loads(raw) if raw else None


def registered_nodes() -> dict[str, dict[str, Any]]:
    status, listing = registry("GET", "/v2/nodes")
    assert status == 200, listing
    return {node["node_id"]: node for node in listing["nodes"]}


def placed_node() -> str:
    status, answer = registry("POST", "/v2/placement", {})
    assert status == 200, answer
    return answer["node_id"]


def assert_in_service(node: dict[str, Any]) -> None:
    """Online, not drained, and every pool ready and not draining: placement may use it."""
    assert node["status"] == "online", node
    assert node["drain"] is False, node
    assert node["pools"], node
    assert all(pool["ready"] and not pool["draining"] for pool in node["pools"]), node["pools"]


# --- the hosts ------------------------------------------------------------------------------------


def service_state(host_name: str, unit: str) -> dict[str, str]:
    """What tells one run of a unit from the next: its invocation id, main PID and start time (µs, UTC)."""
    host = RUNNER.get_host(host_name)
    out = host.check_output(
        "systemctl show %s --timestamp=us+utc -p InvocationID,MainPID,ActiveState,ActiveEnterTimestamp", unit
    )
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def started_at(state: dict[str, str]) -> datetime:
    # e.g. "Tue 2024-05-14 10:11:12.123456 UTC"; the containers share this machine's clock.
    return datetime.strptime(state["ActiveEnterTimestamp"], "%a %Y-%m-%d %H:%M:%S.%f %Z")


# --- the playbooks --------------------------------------------------------------------------------


def run_playbook(playbook: str, *args: str) -> tuple[int, dict[str, Any]]:
    """Run playbooks/<playbook> against the scenario's hosts: (exit status, the json callback's report)."""
    env = dict(os.environ, ANSIBLE_STDOUT_CALLBACK="ansible.posix.json")
    command = [
        str(Path(sys.executable).with_name("ansible-playbook")),
        "--inventory",
        str(INVENTORY_DIR),
        str(PROJECT / "playbooks" / playbook),
        *args,
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=PLAYBOOK_TIMEOUT_S)
    try:
        report = json.loads(done.stdout)
    except json.JSONDecodeError:
        raise AssertionError(
            f"{playbook} printed no report (exit {done.returncode}): {done.stderr[-3000:]}"
        ) from None
    return done.returncode, report


def failures(report: dict[str, Any]) -> list[str]:
    """Every failed task as 'host: task: message', to show in an assertion."""
    return [
        f"{host}: {task['task']['name']}: {result.get('msg', '')}"
        for play in report["plays"]
        for task in play["tasks"]
        for host, result in task["hosts"].items()
        if result.get("failed") and not result.get("ignore_errors")
    ]


def changed(report: dict[str, Any], host: str) -> int:
    return report["stats"].get(host, {}).get("changed", 0)


def task_results(report: dict[str, Any], task_name: str, host: str) -> list[dict[str, Any]]:
    """One host's results of a task, found by its name (a role's tasks are named "<role> : <name>")."""
    return [
        task["hosts"][host]
        for play in report["plays"]
        for task in play["tasks"]
        if task["task"]["name"].split(" : ")[-1] == task_name and host in task["hosts"]
    ]


def batches(report: dict[str, Any], play_name: str) -> list[dict[str, Any]]:
    """The batches of a serial play in the order they ran: the hosts each touched, and when it ran."""
    return [
        {
            "hosts": sorted({host for task in play["tasks"] for host in task["hosts"]}),
            "start": parse_callback_time(play["play"]["duration"]["start"]),
            "end": parse_callback_time(play["play"]["duration"]["end"]),
        }
        for play in report["plays"]
        if play["play"]["name"] == play_name
    ]


def parse_callback_time(stamp: str) -> datetime:
    # The json callback writes naive UTC ISO times, with or without a trailing Z.
    return datetime.fromisoformat(stamp.rstrip("Z")).replace(tzinfo=None)


# --- a throwaway change in the agent's sources ---------------------------------------------------


def agent_version() -> str:
    return tomllib.loads((AGENT_SOURCES / "pyproject.toml").read_text())["project"]["version"]


def changed_agent_sources(tmp_path_factory: Any) -> tuple[Path, str]:
    """A copy of files/pool_managerd whose version is bumped (pyproject and __version__, which the agent
    registers with), and a vars file that points the wheelhouse at it. The repo's sources stay as they are;
    the wheelhouse goes to a scratch folder so the repo's own (.cache/wheelhouse) is not rebuilt from it."""
    scratch = tmp_path_factory.mktemp("day2-upgrade")
    copy = scratch / "pool_managerd"
    # The package links contract.py and wire.py to the shared modules: copy their contents (no symlinks).
    shutil.copytree(
        AGENT_SOURCES, copy, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist")
    )
    old = agent_version()
    assert "+" not in old, old
    new = old + "+day2"
    for path, before, after in (
        (copy / "pyproject.toml", f'version = "{old}"', f'version = "{new}"'),
        (copy / "pool_managerd" / "__init__.py", f'__version__ = "{old}"', f'__version__ = "{new}"'),
    ):
        text = path.read_text()
        assert text.count(before) == 1, f"{path} should hold {before!r} once"
        path.write_text(text.replace(before, after))
    vars_file = scratch / "upgrade-vars.json"
    vars_file.write_text(
        json.dumps(
            {
                "wheelhouse_dir": str(scratch / "wheelhouse"),
                "wheelhouse_sources": [str(PROJECT / "files" / "orchestratord"), str(copy)],
            }
        )
    )
    return vars_file, new


# --- the steps --------------------------------------------------------------------------------------

# Shared between the upgrade steps: the vars file of the changed sources and the version it carries.
UPGRADE: dict[str, Any] = {}


def test_site_yml_left_both_nodes_online_at_the_repos_version():
    nodes = registered_nodes()
    assert sorted(nodes) == [GPU_1, GPU_2]
    for node in nodes.values():
        assert_in_service(node)
        assert node["version"] == agent_version(), node


def test_drain_takes_a_node_out_of_placement_and_undrain_puts_it_back():
    rc, report = run_playbook("drain.yml", "--limit", GPU_1)
    assert rc == 0, failures(report)
    assert changed(report, GPU_1) >= 1
    nodes = registered_nodes()
    assert nodes[GPU_1]["status"] == "draining"
    assert nodes[GPU_1]["drain"] is True
    assert_in_service(nodes[GPU_2])
    # Placement skips the drained node; with both in service it would tie and pick GPU_1 (node id order).
    assert placed_node() == GPU_2

    rc, report = run_playbook("drain.yml", "--limit", GPU_1, "-e", "undrain=true")
    assert rc == 0, failures(report)
    assert changed(report, GPU_1) >= 1
    nodes = registered_nodes()
    assert_in_service(nodes[GPU_1])
    assert_in_service(nodes[GPU_2])
    assert placed_node() == GPU_1


def test_upgrade_after_an_agent_change_restarts_only_the_agents_one_node_at_a_time(tmp_path_factory):
    vars_file, new_version = changed_agent_sources(tmp_path_factory)
    UPGRADE.update(vars_file=vars_file, version=new_version)
    daemon_before = service_state(CONTROL, "orchestratord")
    agents_before = {node: service_state(node, "pool-managerd") for node in (GPU_1, GPU_2)}
    _, health_before = registry("GET", "/health")

    rc, report = run_playbook("upgrade.yml", "-e", f"@{vars_file}")
    assert rc == 0, failures(report)

    # The control plane's wheels came out byte for byte the same: nothing changed there, no restart.
    assert changed(report, CONTROL) == 0
    daemon_after = service_state(CONTROL, "orchestratord")
    assert daemon_after["InvocationID"] == daemon_before["InvocationID"]
    assert daemon_after["MainPID"] == daemon_before["MainPID"]
    assert registry("GET", "/health")[1]["version"] == health_before["version"]

    # Every agent was restarted and registered again with the new version, and is back in service.
    agents_after = {node: service_state(node, "pool-managerd") for node in (GPU_1, GPU_2)}
    nodes = registered_nodes()
    for node in (GPU_1, GPU_2):
        assert agents_after[node]["ActiveState"] == "active"
        assert agents_after[node]["InvocationID"] != agents_before[node]["InvocationID"], node
        assert nodes[node]["version"] == new_version, nodes[node]
        assert_in_service(nodes[node])

    # One node at a time: one batch per node, in order, and the second node's agent restarted only after
    # the first node's batch (drain, restart, online, undrain) had ended.
    runs = batches(report, UPGRADE_NODES_PLAY)
    assert [run["hosts"] for run in runs] == [[GPU_1], [GPU_2]], runs
    first, second = runs
    assert started_at(agents_after[GPU_1]) < first["end"] <= second["start"] < started_at(agents_after[GPU_2])


def test_failed_upgrade_undrains_the_node_and_leaves_later_nodes_untouched():
    assert UPGRADE, "runs after the upgrade step, with the same changed sources (nothing left to install)"
    agents_before = {node: service_state(node, "pool-managerd") for node in (GPU_1, GPU_2)}

    rc, report = run_playbook(
        "upgrade.yml", "-e", f"@{UPGRADE['vars_file']}", "-e", "gpu_preflight_min_driver_version=999.0"
    )
    assert rc != 0, "an upgrade whose preflight cannot pass must fail"

    # The first node was drained, failed its preflight, and the rescue undrained it and stopped the play
    # with the failing task's name and message.
    assert any(
        result.get("changed")
        for result in task_results(report, "Drain the node in the registry and wait until it is idle", GPU_1)
    )
    stop = task_results(report, "Stop the upgrade", GPU_1)
    assert len(stop) == 1 and stop[0].get("failed"), failures(report)
    message = stop[0]["msg"]
    assert f"Upgrading {GPU_1} failed at" in message
    assert "required >= 999.0" in message
    assert "The node was undrained" in message

    # The second node's batch never ran: its agent is the one that ran before, never drained.
    assert [run["hosts"] for run in batches(report, UPGRADE_NODES_PLAY)] == [[GPU_1]]
    nodes = registered_nodes()
    for node in (GPU_1, GPU_2):
        assert_in_service(nodes[node])
        assert nodes[node]["version"] == UPGRADE["version"]
        assert service_state(node, "pool-managerd")["InvocationID"] == agents_before[node]["InvocationID"], (
            node
        )


def test_remove_node_stops_the_agent_and_deletes_the_node_from_the_registry():
    rc, report = run_playbook("remove_node.yml", "-e", f"node={GPU_2}", "-e", "confirm=yes")
    assert rc == 0, failures(report)

    assert registry("GET", f"/v2/nodes/{GPU_2}")[0] == 404
    nodes = registered_nodes()
    assert sorted(nodes) == [GPU_1]
    # The other node stays in service. Polled for two heartbeats: the failed upgrade before this test drained
    # and undrained GPU 1 within two seconds, and an agent that heard the drain in between reports its pools
    # draining until its next heartbeat hears the undrain.
    deadline = time.monotonic() + 2 * HEARTBEAT_S
    while registered_nodes()[GPU_1]["status"] != "online" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert_in_service(registered_nodes()[GPU_1])
    assert placed_node() == GPU_1

    removed = RUNNER.get_host(GPU_2)
    agent = removed.service("pool-managerd")
    assert not agent.is_running
    assert not agent.is_enabled
    assert not removed.file("/etc/llorch/pool-managerd.token").exists
    # Nor any secret of its own identity; the registry's delete revoked its credentials.
    assert not removed.file("/etc/llorch/pool-managerd.join-token").exists
    assert not removed.file("/var/lib/pool-managerd/credentials").exists
    status, listing = registry("GET", "/v2/credentials")
    assert status == 200, listing
    assert not [item["name"] for item in listing["credentials"] if GPU_2 in item["name"]]
    assert not removed.file("/etc/llorch/pool-managerd.yml").exists

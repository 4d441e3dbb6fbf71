"""Every caller on the least credential (issue 15): the controller's reader file reads the registry and cannot
drain; drain.yml takes the operator file. Real `ansible-playbook` runs against a real orchestratord."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from support_registry import add_node, ansible_env, run, run_tasks


@pytest.fixture
def daemon(daemon_factory):
    """Nodes stay online for the whole test, however slow the machine."""
    return daemon_factory(node_timeout_ms=120_000)


def issued(daemon, folder: Path, scope: str) -> Path:
    """A credential of `scope` issued through the API, in a 0600 file as role orchestratord writes it."""
    answer = daemon.api("POST", "/v2/credentials", {"name": f"ansible-{scope}-test", "scope": scope})
    assert answer.status == 201, answer.text
    folder.mkdir(mode=0o700, exist_ok=True)
    path = folder / f"{scope}.token"
    path.write_text(answer.body["secret"] + "\n")
    path.chmod(0o600)
    return path


def test_the_reader_file_cannot_drain_and_the_module_says_an_operator_credential_is_needed(daemon, tmp_path):
    add_node(daemon, "gpu-a", ["m1"])
    reader = issued(daemon, tmp_path / "credentials", "reader")
    env = ansible_env(daemon, tmp_path)
    del env["LLORCH_API_TOKEN"]
    listed, drain = run_tasks(
        env,
        tmp_path,
        [
            {"llorch.kit.llorch_nodes_info": {"token_file": str(reader)}},
            {
                "llorch.kit.llorch_node": {"node_id": "gpu-a", "state": "drained", "token_file": str(reader)},
                "ignore_errors": True,
            },
        ],
    )
    assert [node["node_id"] for node in listed["nodes"]] == ["gpu-a"]
    assert drain["failed"] and drain["status"] == 403
    assert drain["msg"] == (
        f"the registry at {daemon.url} answered POST /v2/nodes/gpu-a/drain with 403: FORBIDDEN credential "
        "reader 'ansible-reader-test' may only read /v2 and ask for placements; draining, undraining and "
        "deleting nodes need an operator credential (llorch_operator_token_file)"
    )
    assert daemon.api("GET", "/v2/nodes/gpu-a").body["status"] == "online"


def drain_inventory(daemon, tmp_path: Path, **shared: Any) -> Path:
    local = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
    inventory = {
        "all": {
            "vars": {
                "llorch_control_url": daemon.url,
                "llorch_api_token": daemon.token,
                "pool_managerd_drain_timeout_s": 0,
                **shared,
            },
            "children": {
                "control": {"hosts": {"ctl": {**local, "orchestratord_plain_http": True}}},
                "gpu_nodes": {"hosts": {"gpu-a": local}},
            },
        }
    }
    # Its own folder: validate_inventory refuses credential files inside the inventory folder.
    folder = tmp_path / "inventory"
    folder.mkdir(exist_ok=True)
    path = folder / "hosts.yml"
    path.write_text(yaml.safe_dump(inventory))
    path.chmod(0o600)
    return path


def test_drain_yml_drains_with_the_operator_file_and_a_reader_file_in_its_place_is_refused(daemon, tmp_path):
    add_node(daemon, "gpu-a", ["m1"])
    folder = tmp_path / "credentials"
    issued(daemon, folder, "operator")
    reader = issued(daemon, folder, "reader")
    env = ansible_env(None, tmp_path)

    inventory = drain_inventory(daemon, tmp_path, llorch_credentials_dir=str(folder))
    drained = run(["ansible-playbook", "-i", str(inventory), "playbooks/drain.yml"], env)
    assert drained.returncode == 0, drained.stdout + drained.stderr
    assert daemon.api("GET", "/v2/nodes/gpu-a").body["status"] == "draining"
    assert "node gpu-a drained by operator 'ansible-operator-test'" in daemon.log()

    # A reader file where the operator file should be: the playbook fails with the registry's reason.
    inventory = drain_inventory(daemon, tmp_path, llorch_operator_token_file=str(reader))
    playbook = ["ansible-playbook", "-i", str(inventory), "playbooks/drain.yml"]
    undrain = run([*playbook, "-e", "undrain=true"], env)
    assert undrain.returncode != 0
    assert "Undraining gpu-a at" in undrain.stdout
    assert "403: FORBIDDEN credential reader 'ansible-reader-test' may only read /v2" in undrain.stdout
    assert daemon.api("GET", "/v2/nodes/gpu-a").body["status"] == "draining"
    for done in (drained, undrain):
        assert daemon.token not in done.stdout + done.stderr

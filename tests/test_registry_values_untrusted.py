"""What a node reports is data, never a template: the inventory plugin and every playbook leave `{{ ... }}` in
registry values as text.

A node holding the cluster token can put any printable text into its address, version, machine id and GPU
names. If Ansible templated those, a GPU node could run code on the controller (a `lookup('pipe', ...)`).
These tests register such a node with a real daemon and look at what Ansible really does with it.
"""

from __future__ import annotations

import json
from pathlib import Path

from support import sample_heartbeat, sample_registration
from support_registry import ansible_env, inventory_file, run, run_tasks

REPO_ROOT = Path(__file__).resolve().parent.parent


def hostile_registration(marker: Path) -> dict:
    """A registration whose free-text fields are templates that would touch `marker` if ever evaluated."""
    pipe = f"{{{{ lookup('ansible.builtin.pipe', 'touch {marker}') }}}}"
    registration = sample_registration("gpu-hostile", pools=1)
    registration["address"] = f"http://10.0.0.9:8000/{pipe}"
    registration["version"] = "{{ 6 * 7 }}"
    registration["machine_id"] = pipe[:200]
    registration["capabilities"]["gpus"][0]["name"] = "{{ 6 * 7 }}"
    return registration


def register(daemon, registration: dict) -> None:
    answer = daemon.api("POST", "/v2/nodes/register", registration)
    assert answer.status == 200, answer.text
    beat = daemon.api(
        "POST", f"/v2/nodes/{registration['node_id']}/heartbeat", sample_heartbeat(registration, ["m1"])
    )
    assert beat.status == 200, beat.text


def test_inventory_marks_every_registry_string_untrusted(daemon, tmp_path):
    marker = tmp_path / "templated"
    registration = hostile_registration(marker)
    register(daemon, registration)
    env = ansible_env(daemon, tmp_path)
    source = inventory_file(tmp_path, detailed_vars=True)

    done = run(["ansible-inventory", "-i", str(source), "--list"], env)
    assert done.returncode == 0, done.stderr
    host_vars = json.loads(done.stdout)["_meta"]["hostvars"]["gpu-hostile"]
    # Ansible shows an untrusted string as {"__ansible_unsafe": text}: the wrapper itself is the promise.
    assert host_vars["llorch_address"] == {"__ansible_unsafe": registration["address"]}
    gpu_name = host_vars["llorch_gpus_detail"][0]["name"]
    assert gpu_name == {"__ansible_unsafe": "{{ 6 * 7 }}"}
    assert not marker.exists()


def test_playbooks_print_registry_values_as_text(daemon, tmp_path):
    marker = tmp_path / "templated"
    registration = hostile_registration(marker)
    register(daemon, registration)
    env = ansible_env(daemon, tmp_path)
    source = inventory_file(tmp_path, detailed_vars=True)

    # A play over the registry's hosts that uses the values the way operators' playbooks do.
    playbook = tmp_path / "use-vars.yml"
    playbook.write_text(
        "- hosts: llorch_nodes\n"
        "  gather_facts: false\n"
        "  connection: local\n"
        "  tasks:\n"
        "    - ansible.builtin.debug:\n"
        '        msg: "{{ llorch_address }} {{ llorch_gpus_detail[0].name }}"\n'
    )
    done = run(
        ["ansible-playbook", "-i", str(source), str(playbook)],
        {**env, "ANSIBLE_STDOUT_CALLBACK": "ansible.builtin.json"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout)["plays"][0]["tasks"][0]["hosts"]["gpu-hostile"]
    assert result["msg"] == f"{registration['address']} {{{{ 6 * 7 }}}}"

    # The module side: llorch_nodes_info's results registered and printed, as status.yml does.
    results = run_tasks(
        env,
        tmp_path,
        [
            {"llorch.kit.llorch_nodes_info": {"node_id": "gpu-hostile"}, "register": "found"},
            {"ansible.builtin.debug": {"msg": "{{ found.nodes[0].version }} {{ found.nodes[0].address }}"}},
        ],
    )
    assert results[1]["msg"] == f"{{{{ 6 * 7 }}}} {registration['address']}"

    status = run(
        ["ansible-playbook", str(REPO_ROOT / "playbooks" / "status.yml")],
        {**env, "ANSIBLE_STDOUT_CALLBACK": "ansible.builtin.json"},
    )
    assert status.returncode == 0, status.stdout + status.stderr
    shown = json.loads(status.stdout)["plays"][0]["tasks"][-1]["hosts"]["localhost"]["msg"]
    assert "gpu-hostile" in shown and "42" not in shown
    assert not marker.exists()

"""Run the kit's roles through `ansible-playbook` on localhost, for the roles' tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from support import REPO_ROOT

ANSIBLE_PLAYBOOK = Path(sys.executable).with_name("ansible-playbook")
STANDIN = REPO_ROOT / "files" / "testing" / "nvidia-smi-standin"


def run_playbook(
    tmp_path: Path, plays: list[dict[str, Any]], inventory: dict[str, Any], env: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    """Write the plays and the inventory into tmp_path, run them (JSON callback), return (rc, output)."""
    playbook = tmp_path / "playbook.yml"
    playbook.write_text(yaml.safe_dump(plays))
    hosts = tmp_path / "hosts.yml"
    hosts.write_text(yaml.safe_dump(inventory))
    child_env = dict(os.environ)
    child_env.update(
        ANSIBLE_CONFIG=str(REPO_ROOT / "ansible.cfg"),
        ANSIBLE_ROLES_PATH=str(REPO_ROOT / "roles"),
        ANSIBLE_STDOUT_CALLBACK="json",
        ANSIBLE_LOCALHOST_WARNING="0",
        ANSIBLE_LOCAL_TEMP=str(tmp_path / "ansible-tmp"),
        **(env or {}),
    )
    proc = subprocess.run(
        [str(ANSIBLE_PLAYBOOK), "-i", str(hosts), str(playbook)],
        cwd=REPO_ROOT,
        env=child_env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.stdout, proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def failures(output: dict[str, Any]) -> dict[str, str]:
    """host -> message of the task that failed it."""
    found = {}
    for play in output["plays"]:
        for task in play["tasks"]:
            for host, result in task["hosts"].items():
                if result.get("failed") and not result.get("ignore_errors"):
                    # A failed loop holds its messages in the items that failed.
                    items = [item.get("msg", "") for item in result.get("results", []) if item.get("failed")]
                    found[host] = " ".join(items) or result.get("msg", "")
    return found


def local_host(**host_vars: Any) -> dict[str, Any]:
    """Inventory vars for a host that is this machine, run with the test's own Python."""
    return {"ansible_connection": "local", "ansible_python_interpreter": sys.executable, **host_vars}


def render_role(
    tmp_path: Path,
    role: str,
    template: str | None = None,
    facts: tuple[str, ...] = (),
    host: str = "host-1",
    shared_vars: dict[str, Any] | None = None,
    host_vars: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What a role makes of its variables, without running it: its `template` rendered and the named internal
    variables as values, with the role's defaults and `shared_vars` as group vars, its vars/main.yml loaded
    and `host_vars` on the one host. Returns {"config": the rendered file, name: value, ...}."""
    role_dir = REPO_ROOT / "roles" / role
    out = tmp_path / "rendered"
    out.mkdir(exist_ok=True)
    tasks: list[dict[str, Any]] = []
    if template is not None:
        tasks.append(
            {
                "ansible.builtin.template": {
                    "src": str(role_dir / "templates" / template),
                    "dest": str(out / template),
                    "mode": "0644",
                }
            }
        )
    tasks += [
        {"ansible.builtin.copy": {"content": "{{ " + name + " | to_json }}", "dest": str(out / name)}}
        for name in facts
    ]
    play = {
        "name": "render",
        "hosts": "all",
        "gather_facts": False,
        "vars_files": [str(role_dir / "vars" / "main.yml")],
        "tasks": tasks,
    }
    defaults = yaml.safe_load((role_dir / "defaults" / "main.yml").read_text())
    inventory = {
        "all": {"vars": {**defaults, **(shared_vars or {})}, "hosts": {host: local_host(**(host_vars or {}))}}
    }
    rc, output = run_playbook(tmp_path, [play], inventory)
    assert rc == 0, failures(output)
    rendered: dict[str, Any] = {name: yaml.safe_load((out / name).read_text()) for name in facts}
    if template is not None:
        rendered["config"] = out / template
    return rendered


# Role validate_inventory on its own, as the playbooks run it first.
VALIDATE_PLAY = [
    {
        "name": "Validate",
        "hosts": "all",
        "gather_facts": False,
        "run_once": True,
        "roles": ["validate_inventory"],
    }
]


def validate(tmp_path: Path, inventory: dict) -> tuple[int, str]:
    """validate_inventory against `inventory`: its exit code and every failure message, in one line."""
    rc, output = run_playbook(tmp_path, VALIDATE_PLAY, inventory)
    return rc, " ".join(failures(output).values())

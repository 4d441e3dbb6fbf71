"""Host keys: production inventories check them; only the lab's throwaway containers skip the check."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from support import REPO_ROOT

BIN = Path(sys.executable).parent


def _ansible(tool: str, *args: str) -> Any:
    """Run an ansible CLI with the repo's ansible.cfg and no ANSIBLE_* overrides from the caller's shell."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("ANSIBLE_")}
    env["ANSIBLE_CONFIG"] = str(REPO_ROOT / "ansible.cfg")
    proc = subprocess.run(
        [str(BIN / tool), *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _ssh_settings() -> dict[str, Any]:
    """The ssh connection plugin's effective settings from ansible.cfg."""
    plugins = _ansible("ansible-config", "dump", "-t", "connection", "--format", "json")
    for entry in plugins:
        if "ssh" in entry:
            return {setting["name"]: setting["value"] for setting in entry["ssh"]}
    raise AssertionError(f"no ssh connection plugin in {[list(entry) for entry in plugins]}")


def _host_vars(inventory: Path, host: str) -> dict[str, Any]:
    return _ansible("ansible-inventory", "-i", str(inventory), "--host", host)


def _effective_host_key_checking(host_vars: dict[str, Any], settings: dict[str, Any]) -> bool:
    """What the ssh plugin does for a host: the inventory variable wins over ansible.cfg, and an
    ssh argument that turns the check off wins over both."""
    checking = bool(host_vars.get("ansible_host_key_checking", settings["host_key_checking"]))
    args = " ".join(
        str(value)
        for value in (
            settings.get("ssh_args"),
            settings.get("ssh_common_args"),
            host_vars.get("ansible_ssh_common_args"),
            host_vars.get("ansible_ssh_extra_args"),
        )
        if value
    )
    return checking and "StrictHostKeyChecking=no" not in args


def test_ansible_cfg_checks_host_keys_for_every_inventory():
    settings = _ssh_settings()
    assert settings["host_key_checking"] is True
    assert "StrictHostKeyChecking=no" not in settings["ssh_args"]
    assert "UserKnownHostsFile=/dev/null" not in settings["ssh_args"]


def test_the_example_production_inventory_checks_host_keys():
    settings = _ssh_settings()
    for host in ("llorch-ctl-01", "gpu-a01", "gpu-b01"):
        host_vars = _host_vars(REPO_ROOT / "inventories" / "example" / "hosts.yml", host)
        assert _effective_host_key_checking(host_vars, settings), host


def test_only_the_lab_inventory_skips_host_key_checks(tmp_path):
    # The lab's hosts.yml is written by lab/up.sh beside its group_vars; a copy with one host of each group.
    lab = tmp_path / "lab"
    shutil.copytree(REPO_ROOT / "inventories" / "lab", lab, ignore=shutil.ignore_patterns("hosts.yml"))
    hosts = {
        "all": {
            "vars": {"ansible_connection": "ssh", "ansible_user": "root"},
            "children": {
                "control": {"hosts": {"llorch-control": {"ansible_host": "10.89.0.10"}}},
                "gpu_nodes": {"hosts": {"llorch-gpu-1": {"ansible_host": "10.89.0.11"}}},
            },
        }
    }
    (lab / "hosts.yml").write_text(yaml.safe_dump(hosts))
    settings = _ssh_settings()
    for host in ("llorch-control", "llorch-gpu-1"):
        host_vars = _host_vars(lab / "hosts.yml", host)
        assert not _effective_host_key_checking(host_vars, settings), host
        # The containers' changing keys never reach the operator's known_hosts.
        assert "UserKnownHostsFile=/dev/null" in host_vars["ansible_ssh_common_args"]

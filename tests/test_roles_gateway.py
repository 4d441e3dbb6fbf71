"""What the roles give the gateway: orchestratord's settings, its client keys file, and each node's engine key
on the control hosts.

Everything runs through real ansible-playbook runs on localhost with the roles' own defaults, vars and task
files; what they write is read back with the daemon's own code (settings, id rule).
"""

from __future__ import annotations

import grp
import os
import pwd
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import REPO_ROOT
from support_roles import failures, local_host, render_role, run_playbook

sys.path.insert(0, str(REPO_ROOT / "files" / "orchestratord"))
from orchestratord.client_keys import load_client_keys
from orchestratord.config import SETTING_NAMES, Settings, load_settings
from orchestratord.engine_keys import EngineKeys

ROLE = REPO_ROOT / "roles" / "orchestratord"
ME = pwd.getpwuid(os.getuid()).pw_name
MY_GROUP = grp.getgrgid(os.getgid()).gr_name


def _render_config(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    """orchestratord.yml as the role renders it from its defaults (as group vars) and these host vars."""
    out = render_role(
        tmp_path, "orchestratord", "orchestratord.yml.j2", host="control-1", host_vars=overrides
    )
    # The daemon's own loader: an unknown key, a wrong type or a value out of range fails here.
    return {
        "settings": load_settings(out["config"], environ={}),
        "values": yaml.safe_load(out["config"].read_text()),
    }


def test_the_gateway_settings_render_with_the_designs_defaults(tmp_path):
    rendered = _render_config(tmp_path)
    settings, values = rendered["settings"], rendered["values"]
    assert settings.client_keys_file == "/etc/llorch/client-keys"
    assert settings.engine_keys_dir == "/etc/llorch/engine-keys"
    # Every gateway setting is rendered, with the daemon's own default: one home for each default.
    defaults = Settings()
    gateway_names = [name for name in SETTING_NAMES if name.startswith("gateway_")]
    assert gateway_names, "the daemon has gateway settings"
    for name in gateway_names:
        assert values[name] == getattr(defaults, name), name


def test_no_client_keys_and_no_engine_keys_render_as_null(tmp_path):
    settings = _render_config(
        tmp_path,
        orchestratord_client_keys=[],
        orchestratord_engine_keys_dir=None,
        orchestratord_gateway_queue_max="17",
        orchestratord_gateway_idle_timeout_ms=5000,
    )["settings"]
    assert settings.client_keys_file is None and settings.engine_keys_dir is None
    # A number given as a string in an inventory still reaches the daemon as a number.
    assert (settings.gateway_queue_max, settings.gateway_idle_timeout_ms) == (17, 5000)


def _client_keys(tmp_path: Path, store: Path, names: list[str]) -> tuple[int, dict[str, Any], Path]:
    """Run the role's client key tasks, then write the client keys file the way the role hands it to
    llorch_service (its _orchestratord_private_files), into tmp_path/client-keys."""
    written = tmp_path / "client-keys"
    play = {
        "name": "client keys",
        "hosts": "all",
        "gather_facts": False,
        "tasks": [
            {
                "ansible.builtin.include_role": {
                    "name": "orchestratord",
                    "tasks_from": "client_keys",
                    "public": True,
                },
                "vars": {"orchestratord_client_keys": names, "orchestratord_client_key_store": str(store)},
            },
            {
                "ansible.builtin.copy": {
                    "content": "{{ _orchestratord_private_files[0].content }}",
                    "dest": "{{ _orchestratord_private_files[0].path }}",
                    "mode": "0600",
                },
                "vars": {
                    "orchestratord_client_keys": names,
                    "orchestratord_client_keys_file": str(written),
                },
                "no_log": True,
            },
        ],
    }
    rc, output = run_playbook(tmp_path, [play], {"all": {"hosts": {"control-1": local_host()}}})
    return rc, output, written


def _read_client_keys(path: Path, names: list[str], store: Path) -> dict[str, str]:
    """The file read by the daemon's own reader (format, id rule, lengths, owner-only 0600, no duplicates),
    then each store key looked up by it: name -> key."""
    client_keys = load_client_keys(str(path), cluster_token="t" * 48)
    assert len(client_keys) == len(names)
    keys = {name: (store / name).read_text().strip() for name in names}
    assert {name: client_keys.name_of(f"Bearer {key}") for name, key in keys.items()} == {n: n for n in names}
    return keys


def test_client_keys_are_made_once_on_the_controller_and_written_name_and_key(tmp_path):
    store = tmp_path.parent / f"{tmp_path.name}-client-keys"
    names = ["default", "team-a.batch"]
    rc, output, written = _client_keys(tmp_path, store, names)
    assert rc == 0, failures(output)
    first = _read_client_keys(written, names, store)
    for name in names:
        assert (store / name).stat().st_mode & 0o777 == 0o600
        assert len(first[name]) == 48 and first[name].isalnum()
        assert first[name] not in str(output), "a client key must never show in task output"
    # A second run reads the same keys back: the host's file, and so the daemon, stay as they were.
    rc, output, written = _client_keys(tmp_path, store, names)
    assert rc == 0, failures(output)
    assert _read_client_keys(written, names, store) == first


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (["default", "no spaces"], 'refused: ["no spaces"]'),
        (["..", "ok"], 'refused: [".."]'),
        (["a", "b", "a"], "a name is given more than once"),
    ],
)
def test_bad_client_key_names_are_refused_before_a_key_is_made(tmp_path, names, expected):
    store = tmp_path.parent / f"{tmp_path.name}-client-keys"
    rc, output, _ = _client_keys(tmp_path, store, names)
    assert rc != 0
    (message,) = failures(output).values()
    assert "orchestratord_client_keys must hold distinct names" in message and expected in message, message
    assert not store.exists()


def test_a_client_key_store_inside_the_inventory_folder_is_refused_before_a_key_is_made(tmp_path):
    # The inventory is tmp_path/hosts.yml: the shared check (llorch_service, entry point key_store) refuses.
    rc, output, _ = _client_keys(tmp_path, tmp_path / "client-keys-store", ["default"])
    assert rc != 0
    (message,) = failures(output).values()
    assert message.startswith("orchestratord_client_key_store (")
    assert "lies inside the inventory folder" in message
    assert "default: ~/.local/share/llorch-kit/client-keys" in message
    assert not (tmp_path / "client-keys-store").exists()


def _engine_key(tmp_path: Path, entry_point: str, keys_dir: Path) -> tuple[int, dict[str, Any]]:
    """Run llorch_engine's `key` (or `forget`) for GPU node gpu-7 (node id gpu-seven) with one control host;
    both are this machine."""
    play = {
        "name": entry_point,
        "hosts": "gpu_nodes",
        "gather_facts": False,
        "tasks": [
            {
                "ansible.builtin.include_role": {"name": "llorch_engine", "tasks_from": entry_point},
                "vars": {
                    "llorch_engine_api_key_store": str(tmp_path.parent / f"{tmp_path.name}-engine-keys"),
                    "llorch_engine_config_dir": str(tmp_path / "etc"),
                    "llorch_engine_api_key_file": str(tmp_path / "etc" / "engine-api-key"),
                    "llorch_engine_gateway_keys_dir": str(keys_dir),
                },
            }
        ],
    }
    inventory = {
        "all": {
            "children": {
                "gpu_nodes": {"hosts": {"gpu-7": local_host(pool_managerd_node_id="gpu-seven")}},
                # The control host names the daemon's account: the copy is that user's.
                "control": {
                    "hosts": {"control-1": local_host(orchestratord_user=ME, orchestratord_group=MY_GROUP)}
                },
            }
        }
    }
    return run_playbook(tmp_path, [play], inventory)


def test_each_node_key_reaches_the_control_hosts_gateway_and_leaves_with_the_node(tmp_path):
    keys_dir = tmp_path / "engine-keys"
    keys_dir.mkdir(mode=0o750)
    rc, output = _engine_key(tmp_path, "key", keys_dir)
    assert rc == 0, failures(output)
    node_key = (tmp_path / "etc" / "engine-api-key").read_text()
    copy = keys_dir / "gpu-seven"
    assert copy.read_text() == node_key and len(node_key.strip()) == 48
    # The daemon's own reader (owner-only, no link, one line) sends it to the node's engines.
    assert EngineKeys(str(keys_dir)).headers_for("gpu-seven")["Authorization"] == f"Bearer {node_key.strip()}"
    assert copy.stat().st_mode & 0o777 == 0o600
    assert (copy.owner(), copy.group()) == (ME, MY_GROUP)
    assert node_key.strip() not in str(output), "the key must never show in task output"

    rc, output = _engine_key(tmp_path, "forget", keys_dir)
    assert rc == 0, failures(output)
    assert not copy.exists()


def test_a_control_host_without_the_engine_keys_folder_is_named_with_the_fix(tmp_path):
    rc, output = _engine_key(tmp_path, "key", tmp_path / "no-such-folder")
    assert rc != 0
    (message,) = failures(output).values()
    assert message.startswith(f"control-1 has no folder {tmp_path}/no-such-folder")
    assert "run playbooks/control_plane.yml first" in message

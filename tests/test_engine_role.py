"""What role llorch_engine (and pool_managerd's config) render is what the agent and engine_exec read.

The role's templates are rendered by a real ansible-playbook run on localhost with the role's own defaults
and vars, then read with the agent's own loaders: a key the struct does not know, a value the template
quotes wrongly or a drop-in that grants another pool's GPU fails here, not on a node.
"""

from __future__ import annotations

import sys
from typing import Any

import pytest
import yaml
from support import REPO_ROOT
from support_roles import failures, local_host, run_playbook

sys.path.insert(0, str(REPO_ROOT / "files" / "pool_managerd"))
from pool_managerd.config import load_settings
from pool_managerd.engine_config import load_pool_engines
from pool_managerd.node import with_engine_slots

ROLE = REPO_ROOT / "roles" / "llorch_engine"
AGENT_ROLE = REPO_ROOT / "roles" / "pool_managerd"

# Arguments that YAML would misread if the template did not quote them: a comment sign, a mapping-like
# string, a number-like string, quotes and a backslash.
AWKWARD_ARGS = [
    "--threads",
    "1",
    "--chat-template",
    "{a: b, c: [1]} # not a comment",
    "--temp",
    "0.7",
    'say "hi" \\n',
]

POOLS = [
    {
        "pool_id": "tp2",
        "gpus": [2, 3],
        "engine": {"model": "org/model-a", "port": 8101, "parallel": 4, "extra_args": AWKWARD_ARGS},
    },
    {"pool_id": "cpu0", "engine": {"kind": "llama.cpp", "model": "org/model-b", "port": 8102}},
    {"pool_id": "plain", "gpus": [0], "slots_total": 3},
]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The engine files, the drop-ins, the unit and the agent's config for POOLS, rendered once."""
    tmp_path = tmp_path_factory.mktemp("engine-role")
    out = tmp_path / "out"
    engine_vars = {
        "pool_managerd_pools": POOLS,
        "llorch_engine_config_dir": str(out),
        "llorch_engine_host": "10.0.0.7",
        "llorch_networks": ["10.0.0.0/24"],
        # The agent role's names the templates read.
        "pool_managerd_node_id": "gpu-7",
        "pool_managerd_control_url": "http://control:9200",
        "_pool_managerd_control_base": "http://control:9200",
        "_pool_managerd_engine_files_dir": str(out / "engines"),
        "pool_managerd_token_file": "/etc/llorch/pool-managerd.token",
        "pool_managerd_address": "http://10.0.0.7:8000",
        "pool_managerd_models_dir": "/var/lib/llorch/models",
        "pool_managerd_nvidia_smi": "nvidia-smi",
        "pool_managerd_allow_cpu_pools": True,
        "pool_managerd_deregister_on_stop": True,
        "pool_managerd_request_timeout_s": 5,
        "pool_managerd_ca_file": None,
        "_pool_managerd_tls": False,
        "pool_managerd_log_level": "info",
    }
    template = {"ansible.builtin.template": {"src": "{{ src }}", "dest": "{{ dest }}", "mode": "0644"}}
    plays = [
        {
            "name": "render",
            "hosts": "localhost",
            "gather_facts": False,
            "vars_files": [str(ROLE / "vars" / "main.yml")],
            "tasks": [
                {"ansible.builtin.file": {"path": str(out / "engines"), "state": "directory"}},
                {
                    "name": "engine files",
                    **template,
                    "vars": {
                        "src": str(ROLE / "templates" / "engine.yml.j2"),
                        "dest": f"{out}/engines/{{{{ item.pool_id }}}}.yml",
                    },
                    "loop": "{{ _llorch_engine_pools }}",
                },
                {
                    "name": "drop-ins",
                    **template,
                    "vars": {
                        "src": str(ROLE / "templates" / "devices.conf.j2"),
                        "dest": f"{out}/{{{{ item.pool_id }}}}.conf",
                    },
                    "loop": "{{ _llorch_engine_pools }}",
                },
                {
                    "name": "unit",
                    **template,
                    "vars": {
                        "src": str(ROLE / "templates" / "llorch-engine@.service.j2"),
                        "dest": f"{out}/unit",
                    },
                },
                {
                    "name": "agent config",
                    **template,
                    "vars": {
                        "src": str(AGENT_ROLE / "templates" / "pool-managerd.yml.j2"),
                        "dest": f"{out}/agent.yml",
                    },
                },
            ],
        }
    ]
    # The role's defaults as group vars, so that this host's settings override them as an inventory would.
    defaults = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    inventory = {"all": {"vars": defaults, "hosts": {"localhost": local_host(**engine_vars)}}}
    rc, output = run_playbook(tmp_path, plays, inventory)
    assert rc == 0, failures(output)
    return {
        "engines": {path.stem: path for path in (out / "engines").glob("*.yml")},
        "dropins": {path.stem: path.read_text() for path in out.glob("*.conf")},
        "unit": (out / "unit").read_text(),
        "agent": out / "agent.yml",
        "out": out,
    }


def test_role_files_read_back_through_the_agents_own_loaders(rendered):
    # One engine file per pool with an engine section, none for the pool without.
    assert sorted(rendered["engines"]) == ["cpu0", "tp2"]

    settings = load_settings(rendered["agent"])
    engines = load_pool_engines(settings.pools)
    assert sorted(engines) == ["cpu0", "tp2"]
    tp2, cpu0 = engines["tp2"], engines["cpu0"]
    assert (tp2.kind, tp2.model_id, tp2.host, tp2.port, tp2.url) == (
        "llama.cpp",
        "org/model-a",
        "10.0.0.7",
        8101,
        "http://10.0.0.7:8101",
    )
    assert tp2.gpus == (2, 3) and tp2.cuda_visible_devices == "2,3"
    # Every argument arrives as written, however YAML would read it bare.
    assert list(tp2.extra_args) == AWKWARD_ARGS
    assert tp2.binary == "/opt/llorch-engine/current/llama-server"
    assert tp2.models_dir == "/var/lib/llorch/models"
    # Defaults of the design: context 2048, one slot; a CPU pool has no GPU at all.
    assert (cpu0.context_size, cpu0.parallel, cpu0.cuda_visible_devices) == (2048, 1, "")

    # The agent's pools take their slots from the engines; a pool without one keeps its own.
    slots = {pool.pool_id: pool.slots_total for pool in with_engine_slots(settings.pools, engines)}
    assert slots == {"tp2": 4, "cpu0": 1, "plain": 3}
    assert settings.engine_api_key_file == "/run/credentials/pool-managerd.service/engine-api-key"


def test_each_pool_may_open_its_own_gpus_only(rendered):
    dropins = rendered["dropins"]
    tp2 = dropins["tp2"].splitlines()
    assert "DevicePolicy=closed" in tp2
    assert {
        "DeviceAllow=/dev/nvidia2 rw",
        "DeviceAllow=/dev/nvidia3 rw",
        "DeviceAllow=/dev/nvidiactl rw",
    } <= set(tp2)
    assert not any(line in tp2 for line in ("DeviceAllow=/dev/nvidia0 rw", "DeviceAllow=/dev/nvidia1 rw"))
    # A CPU pool gets no device node and only the process part of /proc.
    cpu0 = dropins["cpu0"].splitlines()
    assert "PrivateDevices=true" in cpu0 and "ProcSubset=pid" in cpu0
    assert not any(line.startswith("DeviceAllow=") for line in cpu0)


def test_unit_runs_engine_exec_as_its_user_with_the_key_as_a_credential(rendered):
    unit = rendered["unit"].splitlines()
    out = rendered["out"]
    assert "User=llorch-engine" in unit
    python = "/opt/llorch/pool_managerd/bin/python"
    assert f"ExecStart={python} -m pool_managerd.engine_exec {out}/engines/%i.yml" in unit
    assert f"LoadCredential=engine-api-key:{out}/engine-api-key" in unit
    assert "RestartPreventExitStatus=2" in unit and "Restart=on-failure" in unit
    assert {"IPAddressDeny=any", "IPAddressAllow=localhost", "IPAddressAllow=10.0.0.0/24"} <= set(unit)
    # The key is a file systemd hands over: no line of the unit carries a key or an environment secret.
    assert not any(line.startswith(("Environment=", "EnvironmentFile=")) for line in unit)


def _make_key(tmp_path, store) -> tuple[int, dict[str, Any]]:
    play = {
        "name": "key",
        "hosts": "all",
        "gather_facts": False,
        "tasks": [
            {
                "ansible.builtin.include_role": {"name": "llorch_engine", "tasks_from": "key"},
                "vars": {
                    "llorch_engine_api_key_store": str(store),
                    "llorch_engine_config_dir": str(tmp_path / "etc"),
                    "llorch_engine_api_key_file": str(tmp_path / "etc" / "engine-api-key"),
                },
            }
        ],
    }
    return run_playbook(tmp_path, [play], {"all": {"hosts": {"gpu-7": local_host()}}})


def test_a_key_store_inside_the_inventory_folder_is_refused_before_a_key_is_made(tmp_path):
    # The inventory is tmp_path/hosts.yml: a key file under tmp_path would be read as an inventory source.
    rc, output = _make_key(tmp_path, tmp_path / "credentials")
    assert rc != 0
    (message,) = failures(output).values()
    assert "lies inside the inventory folder" in message and "print the key as a host name" in message
    assert not (tmp_path / "credentials").exists()


def test_the_key_is_made_once_outside_the_inventory_and_kept_private(tmp_path):
    store = tmp_path.parent / f"{tmp_path.name}-keys"
    for _ in range(2):
        rc, output = _make_key(tmp_path, store)
        assert rc == 0, failures(output)
    key = (store / "gpu-7").read_text().strip()
    assert len(key) == 48 and key.isalnum()
    assert (store / "gpu-7").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "etc" / "engine-api-key").read_text() == key + "\n"
    assert (tmp_path / "etc" / "engine-api-key").stat().st_mode & 0o777 == 0o600
    assert key not in str(output), "the key must never show in task output"

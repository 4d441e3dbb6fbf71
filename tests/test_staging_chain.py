"""The whole staging chain with real parts: stage_models.yml writes the manifest, the running pool-managerd
reads it at its next heartbeat (no restart), and the registry lists the model; removing it takes it out again.

Nothing here reports to the registry on the agent's behalf: the only heartbeats are the real agent's.
"""

from __future__ import annotations

import grp
import hashlib
import json
import os
import sys
from pathlib import Path

import pytest
import yaml
from support import wait_until
from support_agent import make_agent
from support_staging import FileServer, ansible_stage_models, deterministic_bytes, run_module

MODEL = deterministic_bytes(256 * 1024, seed=11)
MODEL_ID = "meta-llama/Llama-3.1-8B-Instruct"  # the README's own example id, with its publisher prefix
NODE_ID = "chain-node-1"


@pytest.fixture
def served(tmp_path) -> FileServer:
    root = tmp_path / "mirror"
    root.mkdir()
    (root / "llama.gguf").write_bytes(MODEL)
    server = FileServer(root).start()
    yield server
    server.stop()


def listed_models(daemon) -> list[str]:
    answer = daemon.api("GET", f"/v2/nodes/{NODE_ID}")
    return answer.body["models"] if answer.status == 200 else []


def stage_models_playbook(tmp_path: Path, daemon, served: FileServer, models_dir: Path):
    inventory = tmp_path / "inventory.yml"
    host = {
        "ansible_connection": "local",
        "ansible_python_interpreter": sys.executable,
        "ansible_become": False,
        "llorch_controller_url": daemon.url,
        "llorch_api_token": daemon.token,
        "pool_managerd_node_id": NODE_ID,
        "model_staging_dir": str(models_dir),
        "model_staging_group": grp.getgrgid(os.getgid()).gr_name,
        "model_staging_models": [
            {
                "id": MODEL_ID,
                "source": f"{served.url}/llama.gguf",
                "sha256": hashlib.sha256(MODEL).hexdigest(),
            }
        ],
        "stage_models_registry_wait_s": 30,
    }
    inventory.write_text(yaml.safe_dump({"gpu_nodes": {"hosts": {"gpu-host": host}}}))
    inventory.chmod(0o600)  # it holds the token
    return ansible_stage_models(inventory)


def test_staged_model_reaches_the_registry_through_the_running_agent(tmp_path, daemon, served):
    agent = make_agent(tmp_path / "agent", daemon, node_id=NODE_ID)
    agent.start()
    try:
        wait_until(lambda: daemon.api("GET", f"/v2/nodes/{NODE_ID}").body.get("status") == "online", 20)
        assert listed_models(daemon) == []
        started_pid = agent.proc.pid

        done = stage_models_playbook(tmp_path, daemon, served, agent.models_dir)

        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
        manifest = json.loads((agent.models_dir / "manifest.json").read_text())
        assert manifest[MODEL_ID]["size_bytes"] == len(MODEL)
        # The playbook's own check waited for the agent's heartbeat; the registry says so too.
        assert listed_models(daemon) == [MODEL_ID]
        assert agent.running() and agent.proc.pid == started_pid  # read at a heartbeat, not a restart

        removed, _ = run_module({"id": MODEL_ID, "state": "absent", "models_dir": str(agent.models_dir)})
        assert removed.get("changed") is True, removed
        wait_until(lambda: listed_models(daemon) == [], 20, what=f"{MODEL_ID} gone from the registry")
        assert agent.running() and agent.proc.pid == started_pid
    finally:
        agent.stop()

"""playbooks/stage_models.yml end to end on localhost: it stages, then asks a real orchestratord whether the
node reports the models, and fails naming the node and the model when it does not."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from support import sample_heartbeat, sample_registration
from support_staging import FileServer, ansible_stage_models, current_group, deterministic_bytes

MODEL = deterministic_bytes(512 * 1024, seed=3)
NODE_ID = "stage-node-1"


@pytest.fixture
def served(tmp_path) -> FileServer:
    root = tmp_path / "mirror"
    root.mkdir()
    (root / "tiny.bin").write_bytes(MODEL)
    server = FileServer(root).start()
    yield server
    server.stop()


def run_stage_models(tmp_path: Path, daemon, served: FileServer) -> subprocess.CompletedProcess:
    # The token goes into the inventory file (0600), never onto the command line.
    inventory = tmp_path / "inventory.yml"
    inventory.write_text(
        yaml.safe_dump(
            {
                "gpu_nodes": {
                    "hosts": {
                        NODE_ID: {
                            "ansible_connection": "local",
                            "ansible_python_interpreter": sys.executable,
                            "ansible_become": False,
                            # A trailing slash (validate_inventory allows it) must not give //v2/...
                            "llorch_controller_url": daemon.url + "/",
                            "llorch_api_token": daemon.token,
                            "model_staging_dir": str(tmp_path / "models"),
                            "model_staging_group": current_group(),
                            "model_staging_models": [
                                {
                                    "id": "tiny",
                                    "source": f"{served.url}/tiny.bin",
                                    "sha256": hashlib.sha256(MODEL).hexdigest(),
                                }
                            ],
                            "stage_models_registry_wait_s": 3,
                        }
                    }
                }
            }
        )
    )
    inventory.chmod(0o600)
    return ansible_stage_models(inventory)


def report(daemon, models: list[str]) -> None:
    registration = sample_registration(NODE_ID)
    assert daemon.api("POST", "/v2/nodes/register", registration).status == 200
    heartbeat = sample_heartbeat(registration, models=models)
    assert daemon.api("POST", f"/v2/nodes/{NODE_ID}/heartbeat", heartbeat).status == 200


def test_stage_models_checks_that_the_registry_lists_the_model(tmp_path, daemon, served):
    report(daemon, ["tiny"])  # what the agent would send at its next heartbeat

    proc = run_stage_models(tmp_path, daemon, served)

    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    assert f"the registry lists tiny on node {NODE_ID}" in proc.stdout
    assert json.loads((tmp_path / "models" / "manifest.json").read_text())["tiny"]["size_bytes"] == len(MODEL)
    assert daemon.token not in proc.stdout + proc.stderr


def test_stage_models_fails_naming_the_node_and_the_missing_model(tmp_path, daemon, served):
    report(daemon, [])  # the node is known but does not report the model

    proc = run_stage_models(tmp_path, daemon, served)

    assert proc.returncode != 0
    assert f"does not list tiny on node {NODE_ID}" in proc.stdout, proc.stdout[-3000:]
    assert daemon.token not in proc.stdout + proc.stderr

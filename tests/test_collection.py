"""The built collection, installed the way a user installs it, works from a playbook outside this repo."""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
import yaml
from support import REPO_ROOT
from support_registry import VENV_BIN, add_node


def ansible(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 180):
    command = [str(VENV_BIN / args[0]), *args[1:]]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def outside_env(project: Path) -> dict[str, str]:
    """Nothing from this checkout: the project's own ansible.cfg, no ANSIBLE_* or LLORCH_* from the caller."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("ANSIBLE_", "LLORCH_")) and name != "PYTHONPATH"
    }
    env.update(
        ANSIBLE_CONFIG=str(project / "ansible.cfg"),
        ANSIBLE_LOCAL_TEMP=str(project / "ansible-tmp"),
        ANSIBLE_NOCOLOR="1",
    )
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(artifact, collections path): the collection built from this tree and installed into a fresh path."""
    work = tmp_path_factory.mktemp("collection")
    env = outside_env(work)
    build = ["ansible-galaxy", "collection", "build", "--output-path", str(work), str(REPO_ROOT)]
    built = ansible(build, work, env)
    assert built.returncode == 0, built.stdout + built.stderr
    (artifact,) = work.glob("llorch-kit-*.tar.gz")
    collections = work / "collections"
    # --force: a llorch.kit already installed in a default path (~/.ansible/collections) would otherwise
    # make ansible-galaxy report "Nothing to do" and install nothing here.
    install = ["ansible-galaxy", "collection", "install", "--force", "-p", str(collections), str(artifact)]
    done = ansible(install, work, env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (collections / "ansible_collections" / "llorch" / "kit" / "MANIFEST.json").is_file(), done.stdout
    return artifact, collections


def test_the_artifact_holds_the_collection_and_leaves_out_tests_and_the_lab(installed):
    artifact, _ = installed
    with tarfile.open(artifact) as tar:
        names = set(tar.getnames())
    for shipped in (
        "MANIFEST.json",
        "COPYING",
        "meta/runtime.yml",
        "plugins/modules/llorch_node.py",
        "plugins/module_utils/llorch_contract.py",
        "plugins/test/llorch_ids.py",
        "plugins/inventory/llorch_registry.py",
        "roles/validate_inventory/tasks/main.yml",
        "files/orchestratord/pyproject.toml",
    ):
        assert shipped in names, shipped
    for left_out in ("tests", "bench", "lab", "molecule", ".venv", "files/testing", ".collections"):
        assert not any(name == left_out or name.startswith(left_out + "/") for name in names), left_out


def test_a_playbook_outside_the_repo_uses_the_installed_modules_and_test_plugins(
    installed, daemon_factory, tmp_path
):
    _, collections = installed
    # The node stays online however slowly Ansible starts on a busy machine.
    daemon = daemon_factory(node_timeout_ms=120_000)
    add_node(daemon, "gpu-7", ["meta-llama/Llama-3.1-8B-Instruct"])
    project = tmp_path / "elsewhere"
    project.mkdir()
    (project / "ansible.cfg").write_text(f"[defaults]\ncollections_path = {collections}\n")
    token_file = project / "api-token"
    token_file.write_text(daemon.token + "\n")
    token_file.chmod(0o600)
    play = {
        "name": "Use llorch.kit from outside its repository",
        "hosts": "localhost",
        "gather_facts": False,
        "tasks": [
            {
                "name": "Wait until gpu-7 is online with its model",
                "llorch.kit.llorch_nodes_info": {
                    "url": daemon.url,
                    "token_file": str(token_file),
                    "node_id": "gpu-7",
                    "wait_status": ["online"],
                    "wait_models": ["meta-llama/Llama-3.1-8B-Instruct"],
                    "wait_timeout": 30,
                },
                "register": "gpu7",
            },
            {
                "name": "The ids pass the collection's tests",
                "ansible.builtin.assert": {
                    "that": [
                        "gpu7.nodes[0].node_id is llorch.kit.llorch_id",
                        "gpu7.nodes[0].models[0] is llorch.kit.llorch_model_id",
                        "'a/b' is not llorch.kit.llorch_id",
                    ]
                },
            },
        ],
    }
    (project / "play.yml").write_text(yaml.safe_dump([play], sort_keys=False))
    env = {**outside_env(project), "ANSIBLE_STDOUT_CALLBACK": "ansible.builtin.json"}

    # No hosts: localhost is Ansible's implicit one (this Python, a local connection).
    (project / "hosts.yml").write_text("all: {}\n")
    done = ansible(["ansible-playbook", "-i", "hosts.yml", "play.yml"], project, env)

    assert done.returncode == 0, done.stdout[-3000:] + done.stderr
    tasks = json.loads(done.stdout)["plays"][0]["tasks"]
    waited = tasks[0]["hosts"]["localhost"]
    assert waited["nodes"][0]["status"] == "online" and waited["count"] == 1
    assert daemon.token not in done.stdout + done.stderr


def test_ansible_doc_reads_the_installed_collection(installed, tmp_path):
    _, collections = installed
    (tmp_path / "ansible.cfg").write_text(f"[defaults]\ncollections_path = {collections}\n")
    env = outside_env(tmp_path)

    doc = ansible(["ansible-doc", "llorch.kit.llorch_node"], tmp_path, env)
    listed = ansible(["ansible-doc", "-t", "test", "-l", "llorch.kit"], tmp_path, env)

    assert doc.returncode == 0, doc.stderr
    assert str(collections) in doc.stdout  # this copy, not the repository's
    assert "wait_timeout" in doc.stdout and "token_file" in doc.stdout
    assert "llorch.kit.llorch_id" in listed.stdout and "llorch.kit.llorch_model_id" in listed.stdout

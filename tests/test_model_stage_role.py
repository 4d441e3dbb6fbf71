"""The model_staging role through `ansible-playbook` on localhost: URL and controller-file sources, the free
re-run, pruning and partial clean-up, against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from support import REPO_ROOT, on_localhost
from support_staging import FileServer, current_group, deterministic_bytes

URL_MODEL = deterministic_bytes(3 * 1024 * 1024, seed=1)
FILE_MODEL = deterministic_bytes(1024 * 1024 + 5, seed=2)


@pytest.fixture
def served(tmp_path) -> FileServer:
    root = tmp_path / "mirror"
    root.mkdir()
    (root / "url-model.bin").write_bytes(URL_MODEL)
    server = FileServer(root).start()
    yield server
    server.stop()


def run_role(
    tmp_path: Path, role_vars: dict, check: bool = False
) -> tuple[dict, subprocess.CompletedProcess]:
    """Apply the role to localhost; returns the recap stats for localhost and the process."""
    playbook = tmp_path / "play.yml"
    playbook.write_text(
        yaml.safe_dump(
            [
                {
                    "name": "Stage models with the role",
                    "hosts": "localhost",
                    "gather_facts": False,
                    "roles": [{"role": "model_staging", "vars": role_vars}],
                }
            ]
        )
    )
    command = on_localhost("ansible-playbook", str(playbook))
    if check:
        command.append("--check")
    env = dict(
        os.environ,
        ANSIBLE_CONFIG=str(REPO_ROOT / "ansible.cfg"),
        ANSIBLE_ROLES_PATH=str(REPO_ROOT / "roles"),
        ANSIBLE_LOAD_CALLBACK_PLUGINS="1",
        ANSIBLE_STDOUT_CALLBACK="ansible.posix.json",
    )
    proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=180)
    try:
        stats = json.loads(proc.stdout)["stats"]["localhost"]
    except (ValueError, KeyError) as exc:
        raise AssertionError(f"no JSON recap from ansible-playbook:\n{proc.stdout}\n{proc.stderr}") from exc
    return stats, proc


def test_role_stages_url_and_controller_files_then_reruns_without_changes(tmp_path, served):
    controller_file = tmp_path / "controller" / "file-model.bin"
    controller_file.parent.mkdir()
    controller_file.write_bytes(FILE_MODEL)
    models_dir = tmp_path / "node" / "models"
    role_vars = {
        "model_staging_dir": str(models_dir),
        "model_staging_group": current_group(),
        "model_staging_models": [
            {
                "id": "url-model",
                "source": f"{served.url}/url-model.bin",
                "sha256": hashlib.sha256(URL_MODEL).hexdigest(),
                "size_bytes": len(URL_MODEL),
            },
            {
                "id": "file-model",
                "source": str(controller_file),
                "sha256": hashlib.sha256(FILE_MODEL).hexdigest(),
            },
        ],
    }

    planned, proc = run_role(tmp_path, role_vars, check=True)
    assert planned["failures"] == 0, proc.stdout[-3000:]
    assert not models_dir.exists()

    first, proc = run_role(tmp_path, role_vars)
    assert first["failures"] == 0 and first["changed"] > 0, proc.stdout[-3000:]
    manifest = json.loads((models_dir / "manifest.json").read_text())
    assert sorted(manifest) == ["file-model", "url-model"]
    assert (models_dir / "url-model.bin").read_bytes() == URL_MODEL
    folder = models_dir.stat()  # root's, readable by the agent's group only: nobody else plants links there
    assert (folder.st_uid, oct(folder.st_mode & 0o777)) == (0, "0o750")
    assert (models_dir / "file-model.bin").read_bytes() == FILE_MODEL
    assert sorted(p.name for p in models_dir.iterdir()) == [
        "file-model.bin",
        "manifest.json",
        "url-model.bin",
    ]  # the controller copy was cleaned away
    requests_after_first = len(served.requests)

    second, proc = run_role(tmp_path, role_vars)
    assert second["failures"] == 0 and second["changed"] == 0, proc.stdout[-3000:]
    assert len(served.requests) == requests_after_first


def test_role_prunes_models_that_left_the_list_and_their_partial_files(tmp_path, served):
    models_dir = tmp_path / "models"
    listed = {
        "id": "url-model",
        "source": f"{served.url}/url-model.bin",
        "sha256": hashlib.sha256(URL_MODEL).hexdigest(),
    }
    (served.root / "old.bin").write_bytes(b"old model")
    old = {"id": "old", "source": f"{served.url}/old.bin", "sha256": hashlib.sha256(b"old model").hexdigest()}
    base = {"model_staging_dir": str(models_dir), "model_staging_group": current_group()}
    stats, proc = run_role(tmp_path, dict(base, model_staging_models=[listed, old]))
    assert stats["failures"] == 0, proc.stdout[-3000:]
    (models_dir / "abandoned.bin.partial").write_bytes(b"half a model")

    kept, proc = run_role(tmp_path, dict(base, model_staging_models=[listed]))
    assert kept["failures"] == 0, proc.stdout[-3000:]
    assert (models_dir / "old.bin").exists()  # prune is off by default
    assert not (models_dir / "abandoned.bin.partial").exists()

    pruned, proc = run_role(tmp_path, dict(base, model_staging_models=[listed], model_staging_prune=True))
    assert pruned["failures"] == 0 and pruned["changed"] > 0, proc.stdout[-3000:]
    assert not (models_dir / "old.bin").exists()
    assert sorted(json.loads((models_dir / "manifest.json").read_text())) == ["url-model"]


def test_role_rejects_a_model_without_sha256_before_touching_the_node(tmp_path, served):
    models_dir = tmp_path / "models"
    role_vars = {
        "model_staging_dir": str(models_dir),
        "model_staging_group": current_group(),
        "model_staging_models": [{"id": "x", "source": f"{served.url}/url-model.bin"}],
    }

    stats, proc = run_role(tmp_path, role_vars)

    assert stats["failures"] == 1
    assert "sha256" in proc.stdout
    assert not models_dir.exists()


def test_role_names_a_missing_group(tmp_path, served):
    role_vars = {
        "model_staging_dir": str(tmp_path / "models"),
        "model_staging_group": "no-such-group-llorch",
        "model_staging_models": [],
    }

    stats, proc = run_role(tmp_path, role_vars)

    assert stats["failures"] == 1
    assert "no-such-group-llorch" in proc.stdout and "model_staging_group" in proc.stdout


def run_role_verbose(tmp_path: Path, role_vars: dict, *flags: str) -> subprocess.CompletedProcess:
    """Apply the role with the default stdout callback (what an operator sees), at the verbosity asked."""
    playbook = tmp_path / "play.yml"
    playbook.write_text(
        yaml.safe_dump(
            [
                {
                    "name": "Stage models with a secret header",
                    "hosts": "localhost",
                    "gather_facts": False,
                    "roles": [{"role": "model_staging", "vars": role_vars}],
                }
            ]
        )
    )
    env = dict(
        os.environ,
        ANSIBLE_CONFIG=str(REPO_ROOT / "ansible.cfg"),
        ANSIBLE_ROLES_PATH=str(REPO_ROOT / "roles"),
        ANSIBLE_STDOUT_CALLBACK="default",
        ANSIBLE_LOCAL_TEMP=str(tmp_path / "ansible-tmp"),
    )
    command = on_localhost("ansible-playbook", str(playbook), *flags)
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=180)


SECRET = "hub-secret-4f1d2a9c"


@pytest.mark.parametrize("verbosity", [[], ["-v"], ["-vv"]])
def test_a_failed_download_never_prints_its_headers(tmp_path, served, verbosity):
    """Ansible adds the loop item to a failed result (and to every result at -v): the role must not loop
    over entries whose headers hold a token."""
    role_vars = {
        "model_staging_dir": str(tmp_path / "models"),
        "model_staging_group": current_group(),
        "model_staging_headers": {"X-Shared": SECRET},
        "model_staging_models": [
            {  # skipped by the URL task before the failure below
                "id": "file-model",
                "source": str(tmp_path / "controller-file.bin"),
                "sha256": "1" * 64,
                "headers": {"X-Hub-Token": SECRET},
            },
            {
                "id": "missing-model",
                "source": f"{served.url}/no-such-file.bin",
                "sha256": "0" * 64,
                "headers": {"Authorization": f"Bearer {SECRET}"},
            },
        ],
    }

    proc = run_role_verbose(tmp_path, role_vars, *verbosity)

    assert proc.returncode != 0, proc.stdout[-3000:]  # the missing file failed the play
    assert "missing-model" in proc.stdout  # the failing model is still named
    assert SECRET not in proc.stdout + proc.stderr


def test_a_verbose_successful_run_never_prints_headers(tmp_path, served):
    controller_file = tmp_path / "controller-file.bin"
    controller_file.write_bytes(FILE_MODEL)
    role_vars = {
        "model_staging_dir": str(tmp_path / "models"),
        "model_staging_group": current_group(),
        "model_staging_headers": {"X-Shared": SECRET},
        "model_staging_models": [
            {
                "id": "url-model",
                "source": f"{served.url}/url-model.bin",
                "sha256": hashlib.sha256(URL_MODEL).hexdigest(),
                "headers": {"Authorization": f"Bearer {SECRET}"},
            },
            {
                "id": "file-model",
                "source": str(controller_file),
                "sha256": hashlib.sha256(FILE_MODEL).hexdigest(),
                "headers": {"X-Hub-Token": SECRET},
            },
        ],
    }

    proc = run_role_verbose(tmp_path, role_vars, "-vv")

    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "url-model" in proc.stdout and "file-model" in proc.stdout
    assert SECRET not in proc.stdout + proc.stderr

"""model_stage runs as root in the models folder: a link (or hard link) planted there must never make it
write, chmod, rename, create or read the file the link points to. Each test plants one, runs the real
module through Ansible and checks that the link's target is exactly as it was."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
from support_staging import FileServer, deterministic_bytes, run_module

MODEL_BYTES = deterministic_bytes(2 * 1024 * 1024 + 9, seed=11)
MODEL_SHA256 = hashlib.sha256(MODEL_BYTES).hexdigest()
ROOT_ONLY = b"root-only secret 3c9d1e\n"


@pytest.fixture
def served(tmp_path) -> FileServer:
    root = tmp_path / "mirror"
    root.mkdir()
    (root / "tiny.gguf").write_bytes(MODEL_BYTES)
    server = FileServer(root).start()
    yield server
    server.stop()


@pytest.fixture
def victim(tmp_path) -> Path:
    """A file only its owner may read, outside the models folder: what a planted link points at."""
    path = tmp_path / "elsewhere" / "shadow"
    path.parent.mkdir()
    path.write_bytes(ROOT_ONLY)
    path.chmod(0o600)
    return path


def stage_args(served: FileServer, models_dir: Path, **overrides) -> dict:
    args = {
        "id": "tiny",
        "source": f"{served.url}/tiny.gguf",
        "sha256": MODEL_SHA256,
        "size_bytes": len(MODEL_BYTES),
        "models_dir": str(models_dir),
    }
    args.update(overrides)
    return args


def assert_untouched(victim: Path) -> None:
    info = victim.lstat()
    assert stat.S_ISREG(info.st_mode), "the target was replaced"
    assert stat.S_IMODE(info.st_mode) == 0o600, oct(info.st_mode)
    assert victim.read_bytes() == ROOT_ONLY


@pytest.mark.parametrize("sha256", [MODEL_SHA256, "0" * 64], ids=["right-sha256", "wrong-sha256"])
def test_a_symlink_at_the_partial_name_is_refused_and_its_target_untouched(
    served, models_dir, victim, sha256
):
    (models_dir / "tiny.gguf.partial").symlink_to(victim)

    result, proc = run_module(stage_args(served, models_dir, sha256=sha256))

    assert result.get("failed") is True, result
    assert "tiny.gguf.partial" in result["msg"] and "symbolic link" in result["msg"], result["msg"]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert_untouched(victim)
    assert not (models_dir / "tiny.gguf").exists()
    assert (models_dir / "tiny.gguf.partial").is_symlink()  # left for the operator to look at
    assert served.requests == []


def test_a_hard_link_at_the_partial_name_is_refused_and_its_target_untouched(served, models_dir, victim):
    os.link(victim, models_dir / "tiny.gguf.partial")

    result, _ = run_module(stage_args(served, models_dir))

    assert result.get("failed") is True, result
    assert "tiny.gguf.partial" in result["msg"] and "not a plain file" in result["msg"], result["msg"]
    assert_untouched(victim)
    assert not (models_dir / "tiny.gguf").exists()


def test_a_symlink_at_the_old_lock_file_name_creates_nothing(served, models_dir, tmp_path):
    would_be_created = tmp_path / "elsewhere" / "created-by-root"
    would_be_created.parent.mkdir()
    (models_dir / ".manifest.lock").symlink_to(would_be_created)

    result, _ = run_module(stage_args(served, models_dir))

    assert result["changed"] is True, result
    assert not would_be_created.exists() and not would_be_created.is_symlink()
    assert (models_dir / "tiny.gguf").read_bytes() == MODEL_BYTES


def test_a_symlink_at_the_manifest_is_neither_read_nor_copied(served, models_dir, victim):
    # Valid manifest JSON in a root-only file: code that followed the link would copy this entry into the
    # world-readable manifest it writes.
    victim.write_bytes(json.dumps({"leaked-secret-model": {"path": "/x", "size_bytes": 1}}).encode())
    before = victim.read_bytes()
    (models_dir / "manifest.json").symlink_to(victim)

    result, proc = run_module(stage_args(served, models_dir))

    assert result.get("failed") is True, result
    assert "manifest" in result["msg"] and "safely" in result["msg"], result["msg"]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert victim.read_bytes() == before and stat.S_IMODE(victim.stat().st_mode) == 0o600
    assert (models_dir / "manifest.json").is_symlink()
    for path in models_dir.iterdir():
        if not path.is_symlink():
            assert b"leaked-secret-model" not in path.read_bytes(), path
    assert "leaked-secret-model" not in proc.stdout


def test_a_symlink_at_the_final_name_is_replaced_not_followed(served, models_dir, victim):
    (models_dir / "tiny.gguf").symlink_to(victim)

    result, _ = run_module(stage_args(served, models_dir))

    assert result["changed"] is True, result
    assert_untouched(victim)
    final = models_dir / "tiny.gguf"
    assert not final.is_symlink() and final.read_bytes() == MODEL_BYTES

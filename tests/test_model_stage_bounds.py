"""model_stage against sources that never end, trickle, redirect to the metadata service or carry signed
URLs, and a module killed mid-download: each bounded, refused or left without a trace under the final name.
Real HTTP servers on 127.0.0.1, the real module through Ansible (or, to kill it, as its own process)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import REPO_ROOT
from support_staging import FileServer, deterministic_bytes, run_module

OLD_BYTES = deterministic_bytes(3 * 1024 * 1024 + 1, seed=21)
NEW_BYTES = deterministic_bytes(6 * 1024 * 1024 + 2, seed=22)  # more than one 4 MiB read
SIGNATURE = "X-Amz-Signature=5e1f" + "d" * 40


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def served(tmp_path) -> FileServer:
    root = tmp_path / "mirror"
    root.mkdir()
    (root / "old.gguf").write_bytes(OLD_BYTES)
    (root / "new.gguf").write_bytes(NEW_BYTES)
    server = FileServer(root).start()
    yield server
    server.rules.release.set()
    server.stop()


def args_for(served: FileServer, models_dir: Path, name: str, data: bytes, **overrides) -> dict:
    args = {
        "id": "tiny",
        "source": f"{served.url}/{name}",
        "dest": "tiny.gguf",
        "sha256": sha256(data),
        "size_bytes": len(data),
        "models_dir": str(models_dir),
    }
    args.update(overrides)
    return args


def test_a_source_sending_more_than_size_bytes_is_stopped_and_its_partial_deleted(served, models_dir):
    served.rules.endless.add("/old.gguf")

    result, proc = run_module(args_for(served, models_dir, "old.gguf", OLD_BYTES))

    assert result.get("failed") is True, result
    assert "more than" in result["msg"] and str(len(OLD_BYTES)) in result["msg"], result["msg"]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert sorted(p.name for p in models_dir.iterdir()) == []


def test_a_source_with_no_length_and_no_size_bytes_is_refused_before_any_byte(served, models_dir):
    served.rules.endless.add("/old.gguf")

    result, _ = run_module(args_for(served, models_dir, "old.gguf", OLD_BYTES, size_bytes=None))

    assert result.get("failed") is True, result
    assert "size_bytes" in result["msg"] and "length" in result["msg"], result["msg"]
    assert sorted(p.name for p in models_dir.iterdir()) == []


def test_a_trickling_source_stops_at_the_overall_deadline(served, models_dir):
    served.rules.trickle_s["/old.gguf"] = 0.05  # 20 bytes a second: never idle for the 30 s timeout
    started = time.monotonic()

    result, _ = run_module(args_for(served, models_dir, "old.gguf", OLD_BYTES, timeout=30, total_timeout=3))

    assert result.get("failed") is True, result
    assert "total_timeout" in result["msg"] and "3 s" in result["msg"], result["msg"]
    assert time.monotonic() - started < 25  # the deadline, not the trickle's end, stopped it
    assert not (models_dir / "tiny.gguf").exists()


@pytest.mark.parametrize("target", ["http://169.254.169.254/latest/meta-data/", "http://[fe80::1]:8080/m"])
def test_a_redirect_to_a_link_local_address_is_refused(served, models_dir, target):
    served.rules.redirects["/old.gguf"] = target

    result, _ = run_module(args_for(served, models_dir, "old.gguf", OLD_BYTES, timeout=5))

    assert result.get("failed") is True, result
    assert "link-local" in result["msg"] and "allow_link_local_redirects" in result["msg"], result["msg"]
    assert not (models_dir / "tiny.gguf").exists()


def test_a_signed_url_query_never_shows_in_the_result_or_its_invocation(served, models_dir):
    args = args_for(served, models_dir, "old.gguf", OLD_BYTES)
    args["source"] += f"?{SIGNATURE}&X-Amz-Expires=600"

    result, proc = run_module(args, env={"ANSIBLE_VERBOSITY": "1"})

    assert result["changed"] is True, result
    assert result["source"] == f"{served.url}/old.gguf?...", result["source"]
    shown_source = result["invocation"]["module_args"]["source"]
    assert shown_source.startswith(f"{served.url}/old.gguf?") and "*" in shown_source, shown_source
    assert SIGNATURE not in proc.stdout + proc.stderr
    assert SIGNATURE not in (models_dir / "manifest.json").read_text()
    assert served.requests[-1].path == f"/old.gguf?{SIGNATURE}&X-Amz-Expires=600"  # sent, just never shown


def start_module_process(args: dict, tmp_path: Path) -> subprocess.Popen:
    """The module as Ansible runs it on a node: its own Python process reading its arguments from a file."""
    args_file = tmp_path / "args.json"
    args_file.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": args}))
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT / ".collections"))
    module = REPO_ROOT / "plugins" / "modules" / "model_stage.py"
    return subprocess.Popen(
        [sys.executable, str(module), str(args_file)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def wait_for(condition, what: str, deadline_s: float = 30.0) -> None:
    deadline = time.monotonic() + deadline_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_kill_9_mid_download_leaves_the_old_version_and_the_next_run_finishes(served, models_dir, tmp_path):
    old, _ = run_module(args_for(served, models_dir, "old.gguf", OLD_BYTES))
    assert old["changed"] is True, old
    old_entry = json.loads((models_dir / "manifest.json").read_text())["tiny"]
    served.rules.stall_after["/new.gguf"] = 5 * 1024 * 1024 + 3  # then the server holds the connection
    partial = models_dir / "tiny.gguf.partial"

    process = start_module_process(args_for(served, models_dir, "new.gguf", NEW_BYTES), tmp_path)
    try:
        # The module writes whole 4 MiB reads: the first one lands, the second waits for the stalled server.
        wait_for(lambda: partial.exists() and partial.stat().st_size >= 4 * 1024 * 1024, "the first read")
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        kept = partial.stat().st_size
    finally:
        process.kill()
        process.communicate(timeout=30)

    # The old version stays in place and in the manifest until the new one is complete and verified.
    assert (models_dir / "tiny.gguf").read_bytes() == OLD_BYTES
    assert json.loads((models_dir / "manifest.json").read_text())["tiny"] == old_entry
    served.rules.stall_after.clear()
    served.rules.release.set()

    new, _ = run_module(args_for(served, models_dir, "new.gguf", NEW_BYTES))

    assert new["changed"] is True and new["resumed_from"] == kept, new
    assert (models_dir / "tiny.gguf").read_bytes() == NEW_BYTES
    assert json.loads((models_dir / "manifest.json").read_text())["tiny"]["sha256"] == sha256(NEW_BYTES)
    assert not partial.exists()


def test_a_new_version_that_fails_its_check_keeps_the_old_one(served, models_dir):
    run_module(args_for(served, models_dir, "old.gguf", OLD_BYTES))

    result, _ = run_module(args_for(served, models_dir, "new.gguf", NEW_BYTES, sha256="1" * 64))

    assert result.get("failed") is True and "sha256 mismatch" in result["msg"], result
    assert (models_dir / "tiny.gguf").read_bytes() == OLD_BYTES
    assert json.loads((models_dir / "manifest.json").read_text())["tiny"]["sha256"] == sha256(OLD_BYTES)

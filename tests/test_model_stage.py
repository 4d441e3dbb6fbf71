"""The model_stage module through its real entry point (`ansible localhost -m model_stage`), fetching from a
real HTTP server on 127.0.0.1 that the tests start and make misbehave."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from support_staging import FileServer, deterministic_bytes, run_module

MODEL_BYTES = deterministic_bytes(9 * 1024 * 1024 + 123)  # more than two 4 MiB read chunks, odd tail
MODEL_SHA256 = hashlib.sha256(MODEL_BYTES).hexdigest()
HUB_TOKEN = "hub-token-" + "s" * 30


@pytest.fixture
def served(tmp_path) -> FileServer:
    root = tmp_path / "mirror"
    root.mkdir()
    (root / "tiny.gguf").write_bytes(MODEL_BYTES)
    server = FileServer(root).start()
    yield server
    server.stop()


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


def manifest(models_dir: Path) -> dict:
    return json.loads((models_dir / "manifest.json").read_text())


def visible_files(models_dir: Path) -> list[str]:
    return sorted(p.name for p in models_dir.iterdir())


def test_first_stage_downloads_verifies_and_records_the_manifest(served, models_dir):
    started = time.monotonic()
    result, _ = run_module(stage_args(served, models_dir))
    module_wall_s = time.monotonic() - started

    assert result["changed"] is True, result
    assert result["bytes_downloaded"] == len(MODEL_BYTES)
    assert result["resumed_from"] == 0
    assert result["sha256"] == MODEL_SHA256
    assert result["size_bytes"] == len(MODEL_BYTES)
    # The transfer's own time lies inside the whole module run, and the rate is the bytes over that time.
    assert 0 < result["seconds"] <= module_wall_s
    # Both are rounded (seconds to 1 ms, the rate to 0.1 MB/s): bound the rate by the seconds' rounding.
    fastest = len(MODEL_BYTES) / max(result["seconds"] - 0.0005, 1e-9) / 1e6
    slowest = len(MODEL_BYTES) / (result["seconds"] + 0.0005) / 1e6
    assert slowest - 0.05 <= result["mb_per_s"] <= fastest + 0.05
    path = models_dir / "tiny.gguf"
    assert result["path"] == str(path)
    assert path.read_bytes() == MODEL_BYTES
    assert visible_files(models_dir) == ["manifest.json", "tiny.gguf"]  # no partial file left behind
    entry = manifest(models_dir)["tiny"]
    # The shape the agent reads, plus the mtime that makes a re-run free.
    assert entry["path"] == str(path)
    assert entry["sha256"] == MODEL_SHA256
    assert entry["size_bytes"] == len(MODEL_BYTES)
    assert entry["staged_at"].endswith("Z")
    assert entry["mtime_ns"] == path.stat().st_mtime_ns
    assert oct(path.stat().st_mode & 0o777) == "0o644"


def test_second_run_is_unchanged_without_fetching_or_reading_the_file(served, models_dir):
    run_module(stage_args(served, models_dir))
    requests_after_first = len(served.requests)
    path = models_dir / "tiny.gguf"
    # Same size and mtime but other content: a run that re-hashed would notice; a stat-only check does not.
    stat = path.stat()
    path.write_bytes(bytes(len(MODEL_BYTES)))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    result, _ = run_module(stage_args(served, models_dir))

    assert result["changed"] is False, result
    assert result["bytes_downloaded"] == 0
    assert len(served.requests) == requests_after_first
    assert "already staged" in result["msg"]


def test_a_touched_file_is_fetched_again(served, models_dir):
    run_module(stage_args(served, models_dir))
    path = models_dir / "tiny.gguf"
    path.write_bytes(b"corrupted")

    result, _ = run_module(stage_args(served, models_dir))

    assert result["changed"] is True, result
    assert path.read_bytes() == MODEL_BYTES


def test_check_mode_reports_the_change_and_touches_nothing(served, models_dir):
    result, _ = run_module(stage_args(served, models_dir), check=True)

    assert result["changed"] is True, result
    assert "would stage" in result["msg"]
    assert list(models_dir.iterdir()) == []
    assert served.requests == []


def test_check_mode_with_a_models_dir_still_to_be_created_reports_the_change(served, tmp_path):
    models_dir = tmp_path / "not-yet"

    result, _ = run_module(stage_args(served, models_dir), check=True)

    assert result["changed"] is True, result
    assert not models_dir.exists()


def test_sha256_mismatch_leaves_no_file_and_names_both_digests(served, models_dir):
    wrong = "0" * 64

    result, _ = run_module(stage_args(served, models_dir, sha256=wrong))

    assert result.get("failed") is True, result
    assert wrong in result["msg"] and MODEL_SHA256 in result["msg"]
    assert visible_files(models_dir) == []  # neither the final name nor a partial file


def test_404_fails_naming_the_url_without_its_credentials(served, models_dir):
    source = served.url.replace("http://", "http://mirror-user:mirror-secret@") + "/missing.gguf"

    result, proc = run_module(stage_args(served, models_dir, source=source))

    assert result.get("failed") is True, result
    assert "404" in result["msg"]
    assert f"{served.url}/missing.gguf" in result["msg"]
    assert "mirror-secret" not in proc.stdout + proc.stderr
    assert visible_files(models_dir) == []


def test_401_without_the_hub_token_and_success_with_it_in_headers(served, models_dir):
    served.rules.token = HUB_TOKEN

    denied, _ = run_module(stage_args(served, models_dir))
    with_token = {"Authorization": f"Bearer {HUB_TOKEN}"}
    allowed, proc = run_module(stage_args(served, models_dir, headers=with_token))

    assert denied.get("failed") is True and "401" in denied["msg"], denied
    assert allowed["changed"] is True, allowed
    assert served.requests[-1].authorization == f"Bearer {HUB_TOKEN}"
    assert HUB_TOKEN not in proc.stdout + proc.stderr  # headers are no_log


def test_dropped_connection_keeps_the_partial_file_and_the_next_run_resumes(served, models_dir):
    cut = 5 * 1024 * 1024 + 17
    served.rules.drop_after["/tiny.gguf"] = cut

    dropped, _ = run_module(stage_args(served, models_dir))

    assert dropped.get("failed") is True, dropped
    assert "resume" in dropped["msg"] and f"{served.url}/tiny.gguf" in dropped["msg"]
    partial = models_dir / "tiny.gguf.partial"
    assert partial.stat().st_size == cut
    assert not (models_dir / "tiny.gguf").exists()

    resumed, _ = run_module(stage_args(served, models_dir))

    assert resumed["changed"] is True, resumed
    assert resumed["resumed_from"] == cut
    assert resumed["bytes_downloaded"] == len(MODEL_BYTES) - cut
    assert served.requests[-1].range == f"bytes={cut}-"
    assert (models_dir / "tiny.gguf").read_bytes() == MODEL_BYTES
    assert not partial.exists()


def test_a_complete_partial_file_is_verified_and_renamed_without_a_request(served, models_dir):
    (models_dir / "tiny.gguf.partial").write_bytes(MODEL_BYTES)

    result, _ = run_module(stage_args(served, models_dir))

    assert result["changed"] is True, result
    assert result["resumed_from"] == len(MODEL_BYTES) and result["bytes_downloaded"] == 0
    assert served.requests == []
    assert visible_files(models_dir) == ["manifest.json", "tiny.gguf"]


def test_a_server_that_ignores_range_restarts_from_the_beginning(served, models_dir):
    (models_dir / "tiny.gguf.partial").write_bytes(MODEL_BYTES[:1000])
    served.rules.honour_range = False

    result, _ = run_module(stage_args(served, models_dir))

    assert result["changed"] is True, result
    assert result["resumed_from"] == 0
    assert (models_dir / "tiny.gguf").read_bytes() == MODEL_BYTES


def test_not_enough_free_space_fails_before_anything_is_written(served, models_dir):
    too_big = 2**60

    result, _ = run_module(stage_args(served, models_dir, size_bytes=too_big))

    assert result.get("failed") is True, result
    assert "not enough free space" in result["msg"] and str(too_big) in result["msg"]
    assert "available" in result["msg"]
    assert visible_files(models_dir) == []
    assert served.requests == []


def test_two_models_staged_in_parallel_keep_both_manifest_entries(served, models_dir):
    (served.root / "other.gguf").write_bytes(MODEL_BYTES[::-1])
    other = stage_args(
        served,
        models_dir,
        id="other",
        source=f"{served.url}/other.gguf",
        sha256=hashlib.sha256(MODEL_BYTES[::-1]).hexdigest(),
    )
    results: dict = {}

    def stage(name: str, args: dict) -> None:
        results[name] = run_module(args)[0]

    threads = [
        threading.Thread(target=stage, args=("tiny", stage_args(served, models_dir))),
        threading.Thread(target=stage, args=("other", other)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert results["tiny"]["changed"] and results["other"]["changed"], results
    assert sorted(manifest(models_dir)) == ["other", "tiny"]
    assert visible_files(models_dir) == ["manifest.json", "other.gguf", "tiny.gguf"]


def test_a_path_on_the_node_is_copied_verified_and_recorded(tmp_path, models_dir):
    source = tmp_path / "local.bin"
    source.write_bytes(MODEL_BYTES)

    result, _ = run_module(
        {"id": "local", "source": str(source), "sha256": MODEL_SHA256, "models_dir": str(models_dir)}
    )

    assert result["changed"] is True, result
    assert (models_dir / "local.bin").read_bytes() == MODEL_BYTES
    assert manifest(models_dir)["local"]["sha256"] == MODEL_SHA256


def test_stale_partial_files_of_other_models_are_removed(served, models_dir):
    stale = models_dir / "gone.gguf.partial"
    fresh = models_dir / "busy.gguf.partial"
    stale.write_bytes(b"x" * 100)
    fresh.write_bytes(b"y" * 100)
    two_days_ago = time.time() - 48 * 3600
    os.utime(stale, (two_days_ago, two_days_ago))

    result, _ = run_module(stage_args(served, models_dir, partial_max_age_hours=24))

    assert result["removed_partials"] == [str(stale)], result
    assert not stale.exists() and fresh.exists()


def test_absent_removes_the_file_the_partial_and_the_manifest_entry(served, models_dir):
    run_module(stage_args(served, models_dir))
    (models_dir / "tiny.gguf.partial").write_bytes(b"leftover")
    (served.root / "keep.gguf").write_bytes(b"k")
    run_module(
        stage_args(
            served,
            models_dir,
            id="keep",
            source=f"{served.url}/keep.gguf",
            sha256=hashlib.sha256(b"k").hexdigest(),
            size_bytes=1,
        )
    )

    planned, _ = run_module({"id": "tiny", "state": "absent", "models_dir": str(models_dir)}, check=True)
    assert planned["changed"] is True and (models_dir / "tiny.gguf").exists(), planned

    removed, _ = run_module({"id": "tiny", "state": "absent", "models_dir": str(models_dir)})
    again, _ = run_module({"id": "tiny", "state": "absent", "models_dir": str(models_dir)})

    assert removed["changed"] is True, removed
    assert again["changed"] is False, again
    assert visible_files(models_dir) == ["keep.gguf", "manifest.json"]
    assert sorted(manifest(models_dir)) == ["keep"]


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"id": "no spaces!"}, "id"),
        ({"sha256": "not-a-digest"}, "sha256"),
        ({"dest": "../../etc/passwd"}, "dest"),
        ({"source": "ftp://example.com/model.bin"}, "source"),
    ],
)
def test_bad_input_fails_with_a_message_naming_the_field(served, models_dir, overrides, named):
    result, proc = run_module(stage_args(served, models_dir, **overrides))

    assert result.get("failed") is True, result
    assert result["msg"].startswith(named), result["msg"]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert visible_files(models_dir) == []


def test_ids_longer_than_the_registry_accepts_fail_naming_id_and_the_limit(served, models_dir):
    # orchestratord takes model ids of at most 256 characters; a longer one in the manifest would make
    # every heartbeat of the node fail later, so the module refuses it up front.
    longest, _ = run_module(stage_args(served, models_dir, id="m" * 256), check=True)
    too_long, proc = run_module(stage_args(served, models_dir, id="m" * 257))
    with_newline, _ = run_module(stage_args(served, models_dir, id="tiny\n"))

    assert longest["changed"] is True and not longest.get("failed"), longest
    assert too_long.get("failed") is True, too_long
    assert too_long["msg"].startswith("id ") and "256" in too_long["msg"], too_long["msg"]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert with_newline.get("failed") is True and with_newline["msg"].startswith("id "), with_newline
    assert visible_files(models_dir) == []
    assert served.requests == []


def test_the_module_documents_itself():
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "ansible-doc"), "llorch.kit.model_stage"],
        cwd=Path(__file__).resolve().parent.parent,
        env=dict(os.environ, ANSIBLE_CONFIG=str(Path(__file__).resolve().parent.parent / "ansible.cfg")),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "partial_max_age_hours" in proc.stdout and "mb_per_s" in proc.stdout


def test_the_module_keeps_to_python_38_syntax_for_older_nodes():
    # The module runs on the node's Python, which ansible-core 2.19 allows down to 3.8 (checked by hand on
    # 3.8, 3.9 and 3.10: stage, drop, resume, re-run); this keeps the syntax there.
    import ast

    plugins = Path(__file__).resolve().parent.parent / "plugins"
    for path in (plugins / "modules" / "model_stage.py", plugins / "module_utils" / "llorch_staging.py"):
        source = path.read_text()
        ast.parse(source, feature_version=(3, 8))
        assert "datetime.UTC" not in source  # 3.11+


@pytest.mark.parametrize("state", ["present", "absent"])
@pytest.mark.parametrize("dest", ["../victim.gguf", "ABSOLUTE"])
def test_a_dest_outside_models_dir_is_refused_in_both_states(served, models_dir, state, dest):
    # models_dir is <tmp>/models: "../victim.gguf" and the absolute path both name <tmp>/victim.gguf.
    victim = models_dir.parent / "victim.gguf"
    victim.write_bytes(b"not the module's to delete")
    dest = str(victim) if dest == "ABSOLUTE" else dest
    args = stage_args(served, models_dir, dest=dest, state=state)

    result, proc = run_module(args)

    assert result.get("failed") is True, result
    assert result["msg"].startswith("dest ") and "plain file name" in result["msg"], result["msg"]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert victim.read_bytes() == b"not the module's to delete"
    assert visible_files(models_dir) == []


def test_a_file_with_the_same_size_but_a_new_mtime_is_fetched_again(served, models_dir):
    # The "already staged" rule compares size and mtime: a same-size rewrite differs only in its mtime.
    run_module(stage_args(served, models_dir))
    path = models_dir / "tiny.gguf"
    recorded = path.stat().st_mtime_ns
    path.write_bytes(bytes(len(MODEL_BYTES)))
    os.utime(path, ns=(recorded, recorded + 5_000_000_000))

    result, _ = run_module(stage_args(served, models_dir))

    assert result["changed"] is True and result["bytes_downloaded"] == len(MODEL_BYTES), result
    assert path.read_bytes() == MODEL_BYTES


def test_a_missing_models_dir_is_one_plain_failure(served, tmp_path):
    result, proc = run_module(stage_args(served, tmp_path / "no-such-dir"))

    assert result.get("failed") is True, result
    assert result["msg"] == f"models_dir {tmp_path / 'no-such-dir'} does not exist or is not a directory"
    # ansible-core 2.19's controller adds `exception: (traceback unavailable)` to every failed module result
    # (ansible.builtin.file's too); what the module controls is one message and no traceback.
    assert "Traceback" not in proc.stdout + proc.stderr


def test_a_model_id_with_a_publisher_prefix_is_staged(served, models_dir):
    # The id the README uses; the registry and the agent accept it (the contract's MODEL_ID_PATTERN).
    model_id = "meta-llama/Llama-3.1-8B-Instruct"

    result, _ = run_module(stage_args(served, models_dir, id=model_id))

    assert result["changed"] is True, result
    assert manifest(models_dir)[model_id]["path"] == str(models_dir / "tiny.gguf")
    assert (models_dir / "tiny.gguf").read_bytes() == MODEL_BYTES


def test_an_entry_not_in_the_manifest_format_is_dropped_with_a_warning(served, models_dir):
    # A hand-edited entry the agent never reported (an id outside the rule); rewriting the manifest cannot
    # keep it, and must say so instead of losing it quietly.
    (models_dir / "manifest.json").write_text(json.dumps({"bad id!": {"path": "x", "size_bytes": 1}}))
    result, _ = run_module(stage_args(served, models_dir))

    assert result["changed"] is True, result
    assert list(manifest(models_dir)) == ["tiny"]
    (warning,) = result["warnings"]
    assert warning.startswith(f"manifest {models_dir / 'manifest.json'}: dropped an entry")
    assert "'bad id!'" in warning

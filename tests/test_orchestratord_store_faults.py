"""The database failing under the daemon: a full disk answers writes 503 with a clear code and one log
line while /ready says 503; a damaged or empty database file refuses to start with exit code 2 and one
line saying what to do, so the unit's RestartPreventExitStatus=2 stops a restart loop."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest
from support import make_daemon, sample_registration, wait_until
from support_daemon import beat, online_node, run_daemon_once

WRITE_FAILURE_LINE = "writes to the database at"


@contextlib.contextmanager
def small_disk(path: Path, size: str):
    """A tmpfs of `size` at `path`, unmounted afterwards whatever happens."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def fill(disk: Path) -> Path:
    """Take every free byte of the disk with one file; returns it."""
    filler = disk / "filler"
    chunk = b"\0" * 65536
    with filler.open("wb") as out, contextlib.suppress(OSError):
        while True:
            out.write(chunk)
            out.flush()
    with contextlib.suppress(OSError), filler.open("ab") as out:  # the last few bytes
        while True:
            out.write(b"\0")
            out.flush()
    return filler


def large_registration(node_id: str) -> dict:
    # Many GPUs make a record larger than the space the WAL already holds, so the write needs new blocks.
    return sample_registration(node_id, pools=32, gpus_per_pool=32)


def error_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if WRITE_FAILURE_LINE in line and "fail" in line]


def test_full_disk_answers_writes_503_and_ready_503_until_space_returns(daemon_factory, tmp_path):
    with small_disk(tmp_path / "disk", "1m") as disk:
        daemon = daemon_factory(db_path=str(disk / "registry.db"))
        registration = online_node(daemon, "gpu-1", ["llama"], serve="llama")
        filler = fill(disk)

        def refused():
            answer = daemon.api("POST", "/v2/nodes/register", large_registration("gpu-2"))
            assert answer.status in (200, 503), answer.text
            return answer if answer.status == 503 else None

        answer = wait_until(refused, timeout=20, what="a registration refused for want of space")
        assert answer.body["code"] == "STORE_UNAVAILABLE"
        assert "full" in answer.body["message"]
        assert daemon.api("GET", "/ready").status == 503
        assert daemon.api("POST", "/v2/nodes/gpu-1/drain", {"drain": True}).status == 503
        assert daemon.api("GET", "/v2/nodes/gpu-1").body["drain"] is False  # nothing changed
        beat(daemon, registration, ["llama"], serve="llama")  # liveness goes on: heartbeats stay in memory
        assert daemon.api("POST", "/v2/nodes/register", large_registration("gpu-3")).status == 503
        assert len(error_lines(daemon.log())) == 1, daemon.log()
        assert "Traceback" not in daemon.log()

        filler.unlink()
        wait_until(
            lambda: daemon.api("POST", "/v2/nodes/register", large_registration("gpu-2")).status == 200,
            what="a registration once the disk has space",
        )
        assert daemon.api("GET", "/ready").status == 200
        assert "work again" in daemon.log()
        daemon.stop()


def damage_a_page(db_path: Path) -> None:
    with sqlite3.connect(db_path) as db:
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        pages = db.execute("PRAGMA page_count").fetchone()[0]
    assert pages >= 3, pages
    with db_path.open("r+b") as file:
        file.seek(page_size)  # page 2: the node table's root, whose damage any read of the table meets
        file.write(os.urandom(page_size))


def assert_refuses_to_start(daemon, *words: str) -> None:
    result = run_daemon_once(daemon.config_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, result.stderr
    for word in words:
        assert word in errors[0], errors[0]


def test_damaged_page_refuses_to_start_with_exit_code_2(daemon):
    for number in range(20):
        assert daemon.api("POST", "/v2/nodes/register", large_registration(f"gpu-{number}")).status == 200
    daemon.stop()  # a clean stop moves the WAL into the database file
    damage_a_page(Path(daemon.config["db_path"]))
    assert_refuses_to_start(daemon, "is damaged", daemon.config["db_path"], "restore it from a backup")


@pytest.mark.parametrize("with_wal", [False, True])
def test_empty_database_file_refuses_to_start(tmp_path, with_wal):
    daemon = make_daemon(tmp_path)
    daemon.write_config()
    Path(daemon.config["db_path"]).write_bytes(b"")
    if with_wal:
        Path(daemon.config["db_path"] + "-wal").write_bytes(b"\0" * 32)
    assert_refuses_to_start(daemon, "empty file (0 bytes)", "move it aside")
    assert Path(daemon.config["db_path"]).stat().st_size == 0  # left as found, for the person to look at

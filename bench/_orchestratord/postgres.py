"""A throwaway PostgreSQL for the benches: the tests' server (tests/support_postgres.py, Debian's
packages), but durable like the SQLite daemon it is compared with, and optionally pinned to a CPU.

The tests run PostgreSQL with fsync off (they prove the daemon's contract, not the disk); a bench that
sets it beside SQLite with synchronous=FULL turns fsync and full-page writes back on, so both stores pay
for their commits.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "tests"))

from support_postgres import PostgresServer, server_bindir  # noqa: E402

DURABLE = "fsync = on\nfull_page_writes = on\nsynchronous_commit = on\n"


def start(durable: bool = True, cpu: str | None = None) -> PostgresServer:
    """A started server in a fresh temporary folder; stop it with server.stop()."""
    root = Path(tempfile.mkdtemp(prefix="llorch-pg-bench-"))
    server = PostgresServer(root=root, bindir=server_bindir()).init()
    if durable:
        with (server.data_dir / "postgresql.conf").open("a") as conf:
            conf.write(DURABLE)  # later lines win over init()'s fsync = off
    server.start()
    if cpu is not None:
        # Backends fork from the postmaster later and inherit its affinity; pin the ones running now too.
        for pid in [postmaster_pid(server), *children(postmaster_pid(server))]:
            subprocess.run(["taskset", "-a", "-p", "-c", cpu, str(pid)], check=True, capture_output=True)
    return server


def postmaster_pid(server: PostgresServer) -> int:
    return int((server.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


def _cpu_fields(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def server_cpu_s(server: PostgresServer) -> float:
    """CPU seconds of the whole server: the postmaster, its live children, and the children that exited
    (which the postmaster waited for: cutime and cstime)."""
    postmaster = postmaster_pid(server)
    fields = _cpu_fields(postmaster)
    ticks = sum(int(fields[i]) for i in (11, 12, 13, 14))
    for child in children(postmaster):
        try:
            child_fields = _cpu_fields(child)
        except FileNotFoundError:  # exited meanwhile: counted in the postmaster's cutime from now on
            continue
        ticks += int(child_fields[11]) + int(child_fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")

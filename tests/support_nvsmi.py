"""nvidia-smi for the tests: where the shared real recordings are (outside the repository, never committed),
and machines the stand-in replays that no shared recording shows.

`$LLORCH_NVSMI_REAL` when set; else `shared/nvsmi-real` beside the checkout; a git worktree (whose `.git` is
a file pointing into the main checkout's `.git/worktrees/`) looks beside its main checkout instead.
"""

from __future__ import annotations

import os
from pathlib import Path

from support import REPO_ROOT


def real_recordings_dir() -> Path:
    chosen = os.environ.get("LLORCH_NVSMI_REAL")
    if chosen:
        return Path(chosen)
    beside = REPO_ROOT.parent / "shared" / "nvsmi-real"
    dot_git = REPO_ROOT / ".git"
    if not beside.is_dir() and dot_git.is_file():
        pointer = dot_git.read_text().strip()  # "gitdir: <main>/.git/worktrees/<name>"
        if pointer.startswith("gitdir: ") and "/.git/worktrees/" in pointer:
            main_checkout = Path(pointer[len("gitdir: ") :].split("/.git/worktrees/")[0])
            return main_checkout.parent / "shared" / "nvsmi-real"
    return beside


def unified_memory_machine(tmp_path: Path) -> str:
    """A fixture folder for the stand-in: a Grace-Blackwell GB10 (DGX Spark), which has no VRAM of its own,
    so nvidia-smi prints [N/A] for memory. The layout is what such machines print; the values are made up
    (no recording of one is shared)."""
    machine = tmp_path / "gb10"
    machine.mkdir()
    (machine / "query-gpu.csv").write_text(
        "index, uuid, name, driver_version, memory.total [MiB], memory.free [MiB], compute_cap, "
        "mig.mode.current, persistence_mode, ecc.errors.uncorrected.volatile.total\n"
        "0, GPU-6f1d0c2e-0b7a-4c59-8e21-5a3b9d7c4e10, NVIDIA GB10, 580.95.05, [N/A], [N/A], 12.1, [N/A], "
        "Enabled, [N/A]\n"
    )
    (machine / "table.txt").write_text(
        "| NVIDIA-SMI 580.95.05              Driver Version: 580.95.05      CUDA Version: 13.0     |\n"
    )
    return str(machine)

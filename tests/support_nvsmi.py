"""Where the shared real nvidia-smi recordings are (outside the repository, never committed).

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

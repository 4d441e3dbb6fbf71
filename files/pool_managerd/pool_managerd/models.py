"""The models this node can serve: the manifest's entries whose file is there at the recorded size.

The manifest's format and its reader are the contract's (`read_manifest_at`): it is read relative to a
descriptor of models_dir and follows no link, since the folder may be writable by a less trusted user than
the agent. A relative path in an entry is relative to models_dir.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass

from .contract import MANIFEST_NAME, ManifestError, read_manifest_at

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StagedModel:
    model_id: str
    path: str  # absolute, or relative to models_dir
    size_bytes: int


class ModelManifest:
    """Reads the manifest again only when it changed (device, inode, mtime or size), keeps the last good
    one, and logs each problem once per version of the file, so heartbeats stay quiet."""

    def __init__(self, models_dir: str):
        self.models_dir = str(models_dir)
        self.path = os.path.join(self.models_dir, MANIFEST_NAME)
        self._seen_version: tuple | None = None
        self._models: dict[str, StagedModel] = {}
        self._reported_problems: set[str] = set()  # entries left out, already logged

    def _open_folder(self) -> int | None:
        """A descriptor of models_dir (None when there is none yet); a link in its place is refused."""
        try:
            return os.open(self.models_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as error:
            why = (
                "it is a symbolic link; name the folder itself"
                if error.errno in (errno.ELOOP, errno.ENOTDIR)
                else error.strerror
            )
            if self._seen_version != ("folder", error.errno):
                log.warning("models_dir %s cannot be used (%s); reporting no models", self.models_dir, why)
                self._seen_version = ("folder", error.errno)
            return -1

    def _unreadable(self, version: tuple, message: str) -> None:
        if self._seen_version != version:
            log.warning("%s; keeping the last good manifest (%d models)", message, len(self._models))
            self._seen_version = version

    def _absent(self) -> None:
        if self._seen_version != ("absent",):
            if self._seen_version is not None:
                log.warning("model manifest %s is gone; reporting no models", self.path)
            self._models, self._seen_version = {}, ("absent",)

    def _refresh(self, folder: int) -> None:
        try:
            info = os.stat(MANIFEST_NAME, dir_fd=folder, follow_symlinks=False)
        except FileNotFoundError:
            self._absent()
            return
        except OSError as error:
            self._unreadable(("unreadable", error.errno), f"model manifest {self.path} unreadable ({error})")
            return
        version = (info.st_dev, info.st_ino, info.st_mtime_ns, info.st_size)
        if version == self._seen_version:
            return
        self._seen_version = version
        try:
            entries, problems = read_manifest_at(folder)
        except (OSError, ManifestError) as error:
            log.warning(
                "model manifest %s is torn or invalid: %s; keeping the last good one (%d models)",
                self.path,
                error,
                len(self._models),
            )
            return
        for problem in problems:
            if problem not in self._reported_problems:
                self._reported_problems.add(problem)
                log.warning("model manifest %s: %s; not reported", self.path, problem)
        models = {
            model_id: StagedModel(model_id, entry["path"], entry["size_bytes"])
            for model_id, entry in entries.items()
        }
        if set(models) != set(self._models):
            log.info("model manifest %s lists %d models", self.path, len(models))
        self._models = models

    def available(self) -> list[str]:
        """Sorted ids of the models whose file exists now with the size the manifest recorded: a file
        deleted or truncated since staging stops being reported at the next heartbeat."""
        folder = self._open_folder()
        if folder is None:
            self._absent()
            return []
        if folder < 0:
            return []  # no file can be checked; the problem is logged once
        try:
            self._refresh(folder)
            present = []
            for model in self._models.values():
                try:
                    if os.stat(model.path, dir_fd=folder).st_size == model.size_bytes:
                        present.append(model.model_id)
                except (OSError, ValueError):
                    continue
            return sorted(present)
        finally:
            os.close(folder)

"""The model manifest that staging writes: <models_dir>/manifest.json, {model_id: {path, size_bytes, ...}}.

A relative path is relative to models_dir; sha256 and staged_at are staging's business and not read here.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
# The daemon's model-id rule (orchestratord's MODEL_ID_PATTERN, whole string, no trailing newline): a
# heartbeat carrying one id outside it is refused with 400, so such an id is dropped here instead.
MODEL_ID_RULE = "[A-Za-z0-9._:/-], 1-256 characters"
_MODEL_ID = re.compile(r"[A-Za-z0-9._:/-]{1,256}")


def valid_model_id(model_id: object) -> bool:
    return isinstance(model_id, str) and _MODEL_ID.fullmatch(model_id) is not None


def _shown(model_id: str, limit: int = 40) -> str:
    """The id for a log line: quoted and escaped (no forged lines), cut short when long."""
    if len(model_id) <= limit:
        return repr(model_id)
    return f"{model_id[:limit]!r}... ({len(model_id)} characters)"


@dataclass(frozen=True)
class StagedModel:
    model_id: str
    path: Path
    size_bytes: int


class ManifestError(ValueError):
    pass


def parse_manifest(text: str, models_dir: Path) -> dict[str, StagedModel]:
    """The manifest's entries; a relative path is relative to models_dir. Raises ManifestError."""
    try:
        raw = json.loads(text)
    except ValueError as error:
        raise ManifestError(f"not valid JSON ({error})") from None
    if not isinstance(raw, dict):
        raise ManifestError("the top level must be an object {model_id: {...}}")
    models = {}
    for model_id, entry in raw.items():
        if not isinstance(entry, dict):
            raise ManifestError(f"entry {model_id!r} must be an object")
        path, size = entry.get("path"), entry.get("size_bytes")
        if not isinstance(path, str) or not path:
            raise ManifestError(f"entry {model_id!r} has no 'path'")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ManifestError(f"entry {model_id!r} has no whole 'size_bytes'")
        models[model_id] = StagedModel(model_id, models_dir / path, size)
    return models


class ModelManifest:
    """Reads the manifest again only when it changed (mtime, size or inode), and keeps the last good one."""

    def __init__(self, models_dir: Path):
        self.models_dir = models_dir
        self.path = models_dir / MANIFEST_NAME
        self._seen_version: tuple | None = None
        self._models: dict[str, StagedModel] = {}
        self._refused: set[str] = set()  # invalid ids already logged

    def _refresh(self) -> None:
        try:
            info = os.stat(self.path)
        except FileNotFoundError:
            if self._seen_version != ("absent",):
                if self._seen_version is not None:
                    log.warning("model manifest %s is gone; reporting no models", self.path)
                self._models, self._seen_version = {}, ("absent",)
            return
        except OSError as error:
            version = ("unreadable", error.errno)
            if self._seen_version != version:
                log.warning("model manifest %s unreadable (%s); keeping the last good one", self.path, error)
                self._seen_version = version
            return
        version = (info.st_mtime_ns, info.st_size, info.st_ino)
        if version == self._seen_version:
            return
        self._seen_version = version
        try:
            models = parse_manifest(self.path.read_text(encoding="utf-8"), self.models_dir)
        except (OSError, UnicodeDecodeError, ManifestError) as error:
            # Logged once per version of the file: the next heartbeat sees the same mtime and stays quiet.
            log.warning(
                "model manifest %s is torn or invalid: %s; keeping the last good one (%d models)",
                self.path,
                error,
                len(self._models),
            )
            return
        for model_id in sorted(model_id for model_id in models if not valid_model_id(model_id)):
            del models[model_id]
            if model_id not in self._refused:
                self._refused.add(model_id)
                log.warning(
                    "model manifest %s: %s is not a valid model id (%s); not reported",
                    self.path,
                    _shown(model_id),
                    MODEL_ID_RULE,
                )
        if set(models) != set(self._models):
            log.info("model manifest %s lists %d models", self.path, len(models))
        self._models = models

    def available(self) -> list[str]:
        """Sorted ids of the models whose file exists with the size the manifest recorded."""
        self._refresh()
        present = []
        for model in self._models.values():
            try:
                if model.path.stat().st_size == model.size_bytes:
                    present.append(model.model_id)
            except OSError:
                continue
        return sorted(present)

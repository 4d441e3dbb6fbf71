"""The engines' API keys, one file per node id in engine_keys_dir, read when first needed.

A node's file is read the first time a request goes to it and again when its engine answers 401 (the
key was rotated), so a new node or a new key needs no restart. Read with the contract's secret reader
(no link followed, owner-only, one line). The cache holds at most one entry per node the registry may
hold; past MAX_CACHED it starts over, which only costs re-reads.
"""

from __future__ import annotations

import logging
import os

from .contract import SecretFileError, read_secret_file, valid_id

log = logging.getLogger(__name__)

MAX_CACHED = 20_000


class EngineKeyMissing(Exception):
    """The node's engine key cannot be read; the message names the file, never its content."""


class EngineKeys:
    def __init__(self, keys_dir: str | None) -> None:
        self.keys_dir = keys_dir
        self._headers: dict[str, dict[str, str]] = {}

    def headers_for(self, node_id: str) -> dict[str, str]:
        """The request headers for the node's engine: Content-Type and, with a keys folder, its key."""
        headers = self._headers.get(node_id)
        if headers is None:
            headers = self._read(node_id)
        return headers

    def forget(self, node_id: str) -> dict[str, str]:
        """After a 401: read the node's key again; returns the new headers."""
        self._headers.pop(node_id, None)
        return self.headers_for(node_id)

    def _read(self, node_id: str) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.keys_dir is not None:
            if not valid_id(node_id):  # registered ids already are; a path never comes from elsewhere
                raise EngineKeyMissing(f"node id {node_id!r} cannot name a key file")
            path = os.path.join(self.keys_dir, node_id)
            try:
                key = read_secret_file(path, "engine key file", min_length=1)
            except SecretFileError as exc:
                raise EngineKeyMissing(str(exc)) from None
            headers["Authorization"] = f"Bearer {key}"
        if len(self._headers) >= MAX_CACHED:
            self._headers.clear()
        self._headers[node_id] = headers
        return headers

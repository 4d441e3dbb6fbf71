"""The last placement errors, for people: /v2/placement refusals and the gateway's refusals and engine
failures, newest first. A fixed ring: recording costs an append, formatting waits for a reader."""

from __future__ import annotations

import time
from collections import deque
from typing import Literal

import msgspec

from .registry import rfc3339

KEPT = 100

Source = Literal["placement", "gateway"]


class PlacementError(msgspec.Struct):
    at: str
    source: Source
    model_id: str | None
    code: str
    message: str


class PlacementErrors(msgspec.Struct):
    errors: list[PlacementError]
    count: int


class RecentErrors:
    def __init__(self, kept: int = KEPT) -> None:
        self._ring: deque[tuple[float, str, str | None, str, str]] = deque(maxlen=kept)

    def record(self, source: Source, model_id: str | None, code: str, message: str) -> None:
        self._ring.append((time.time(), source, model_id, code, message))

    def view(self) -> PlacementErrors:
        errors = [
            PlacementError(rfc3339(at), source, model_id, code, message)
            for at, source, model_id, code, message in reversed(self._ring)
        ]
        return PlacementErrors(errors=errors, count=len(errors))

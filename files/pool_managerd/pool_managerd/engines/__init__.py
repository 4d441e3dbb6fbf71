"""Engine kinds: one adapter per kind says how to launch the engine and how to read its own answers.

Everything else (the engine file, engine_exec, the watcher, the heartbeat) works through `adapter_for`, so
another kind is one more module here and one more name in the contract's ENGINE_KINDS.

An adapter holds no state and does no I/O: it builds argv and parses bytes. The watcher does the bounded
HTTP reads and hands the adapter what came back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ..contract import ENGINE_KINDS
from ..engine_config import EngineFile


class EngineAnswerError(ValueError):
    """An engine answer the adapter cannot read; the message is one line, safe to log."""


@dataclass(frozen=True)
class Slots:
    total: int
    processing: int

    @property
    def idle(self) -> int:
        return self.total - self.processing


@dataclass(frozen=True)
class Metrics:
    requests_deferred: int | None
    requests_processing: int | None


@dataclass(frozen=True)
class Limits:
    """The most bytes the watcher reads of each answer; past it the answer is unusable, not truncated."""

    health_bytes: int
    slots_bytes: int
    metrics_bytes: int
    props_bytes: int


class EngineAdapter(Protocol):
    kind: str
    health_path: str
    slots_path: str
    metrics_path: str
    props_path: str
    limits: Limits

    def argv(self, engine: EngineFile, model_path: str, key_path: str, help_text: str) -> list[str]:
        """The engine's command line. `help_text` is what the binary's --help printed (for options
        that only some builds know); the key is passed as a file path, never as a value."""

    def health(self, status: int) -> str:
        """ "healthy", "loading", or "failing" for the HTTP status of the health route."""

    def slots(self, body: bytes) -> Slots: ...

    def metrics(self, body: bytes) -> Metrics: ...

    def version(self, body: bytes) -> str | None: ...


def adapter_for(kind: str) -> EngineAdapter:
    from . import llama_cpp  # imported here: each adapter imports this module for its types

    adapters: dict[str, EngineAdapter] = {"llama.cpp": llama_cpp.ADAPTER}
    missing = set(ENGINE_KINDS) - set(adapters)
    assert not missing, f"engine kinds without an adapter: {missing}"
    return adapters[kind]

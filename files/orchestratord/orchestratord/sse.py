"""Finding the commit point in an engine's SSE answer: the first event that carries something real.

Real: a chunk with non-empty content, text or tool_calls, a finish_reason, an error, `[DONE]`, or
anything that does not read as a chunk (the engine said something; it is passed on, not retried). Not
real: the preamble (the role-only first chunk, empty deltas) and SSE comments. Only the events before
the commit point are read, each decoded with a struct holding just the fields that decide it.
"""

from __future__ import annotations

import msgspec

# Before the commit point everything is held back; an engine that sends this much preamble is
# committed to rather than held longer.
MAX_HELD_BYTES = 256 * 1024


class _Delta(msgspec.Struct):
    content: str | None = None
    tool_calls: list[msgspec.Raw] | None = None


class _Choice(msgspec.Struct):
    delta: _Delta | None = None
    text: str | None = None
    finish_reason: str | None = None


class _Chunk(msgspec.Struct):
    choices: list[_Choice] = []
    error: msgspec.Raw | None = None


_decode_chunk = msgspec.json.Decoder(_Chunk).decode


def _is_real(data: bytes) -> bool:
    if data == b"[DONE]":
        return True
    try:
        chunk = _decode_chunk(data)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return True
    if chunk.error is not None:
        return True
    for choice in chunk.choices:
        if choice.finish_reason or choice.text:
            return True
        delta = choice.delta
        if delta is not None and (delta.content or delta.tool_calls):
            return True
    return False


class CommitScanner:
    """Fed the bytes of an SSE answer as they come; says when the commit point has been reached."""

    __slots__ = ("_pending", "held")

    def __init__(self) -> None:
        self._pending = b""  # the part of the answer after the last complete event
        self.held = 0

    def feed(self, chunk: bytes) -> bool:
        self.held += len(chunk)
        if self.held > MAX_HELD_BYTES:
            return True
        pending = self._pending + chunk
        if b"\r" in pending:  # only scanned here: the bytes passed on are the engine's own
            pending = pending.replace(b"\r\n", b"\n")
        start = 0
        while True:
            end = pending.find(b"\n\n", start)
            if end < 0:
                break
            event = pending[start:end]
            start = end + 2
            for line in event.split(b"\n"):
                line = line.rstrip(b"\r")
                if line.startswith(b"data:") and _is_real(line[5:].strip()):
                    return True
        self._pending = pending[start:]
        return False

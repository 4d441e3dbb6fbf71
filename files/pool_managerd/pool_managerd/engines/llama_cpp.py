"""llama.cpp's llama-server: its command line and how to read /health, /slots, /metrics and /props.

What the answers look like differs between llama.cpp versions, so each reader takes every shape met so far
(recordings of each under tests/data/engine/):
- /health: the status code is the answer (200 loaded, 503 loading); the body changed shape several times.
- /slots: a list with one object per slot. Recent builds say `is_processing` (bool); older ones (2024)
  said `state` (0 idle, anything else processing).
- /metrics (with --metrics): Prometheus text; `llamacpp:requests_deferred` and
  `llamacpp:requests_processing` exist in every version that has the route.
- /props: `build_info` ("b<number>-<commit>") in recent builds, absent in older ones.
"""

from __future__ import annotations

import json
import math
import re

from ..engine_config import MAX_PARALLEL, EngineFile
from . import EngineAnswerError, Limits, Metrics, Slots

# llama-server prints this in --help when it was built with its web UI switch; the kit's builds have
# no UI compiled in, but a build with one must not serve it on a pool's port.
NO_WEBUI = "--no-webui"
_PRINTABLE = re.compile(r"^[^\x00-\x1f\x7f]{1,256}(?!\n)$")
_METRIC_LINE = re.compile(r"^(llamacpp:requests_(?:deferred|processing))(?:\{[^}]*\})?\s+(\S+)")
MAX_COUNT = 1_000_000  # the wire's Count bound


def _whole(value: str, name: str) -> int:
    try:
        number = float(value)
    except ValueError:
        raise EngineAnswerError(f"/metrics: {name} is {value[:40]!r}, not a number") from None
    if not math.isfinite(number) or number < 0 or number != int(number) or number > MAX_COUNT:
        raise EngineAnswerError(f"/metrics: {name} is {value[:40]!r}, not a count from 0 to {MAX_COUNT}")
    return int(number)


class LlamaCpp:
    kind = "llama.cpp"
    health_path = "/health"
    slots_path = "/slots"
    metrics_path = "/metrics"
    props_path = "/props"
    # A busy slot's entry carries its sampling parameters (about 2 KB; older versions also the prompt):
    # 16 KiB per slot covers that, and the bound stays fixed whatever the engine sends.
    limits = Limits(
        health_bytes=4096,
        slots_bytes=MAX_PARALLEL * 16 * 1024,
        metrics_bytes=256 * 1024,
        props_bytes=1024 * 1024,
    )

    def argv(self, engine: EngineFile, model_path: str, key_path: str, help_text: str) -> list[str]:
        argv = [
            engine.binary,
            *("-m", model_path),
            # The model id, not the file name, is what /v1/models and every completion answer name.
            *("--alias", engine.model_id),
            *("--host", engine.host),
            *("--port", str(engine.port)),
            *("-c", str(engine.context_size)),
            *("-np", str(engine.parallel)),
            *("--api-key-file", key_path),
            "--metrics",
        ]
        if NO_WEBUI in help_text:
            argv.append(NO_WEBUI)
        return argv + list(engine.extra_args)

    def health(self, status: int) -> str:
        if status == 200:
            return "healthy"
        if status == 503:  # "Loading model": the body's shape differs between versions, the code does not
            return "loading"
        return "failing"

    def slots(self, body: bytes) -> Slots:
        try:
            entries = json.loads(body)
        except ValueError:
            raise EngineAnswerError("/slots: not JSON") from None
        if not isinstance(entries, list) or not entries:
            raise EngineAnswerError("/slots: not a non-empty list of slots")
        if len(entries) > MAX_PARALLEL:
            raise EngineAnswerError(f"/slots: {len(entries)} slots, more than {MAX_PARALLEL}")
        processing = 0
        for number, slot in enumerate(entries):
            if not isinstance(slot, dict):
                raise EngineAnswerError(f"/slots: slot {number} is not an object")
            if isinstance(slot.get("is_processing"), bool):
                processing += slot["is_processing"]
            elif isinstance(slot.get("state"), int) and not isinstance(slot.get("state"), bool):
                processing += slot["state"] != 0
            else:
                raise EngineAnswerError(f"/slots: slot {number} has neither is_processing nor state")
        return Slots(total=len(entries), processing=processing)

    def metrics(self, body: bytes) -> Metrics:
        found: dict[str, int] = {}
        for line in body.decode("utf-8", "replace").splitlines():
            match = _METRIC_LINE.match(line)
            if match:
                found[match.group(1)] = _whole(match.group(2), match.group(1))
        return Metrics(
            requests_deferred=found.get("llamacpp:requests_deferred"),
            requests_processing=found.get("llamacpp:requests_processing"),
        )

    def version(self, body: bytes) -> str | None:
        """`build_info` of /props when it is there and printable; None for builds that do not say."""
        try:
            props = json.loads(body)
        except ValueError:
            return None
        build = props.get("build_info") if isinstance(props, dict) else None
        return build if isinstance(build, str) and _PRINTABLE.search(build) else None


ADAPTER = LlamaCpp()

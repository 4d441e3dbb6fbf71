"""Run one leg (a target under a given load) with the load generators and merge what they measured."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from _orchestratord import harness

LOADGEN = Path(__file__).resolve().parent / "loadgen.py"
START_DELAY_S = 1.0  # time for every generator process to start before the common start time


class BenchFailed(harness.BenchFailed):
    """A leg with any request that did not end well: its figures would measure error paths."""


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


@dataclass
class LegResult:
    label: str
    window_s: float
    sent: int
    served_in_window: int
    first_token_ms: list[float] = field(repr=False)
    total_ms: list[float] = field(repr=False)
    lag_ms: list[float] = field(repr=False)
    errors: dict[str, int]
    error_count: int

    @property
    def served_per_s(self) -> float:
        """Answers that ended well within the measured window, per second of it."""
        return self.served_in_window / self.window_s

    def p(self, which: str, fraction: float) -> float:
        return percentile(getattr(self, which), fraction)

    def describe(self) -> str:
        return (
            f"{self.label:<24} {self.served_per_s:8.1f} req/s   first token p50/p95/p99 "
            f"{self.p('first_token_ms', 0.5):6.2f} {self.p('first_token_ms', 0.95):6.2f} "
            f"{self.p('first_token_ms', 0.99):6.2f} ms   total {self.p('total_ms', 0.5):6.2f} "
            f"{self.p('total_ms', 0.95):6.2f} {self.p('total_ms', 0.99):6.2f} ms   "
            f"generator lag p99 {self.p('lag_ms', 0.99):5.2f} ms   errors {self.error_count}"
        )


def run_leg(
    label: str,
    url: str,
    body: dict,
    key_file: Path,
    load_cpus: list[str],
    duration_s: float,
    scratch: Path,
    rate: float | None = None,
    concurrency: int | None = None,
    allow_errors: bool = False,
) -> LegResult:
    """Split the rate (or the clients) over one generator process per load CPU, start them together."""
    start_at = time.time() + START_DELAY_S
    shares = split(rate if rate is not None else concurrency, len(load_cpus), whole=rate is None)
    procs, outs = [], []
    for number, (cpu, share) in enumerate(zip(load_cpus, shares, strict=True)):
        if not share:
            continue
        out = scratch / f"{re.sub(r'[^a-z0-9]+', '-', label.lower())}-{number}.json"
        mode = ["--rate", str(share)] if rate is not None else ["--concurrency", str(share)]
        command = [
            "taskset", "-c", cpu, sys.executable, str(LOADGEN),
            "--url", url, "--body", json.dumps(body), "--key-file", str(key_file), *mode,
            "--start-at", str(start_at), "--duration", str(duration_s), "--out", str(out),
        ]  # fmt: skip
        procs.append(subprocess.Popen(command))
        outs.append(out)
    for proc in procs:
        if proc.wait(timeout=duration_s + 120) != 0:
            raise BenchFailed(f"bench: {label}: a load generator exited with {proc.returncode}")
    parts = [json.loads(out.read_text()) for out in outs]
    errors: dict[str, int] = {}
    for part in parts:
        for text, count in part["errors"].items():
            errors[text] = errors.get(text, 0) + count
    result = LegResult(
        label=label,
        window_s=max(part["window_s"] for part in parts),
        sent=sum(part["sent"] for part in parts),
        served_in_window=sum(part["served_in_window"] for part in parts),
        first_token_ms=[v for part in parts for v in part["first_token_ms"]],
        total_ms=[v for part in parts for v in part["total_ms"]],
        lag_ms=[v for part in parts for v in part["lag_ms"]],
        errors=errors,
        error_count=sum(part["error_count"] for part in parts),
    )
    if result.error_count and not allow_errors:
        samples = "; ".join(f"{count}x {text}" for text, count in errors.items())
        raise BenchFailed(
            f"bench: {label}: {result.error_count} of {result.sent} requests failed ({samples}); "
            "a failed leg prints no figure"
        )
    return result


def split(total: float | int | None, parts: int, whole: bool) -> list:
    if whole:
        base, extra = divmod(int(total), parts)
        return [base + (1 if n < extra else 0) for n in range(parts)]
    return [total / parts] * parts

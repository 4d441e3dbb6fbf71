"""Closed-loop saturation with wrk: the most requests per second a target serves, the generator in C.

The open-loop legs run at a fixed rate, which every target keeps while it has headroom; the throughput goal
(daemon / bare proxy) is about capacity, so it is measured here, each target loaded as hard as wrk can.
A Lua `response` hook checks each answer: status 200 and a stream ending with `data: [DONE]`; wrk alone would
count an error event inside a 200 as a request served.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from _orchestratord import harness

from .legs import BenchFailed


def write_script(path: Path, body: str, key: str) -> Path:
    path.write_text(
        f"""
wrk.method = "POST"
wrk.body = {harness.lua_string(body)}
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = {harness.lua_string("Bearer " + key)}
local threads = {{}}
function setup(thread) table.insert(threads, thread) end
bad = 0
function response(status, headers, body)
  if status ~= 200 or not string.find(body, "data: [DONE]", 1, true) then bad = bad + 1 end
end
function done(summary, latency, requests)
  local total = 0
  for _, thread in ipairs(threads) do total = total + thread:get("bad") end
  io.write(string.format("bad answers: %d\\n", total))
end
"""
    )
    path.chmod(0o600)
    return path


def run(url: str, script: Path, load_cpus: list[str], connections: int, duration_s: int, label: str):
    """wrk with one thread per load CPU; returns harness.WrkResult, or fails the bench on a bad answer."""
    command = [
        "taskset", "-c", ",".join(load_cpus), "wrk", f"-t{len(load_cpus)}", f"-c{connections}",
        f"-d{duration_s}s", "--latency", "-s", str(script), url,
    ]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    output, errors = proc.communicate(timeout=duration_s + 60)
    if proc.returncode != 0:
        raise BenchFailed(f"bench: {label}: wrk exited with {proc.returncode}: {errors.strip()[:500]}")
    result = harness.parse_wrk(output)
    bad = int(re.search(r"bad answers: (\d+)", output).group(1))
    if bad or result.non_2xx or result.socket_errors:
        raise BenchFailed(
            f"bench: {label}: {bad} bad answers, {result.non_2xx} non-2xx, {result.socket_errors} socket "
            f"errors of {result.requests}; a failed run prints no figure"
        )
    return result

"""Helpers for the orchestratord tests: nodes brought online over the real HTTP API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from support import Daemon, package_env, sample_heartbeat, sample_registration

GiB = 1024**3


def online_node(
    daemon: Daemon,
    node_id: str,
    models: list[str] | None = None,
    pools: int = 1,
    **pool_overrides: Any,
) -> dict[str, Any]:
    """Register `node_id` and send one heartbeat; returns the registration body."""
    registration = sample_registration(node_id, pools=pools)
    answer = daemon.api("POST", "/v2/nodes/register", registration)
    assert answer.status == 200, answer.text
    beat(daemon, registration, models, **pool_overrides)
    return registration


def beat(daemon: Daemon, registration: dict[str, Any], models: list[str] | None = None, **pool_overrides):
    body = sample_heartbeat(registration, models, **pool_overrides)
    answer = daemon.api("POST", f"/v2/nodes/{registration['node_id']}/heartbeat", body)
    assert answer.status == 200, answer.text
    return answer.body


def beat_pools(daemon: Daemon, node_id: str, pools: list[dict[str, Any]]):
    """A heartbeat with hand-made pool readings (each a full PoolStatus)."""
    body = {"timestamp": "2026-01-01T00:00:00Z", "pools": pools}
    answer = daemon.api("POST", f"/v2/nodes/{node_id}/heartbeat", body)
    assert answer.status == 200, answer.text
    return answer.body


def pool_reading(pool_id: str, models: list[str], **overrides: Any) -> dict[str, Any]:
    reading = {
        "pool_id": pool_id,
        "ready": True,
        "draining": False,
        "slots_total": 4,
        "slots_free": 4,
        "vram_total_bytes": 80 * GiB,
        "vram_free_bytes": 70 * GiB,
        "engine": "vllm",
        "models_available": models,
    }
    reading.update(overrides)
    return reading


def place(daemon: Daemon, **request: Any):
    return daemon.api("POST", "/v2/placement", request)


def status_of(daemon: Daemon, node_id: str) -> str:
    answer = daemon.api("GET", f"/v2/nodes/{node_id}")
    assert answer.status == 200, answer.text
    return answer.body["status"]


def run_daemon_once(config_path: Path | None, timeout: float = 20, **env: str) -> subprocess.CompletedProcess:
    """Start orchestratord expecting it to refuse to start; returns the finished process."""
    argv = [sys.executable, "-m", "orchestratord"]
    if config_path is not None:
        argv += ["--config", str(config_path)]
    return subprocess.run(
        argv, env=package_env(**env), capture_output=True, text=True, timeout=timeout, cwd=os.getcwd()
    )


def write_yaml(path: Path, values: dict[str, Any]) -> Path:
    path.write_text(json.dumps(values))  # JSON is YAML
    return path

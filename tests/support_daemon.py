"""Helpers for the orchestratord tests: nodes brought online over the real HTTP API."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from support import Daemon, Response, engine_status, package_env, sample_heartbeat, sample_registration

GiB = 1024**3


def online_node(
    daemon: Daemon,
    node_id: str,
    models: list[str] | None = None,
    pools: int = 1,
    serve: str | None = None,
    **pool_overrides: Any,
) -> dict[str, Any]:
    """Register `node_id` and send one heartbeat; returns the registration body.

    With `serve`, every pool's engine serves that model and is ready (each pool at its own URL, see
    `engine_url`); without it the pools have no engine: they stage `models` but serve nothing.
    """
    registration = sample_registration(node_id, pools=pools)
    answer = daemon.api("POST", "/v2/nodes/register", registration)
    assert answer.status == 200, answer.text
    beat(daemon, registration, models, serve=serve, **pool_overrides)
    return registration


def engine_url(node_id: str, pool_id: str) -> str:
    """The engine URL the tests give a pool: one port per pool number on the node's lab name."""
    number = pool_id.rsplit("-", 1)[-1]
    return f"http://{node_id}.lab:{8100 + (int(number) if number.isdigit() else 0)}"


def serving(node_id: str, pool_id: str, model_id: str, state: str = "ready") -> dict[str, Any]:
    """The engine reading of a pool of `node_id` whose engine serves `model_id`."""
    return engine_status(model_id, engine_url(node_id, pool_id), state)


def beat(
    daemon: Daemon,
    registration: dict[str, Any],
    models: list[str] | None = None,
    serve: str | None = None,
    **pool_overrides: Any,
):
    """One heartbeat for every pool of `registration`; with `serve`, each pool's engine serves that model
    and is ready (an `engine` override wins)."""
    body = sample_heartbeat(registration, models)
    for pool in body["pools"]:
        if serve is not None:
            pool["engine"] = serving(registration["node_id"], pool["pool_id"], serve)
        pool.update(pool_overrides)
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
        "engine": None,
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


def at_once(daemon: Daemon, requests: list[tuple[str, str, Any]]) -> list[Response]:
    """Send every (method, path, body) at the same moment, each on its own connection opened beforehand,
    so the daemon has them all in hand together; the answers come back in the order asked."""
    barrier = threading.Barrier(len(requests))
    port = daemon.config["listen_port"]

    def send(request: tuple[str, str, Any]) -> Response:
        method, path, body = request
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            connection.connect()
            headers = {"Authorization": f"Bearer {daemon.token}"}
            payload = None
            if body is not None:
                payload = json.dumps(body).encode()
                headers["Content-Type"] = "application/json"
            barrier.wait(timeout=10)
            connection.request(method, path, body=payload, headers=headers)
            answer = connection.getresponse()
            text = answer.read().decode("utf-8", "replace")
            return Response(answer.status, json.loads(text) if text else None, dict(answer.headers), text)
        finally:
            connection.close()

    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        return list(pool.map(send, requests))

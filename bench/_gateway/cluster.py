"""orchestratord as shipped, set up as a gateway: a client keys file, fake nodes whose engine is a given URL.

The fake nodes register over /v2 with the cluster token and keep heartbeating from a thread, so they stay
live however long the legs run. Their pools report the engine `ready`, serving one model, with as many
slots as the bench asks for.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import urllib.request
from pathlib import Path

from _orchestratord import harness

CLIENT_NAME = "bench"
GATEWAY_MARKER = "client_keys_file"  # a setting only a daemon with the gateway knows


def daemon_has_gateway() -> bool:
    """Whether the checkout's orchestratord has the gateway (issue 14) to measure."""
    config = harness.DAEMON_SOURCE / "orchestratord" / "config.py"
    return GATEWAY_MARKER in config.read_text()


def write_secret(path: Path, text: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    return path


def pool_reading(pool_id: str, slots: int, model_id: str, engine_url: str) -> dict:
    return {
        "pool_id": pool_id,
        "ready": True,
        "draining": False,
        "slots_total": slots,
        "slots_free": slots,
        "vram_total_bytes": 80 * 1024**3,
        "vram_free_bytes": 40 * 1024**3,
        "engine": {"kind": "llama.cpp", "state": "ready", "model_id": model_id, "url": engine_url},
        "models_available": [model_id],
    }


class GatewayCluster:
    """A daemon whose fake nodes' engines are `engine_url`; `client_key` opens its /v1 routes."""

    def __init__(
        self,
        workdir: Path,
        engine_url: str,
        model_id: str,
        nodes: int,
        slots_per_pool: int,
        engine_key: str | None = None,
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.client_key = "sk-bench-" + secrets.token_urlsafe(32)
        keys_file = write_secret(workdir / "client-keys", f"{CLIENT_NAME} {self.client_key}\n")
        self.client_key_file = write_secret(workdir / "client-key", self.client_key)
        self.node_ids = [f"gw-bench-{n:02d}" for n in range(nodes)]
        settings: dict = {
            "client_keys_file": str(keys_file),
            "node_timeout_ms": 15_000,
            "heartbeat_interval_ms": 2_000,
        }
        if engine_key is not None:
            keys_dir = workdir / "engine-keys"
            keys_dir.mkdir(mode=0o700)
            for node_id in self.node_ids:
                write_secret(keys_dir / node_id, engine_key + "\n")
            settings["engine_keys_dir"] = str(keys_dir)
        self.daemon = harness.Daemon(workdir, workdir, **settings)
        self.url = self.daemon.url
        self._beats = [
            (
                node_id,
                {
                    "timestamp": "2026-01-01T00:00:00Z",
                    "pools": [pool_reading("pool-0", slots_per_pool, model_id, engine_url)],
                },
            )
            for node_id in self.node_ids
        ]
        registrations = []
        for node_id, beat in self._beats:
            registration = harness.registration(node_id, pools=1)
            registration["pools"][0]["slots_total"] = slots_per_pool
            registrations.append((registration, beat))
        harness.seed_nodes(self.url, self.daemon.token, registrations)
        self._stop = threading.Event()
        self._heartbeater = threading.Thread(target=self._heartbeat_loop, daemon=True)
        self._heartbeater.start()

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(1.0):
            for node_id, beat in self._beats:
                request = urllib.request.Request(
                    f"{self.url}/v2/nodes/{node_id}/heartbeat",
                    data=json.dumps(beat).encode(),
                    headers={
                        "Authorization": f"Bearer {self.daemon.token}",
                        "Content-Type": "application/json",
                    },
                    method="POST",
                )
                try:
                    with urllib.request.urlopen(request, timeout=5):
                        pass
                except OSError as failure:  # reported, not fatal: the legs' own error counts decide
                    print(f"  heartbeat of {node_id} failed: {failure}", flush=True)

    def placement_errors(self) -> list[dict]:
        request = urllib.request.Request(
            self.url + "/v2/placement/errors", headers={"Authorization": f"Bearer {self.daemon.token}"}
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as answer:
                return json.load(answer).get("errors", [])
        except OSError:
            return []

    def counter(self, name: str) -> float | None:
        """One unlabelled sample of the daemon's /metrics (None when it cannot be read)."""
        try:
            with urllib.request.urlopen(self.url + "/metrics", timeout=5) as answer:
                text = answer.read().decode()
        except OSError:
            return None
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split(" ", 1)[1])
        return None

    def stop(self) -> None:
        self._stop.set()
        self._heartbeater.join(timeout=10)
        self.daemon.stop()

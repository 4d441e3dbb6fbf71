"""Helpers shared by the tests: a real orchestratord on loopback, an HTTP client, polling.

Every test talks HTTP to a real daemon started as a subprocess; nothing here mocks the daemon.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
# The shipped packages are imported from the source tree, not installed, so a
# test always runs the code in the checkout.
PACKAGE_PATHS = [REPO_ROOT / "files" / "orchestratord", REPO_ROOT / "files" / "pool_managerd"]
TEST_TOKEN = "test-token-" + "x" * 40  # 51 characters, above the 32 minimum


def on_localhost(tool: str, *args: str) -> list[str]:
    """argv for this venv's `ansible` or `ansible-playbook` on localhost over the local connection, with
    this interpreter on the "remote" side too (interpreter discovery could pick a Python without the kit's
    dependencies)."""
    return [
        str(Path(sys.executable).with_name(tool)),
        *("-i", "localhost,", "-c", "local"),
        *("-e", f"ansible_python_interpreter={sys.executable}"),
        *args,
    ]


def first_task_result(callback_output: dict[str, Any]) -> dict[str, Any]:
    """localhost's result of the first task, from the json stdout callback's output."""
    return callback_output["plays"][0]["tasks"][0]["hosts"]["localhost"]


def package_env(**extra: str) -> dict[str, str]:
    """The environment a child process needs to import the kit's packages from the checkout."""
    env = dict(os.environ)
    paths = [str(p) for p in PACKAGE_PATHS]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("LLORCH_API_TOKEN", None)
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(
    predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05, what: str = ""
) -> Any:
    """Poll `predicate` until it returns something truthy or the deadline passes."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = predicate()
        except Exception as exc:  # the thing polled for may not exist yet
            last_error = exc
        else:
            if result:
                return result
        time.sleep(interval)
    raise AssertionError(
        f"timed out after {timeout}s waiting for {what or predicate}: last error {last_error!r}"
    )


@dataclass
class Response:
    status: int
    body: Any
    headers: dict[str, str]
    text: str


def http(
    method: str,
    url: str,
    body: Any = None,
    token: str | None = None,
    headers: dict[str, str] | None = None,
    raw: bytes | None = None,
    timeout: float = 10.0,
    context: ssl.SSLContext | None = None,
) -> Response:
    """One HTTP request with the standard library (HTTPS trusting `context`); never raises on an HTTP
    status."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as answer:
            status, payload, answer_headers = answer.status, answer.read(), dict(answer.headers)
    except urllib.error.HTTPError as error:
        status, payload, answer_headers = error.code, error.read(), dict(error.headers)
    text = payload.decode("utf-8", "replace")
    try:
        parsed = json.loads(text) if text else None
    except ValueError:
        parsed = None
    return Response(status, parsed, answer_headers, text)


@dataclass
class Daemon:
    """A real orchestratord process on 127.0.0.1."""

    workdir: Path
    config: dict[str, Any]
    token: str = TEST_TOKEN
    proc: subprocess.Popen | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.workdir / "orchestratord.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.config['listen_port']}"

    @property
    def config_path(self) -> Path:
        return self.workdir / "orchestratord.yml"

    def write_config(self) -> None:
        self.config_path.write_text(yaml.safe_dump(self.config))

    def start(self, wait: bool = True) -> Daemon:
        self.write_config()
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "orchestratord", "--config", str(self.config_path)],
            env=package_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
        )
        if wait:
            wait_until(self._answers, timeout=20, what=f"orchestratord on {self.url}")
        return self

    def _answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"orchestratord exited with {self.proc.returncode}:\n{self.log()}")
        try:
            return http("GET", self.url + "/health", timeout=1).status == 200
        except OSError:
            return False

    def api(
        self, method: str, path: str, body: Any = None, token: str | object | None = ..., **kw
    ) -> Response:
        """A request to the daemon, authenticated with its token unless `token` says otherwise."""
        use_token = self.token if token is ... else token
        return http(method, self.url + path, body=body, token=use_token, **kw)

    def kill(self, sig: int = signal.SIGKILL) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=15)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def restart(self) -> Daemon:
        self.stop()
        return self.start()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def make_daemon(workdir: Path, **overrides: Any) -> Daemon:
    """A daemon (not yet started) with a fresh database, a 0600 token file and test-friendly timings."""
    workdir.mkdir(parents=True, exist_ok=True)
    token_file = workdir / "api-token"
    token_file.write_text(TEST_TOKEN + "\n")
    token_file.chmod(0o600)
    config = {
        "listen_host": "127.0.0.1",
        "listen_port": free_port(),
        "token_file": str(token_file),
        "db_path": str(workdir / "registry.db"),
        "node_timeout_ms": 3000,
        "heartbeat_interval_ms": 200,
        "log_level": "info",
        # Plain HTTP unless a test asks for TLS (tests/support_tls.py's tls_daemon).
        "plain_http": True,
    }
    config.update(overrides)
    return Daemon(workdir=workdir, config=config)


def sample_registration(node_id: str = "gpu-1", pools: int = 1, gpus_per_pool: int = 1) -> dict[str, Any]:
    """A valid registration body in the contract's shape."""
    gpu_list, pool_list = [], []
    for p in range(pools):
        indices = list(range(p * gpus_per_pool, (p + 1) * gpus_per_pool))
        pool_list.append({"pool_id": f"pool-{p}", "gpus": indices, "slots_total": 4})
        for index in indices:
            gpu_list.append(
                {
                    "index": index,
                    "uuid": f"GPU-{node_id}-{index}",
                    "name": "NVIDIA H100 80GB HBM3",
                    "vram_total_bytes": 80 * 1024**3,
                    "compute_capability": "9.0",
                    "driver_version": "550.90.07",
                }
            )
    return {
        "node_id": node_id,
        "machine_id": f"machine-{node_id}",
        "address": f"http://{node_id}.lab:8080",
        "version": "0.1.0",
        "pools": pool_list,
        "capabilities": {
            "gpus": gpu_list,
            "cuda_version": "12.4",
            "cpu_cores": 32,
            "ram_total_bytes": 256 * 1024**3,
        },
    }


def engine_status(
    model_id: str, url: str = "http://127.0.0.1:8101", state: str = "ready", **extra: Any
) -> dict[str, Any]:
    """A pool's engine reading in the contract's shape (EngineStatus): a llama.cpp engine serving
    `model_id` at `url`, in `state` (loading, ready, busy or dead)."""
    return {"kind": "llama.cpp", "state": state, "model_id": model_id, "url": url, **extra}


def sample_heartbeat(registration: dict[str, Any], models: list[str] | None = None, **pool_overrides: Any):
    """A heartbeat for every pool of `registration`, all ready with free slots."""
    pools = []
    for pool in registration["pools"]:
        status = {
            "pool_id": pool["pool_id"],
            "ready": True,
            "draining": False,
            "slots_total": pool["slots_total"],
            "slots_free": pool["slots_total"],
            "vram_total_bytes": 80 * 1024**3 * len(pool["gpus"]),
            "vram_free_bytes": 70 * 1024**3 * len(pool["gpus"]),
            "engine": None,
            "models_available": list(models or []),
        }
        status.update(pool_overrides)
        pools.append(status)
    return {"timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "pools": pools}

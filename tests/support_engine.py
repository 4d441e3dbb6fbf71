"""Helpers for the engine tests: the cached llama-server build, the tiny model, a real engine on loopback.

Nothing here stands in for llama.cpp: the archive is the one scripts/build-engine.sh builds (once per
machine, then cached outside the clone), unpacked the way a node will unpack it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import REPO_ROOT, free_port, http, package_env, wait_until

# The contract is stdlib only: the tests write manifests with the very code staging uses.
sys.path.insert(0, str(REPO_ROOT / "plugins" / "module_utils"))
import llorch_contract

BUILD_SCRIPT = REPO_ROOT / "scripts" / "build-engine.sh"
MODEL_GENERATOR = REPO_ROOT / "lab" / "model_mirror" / "make_gguf.py"
BUILD_TOOLS = ("cmake", "g++", "make")
# A build on 2 busy cores takes minutes; `make unit` runs `make engine` first, so tests normally find it.
BUILD_TIMEOUT_S = 3600
ENGINE_API_KEY = "engine-key-" + "k" * 40
TINY_MODEL_ID = "llorch-lab/tiny"


def build_script(*args: str, timeout: float = BUILD_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(BUILD_SCRIPT), *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def engine_archive() -> Path:
    """The cached llama-server archive, built first where it is missing.

    Skips only where no build is possible (a build tool is missing); any other failure fails the test.
    """
    key = build_script("--key").stdout.strip()
    missing = [tool for tool in BUILD_TOOLS if shutil.which(tool) is None]
    answer = build_script()
    if answer.returncode != 0 and missing:
        pytest.skip(
            f"llama-server {key} is not cached and cannot be built here: {', '.join(missing)} missing"
        )
    assert answer.returncode == 0, answer.stderr
    return Path(answer.stdout.strip().splitlines()[-1])


def vocab_file() -> Path:
    answer = build_script("--vocab", timeout=600)
    assert answer.returncode == 0, answer.stderr
    return Path(answer.stdout.strip())


def make_tiny_model(path: Path, seed: int | None = None) -> Path:
    argv = [sys.executable, str(MODEL_GENERATOR), "--vocab", str(vocab_file()), str(path)]
    if seed is not None:
        argv += ["--seed", str(seed)]
    subprocess.run(argv, check=True, timeout=120)
    return path


def unpack_engine(archive: Path, dest: Path) -> Path:
    """Unpack the archive as a node would; returns the llama-server binary's path."""
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    return dest / "llama-server" / "llama-server"


def write_key_file(path: Path, key: str = ENGINE_API_KEY) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(key + "\n")
    return path


def stop_process(process: subprocess.Popen | None) -> None:
    """SIGTERM, then SIGKILL after 10 s: how every engine of the tests ends (a no-op when it already has)."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


@dataclass
class Engine:
    """A real llama-server on 127.0.0.1, its key read from a 0600 file (never in argv)."""

    binary: Path
    model: Path
    key_file: Path
    log_path: Path
    parallel: int = 2
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    healthy_after_s: float = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        return [
            str(self.binary),
            *("--host", "127.0.0.1", "--port", str(self.port)),
            *("--model", str(self.model), "--alias", "tiny"),
            *("--api-key-file", str(self.key_file)),
            *("--parallel", str(self.parallel), "--ctx-size", "1024", "--threads", "2"),
            "--metrics",
        ]

    def start(self, health_timeout: float = 60.0) -> Engine:
        # Only what the engine needs: no inherited LLAMA_* variable may change its settings.
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
        self.started_at = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT, env=env)
        wait_until(
            self.healthy,
            timeout=health_timeout,
            interval=0.02,
            what=f"llama-server /health ({self.log_tail()})",
        )
        self.healthy_after_s = time.monotonic() - self.started_at
        return self

    def healthy(self) -> bool:
        assert self.process is not None and self.process.poll() is None, (
            f"llama-server exited: {self.log_tail()}"
        )
        return http("GET", self.url + "/health", timeout=2).status == 200

    def api(
        self, method: str, path: str, body: Any = None, key: str | None = ENGINE_API_KEY, timeout: float = 30
    ):
        return http(method, self.url + path, body, token=key, timeout=timeout)

    def stream(self, path: str, body: dict[str, Any], key: str = ENGINE_API_KEY) -> Iterator[str]:
        """The `data:` payloads of a server-sent-event answer, in order."""
        connection = HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            connection.request(
                "POST",
                path,
                json.dumps(body),
                {"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
            )
            answer = connection.getresponse()
            assert answer.status == 200, answer.read()
            assert answer.getheader("Content-Type", "").startswith("text/event-stream")
            for raw_line in answer:
                line = raw_line.decode().strip()
                if line.startswith("data:"):
                    yield line.removeprefix("data:").strip()
        finally:
            connection.close()

    def log_tail(self, lines: int = 5) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        stop_process(self.process)


# --- an engine as a node runs it: staged model, engine file, launched by pool_managerd.engine_exec --------


def stage_model(models_dir: Path, model_id: str, source: Path, name: str = "tiny.gguf") -> Path:
    """Put `source` into models_dir and record it in the manifest as staging does (sha256, size, mtime),
    with the contract's own manifest writer."""
    models_dir.mkdir(parents=True, exist_ok=True)
    path = models_dir / name
    if not path.exists():
        shutil.copyfile(source, path)
    info = path.stat()
    folder = llorch_contract.open_models_dir(str(models_dir))
    try:
        with llorch_contract.manifest_lock(folder):
            entries, _problems = llorch_contract.read_manifest_at(folder)
            entries[model_id] = {
                "path": str(path),
                "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                "size_bytes": info.st_size,
                "mtime_ns": info.st_mtime_ns,
                "staged_at": "2026-01-01T00:00:00Z",
                "source": "file://test",
            }
            llorch_contract.write_manifest_at(folder, entries)
    finally:
        os.close(folder)
    return path


def engine_settings(pool_id: str, binary: Path, models_dir: Path, **overrides: Any) -> dict[str, Any]:
    """An engine file's content for a pool on 127.0.0.1 (the shape the roles render)."""
    port = overrides.pop("port", None) or free_port()
    settings: dict[str, Any] = {
        "pool_id": pool_id,
        "kind": "llama.cpp",
        "model_id": TINY_MODEL_ID,
        "models_dir": str(models_dir),
        "binary": str(binary),
        "host": "127.0.0.1",
        "port": port,
        "url": f"http://127.0.0.1:{port}",
        "gpus": [0],
        "context_size": 1024,
        "parallel": 2,
        # One thread: the test machines are small and shared; context shift lets a long completion run on.
        "extra_args": ["--threads", "1", "--context-shift"],
    }
    settings.update(overrides)
    return settings


@dataclass
class EngineUnit:
    """One pool's engine started the way llorch-engine@<pool>.service starts it: `python -m
    pool_managerd.engine_exec FILE` with the key in $CREDENTIALS_DIRECTORY (what LoadCredential= gives)."""

    engine_file: Path
    credentials_dir: Path
    log_path: Path
    process: subprocess.Popen | None = None

    @property
    def settings(self) -> dict[str, Any]:
        return yaml.safe_load(self.engine_file.read_text())

    @property
    def url(self) -> str:
        return self.settings["url"]

    def command(self) -> list[str]:
        return [sys.executable, "-m", "pool_managerd.engine_exec", str(self.engine_file)]

    def env(self, **extra: str) -> dict[str, str]:
        return package_env(CREDENTIALS_DIRECTORY=str(self.credentials_dir), **extra)

    def launch(self) -> EngineUnit:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, env=self.env()
            )
        return self

    def start(self, health_timeout: float = 60.0) -> EngineUnit:
        self.launch()
        wait_until(
            self.healthy, timeout=health_timeout, interval=0.02, what=f"engine /health ({self.log_tail()})"
        )
        return self

    def healthy(self) -> bool:
        assert self.process is not None and self.process.poll() is None, f"engine exited: {self.log_tail()}"
        return http("GET", self.url + "/health", timeout=2).status == 200

    def api(
        self, method: str, path: str, body: Any = None, key: str | None = ENGINE_API_KEY, timeout: float = 30
    ):
        return http(method, self.url + path, body, token=key, timeout=timeout)

    def log_tail(self, lines: int = 5) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def kill(self) -> None:
        """kill -9, as the OOM killer would."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=10)

    def stop(self) -> None:
        stop_process(self.process)


def engine_unit(workdir: Path, settings: dict[str, Any]) -> EngineUnit:
    """Write the engine file and a credentials folder holding the key (0600), as systemd would."""
    workdir.mkdir(parents=True, exist_ok=True)
    engine_file = workdir / f"{settings['pool_id']}.yml"
    engine_file.write_text(yaml.safe_dump(settings))
    credentials = workdir / "credentials"
    if not credentials.exists():
        credentials.mkdir(mode=0o700)
        write_key_file(credentials / "engine-api-key")
    return EngineUnit(engine_file, credentials, workdir / f"engine-{settings['pool_id']}.log")


class LongCompletion:
    """A streaming completion that keeps one slot processing until it ends or is closed (a thread)."""

    def __init__(self, url: str, n_predict: int, key: str = ENGINE_API_KEY):
        self.url, self.n_predict, self.key = url, n_predict, key
        self.tokens = 0
        self.finished = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> LongCompletion:
        self._thread.start()
        return self

    def _run(self) -> None:
        host, port = self.url.removeprefix("http://").rsplit(":", 1)
        connection = HTTPConnection(host, int(port), timeout=120)
        body = {"prompt": "Once upon a time", "n_predict": self.n_predict, "ignore_eos": True, "stream": True}
        try:
            connection.request(
                "POST",
                "/completion",
                json.dumps(body),
                {"Content-Type": "application/json", "Authorization": f"Bearer {self.key}"},
            )
            answer = connection.getresponse()
            assert answer.status == 200, answer.read()
            # Read as fast as the engine writes: a client slower than the engine leaves the end of the
            # answer queued after the engine's slot is already idle (a line-by-line reader fell ~15,000
            # tokens behind on 2 busy cores), and the tests must see the request end when the engine does.
            tail = b""
            while chunk := answer.read1(1 << 16):
                self.tokens += (tail + chunk).count(b"data: ")
                tail = chunk[-5:]
        except BaseException as error:  # reported by wait()
            self.error = error
        finally:
            connection.close()
            self.finished.set()

    def wait(self, timeout: float = 120) -> int:
        assert self.finished.wait(timeout), "the long completion did not finish"
        assert self.error is None, repr(self.error)
        return self.tokens

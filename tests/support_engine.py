"""Helpers for the engine tests: the cached llama-server build, the tiny model, a real engine on loopback.

Nothing here stands in for llama.cpp: the archive is the one scripts/build-engine.sh builds (once per
machine, then cached outside the clone), unpacked the way a node will unpack it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import pytest
from support import REPO_ROOT, free_port, http, wait_until

BUILD_SCRIPT = REPO_ROOT / "scripts" / "build-engine.sh"
MODEL_GENERATOR = REPO_ROOT / "lab" / "model_mirror" / "make_gguf.py"
BUILD_TOOLS = ("cmake", "g++", "make")
# A build on 2 busy cores takes minutes; `make unit` runs `make engine` first, so tests normally find it.
BUILD_TIMEOUT_S = 3600
ENGINE_API_KEY = "engine-key-" + "k" * 40


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
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

"""A real HTTP file server on 127.0.0.1 for the model staging tests and benchmark.

It serves files from a directory with `Range` support (zero-copy `sendfile`), and on request misbehaves the
way real mirrors do: drops the connection mid-file, answers 404, wants a bearer token (401), or redirects
(a model hub sends its downloads on to a CDN). It listens on any loopback address (127.0.0.2 is a second
origin on Linux), over TLS when given a certificate.
"""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from support import REPO_ROOT, first_task_result, on_localhost

RANGE_HEADER = re.compile(r"^bytes=(\d+)-$")


@dataclass
class ServedRequest:
    path: str
    range: str | None
    authorization: str | None
    headers: dict[str, str] = field(default_factory=dict)  # every request header as received


@dataclass
class ServerRules:
    """How the server misbehaves; the tests change these between requests."""

    drop_after: dict[str, int] = field(default_factory=dict)  # path -> bytes sent before the drop (once)
    token: str | None = None  # when set, requests without `Bearer <token>` get 401
    honour_range: bool = True
    redirects: dict[str, str] = field(default_factory=dict)  # path (without query) -> Location to send
    redirect_status: int = 302
    endless: set[str] = field(default_factory=set)  # paths answered with bytes until the client hangs up
    trickle_s: dict[str, float] = field(default_factory=dict)  # path -> seconds between single bytes
    stall_after: dict[str, int] = field(default_factory=dict)  # path -> bytes sent, then wait for `release`
    release: threading.Event = field(default_factory=threading.Event)


# Bounds that keep a misbehaving test server from outliving its test.
ENDLESS_MAX_BYTES = 1 << 31
MISBEHAVE_MAX_S = 60.0


class _Handler(BaseHTTPRequestHandler):
    server: FileServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        rules = self.server.rules
        self.server.requests.append(
            ServedRequest(
                self.path, self.headers.get("Range"), self.headers.get("Authorization"), dict(self.headers)
            )
        )
        if rules.token and self.headers.get("Authorization") != f"Bearer {rules.token}":
            return self._error(401, "Unauthorized")
        location = rules.redirects.get(self.path.split("?", 1)[0])
        if location is not None:
            self.send_response(rules.redirect_status)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path in rules.endless:
            return self._send_endless()
        file_path = self.server.root / self.path.lstrip("/").split("?", 1)[0]
        if not file_path.is_file():
            return self._error(404, "Not Found")
        size = file_path.stat().st_size
        start = 0
        match = RANGE_HEADER.match(self.headers.get("Range", ""))
        if match and rules.honour_range:
            start = int(match.group(1))
            if start >= size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(size - start))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        self.wfile.flush()
        count = size - start
        drop_after = rules.drop_after.pop(self.path, None)
        if drop_after is not None:
            count = max(min(count, drop_after - start), 0)
            self.close_connection = True
        if self.path in rules.trickle_s:
            return self._trickle(file_path.read_bytes()[start:], rules.trickle_s[self.path])
        stall_after = rules.stall_after.get(self.path)
        if stall_after is not None:
            self.wfile.write(file_path.read_bytes()[start:stall_after])
            self.wfile.flush()
            rules.release.wait(MISBEHAVE_MAX_S)
            self.close_connection = True
            return
        with file_path.open("rb") as handle:
            if count:
                self.connection.sendfile(handle, offset=start, count=count)
        if drop_after is not None:
            self.connection.shutdown(socket.SHUT_RDWR)

    def _send_endless(self) -> None:
        """No Content-Length, no end: the body lasts until the client hangs up (or a bound for the test)."""
        self.send_response(200)
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        block = bytes(1 << 20)
        for _ in range(ENDLESS_MAX_BYTES // len(block)):
            try:
                self.wfile.write(block)
            except OSError:
                return

    def _trickle(self, body: bytes, interval_s: float) -> None:
        """One byte at a time, never idle long enough for a read timeout to fire."""
        self.close_connection = True
        wait = threading.Event()
        for index in range(min(len(body), int(MISBEHAVE_MAX_S / interval_s))):
            try:
                self.wfile.write(body[index : index + 1])
                self.wfile.flush()
            except OSError:
                return
            wait.wait(interval_s)

    def _error(self, status: int, reason: str) -> None:
        body = reason.encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class FileServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path, host: str = "127.0.0.1", tls: tuple[Path, Path] | None = None):
        """Serve `root` on `host` (any free port); `tls` = (certificate, key) serves https."""
        super().__init__((host, 0), _Handler)
        self.scheme = "http"
        if tls is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(*tls)
            self.socket = context.wrap_socket(self.socket, server_side=True)
            self.scheme = "https"
        self.root = root
        self.rules = ServerRules()
        self.requests: list[ServedRequest] = []
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    def handle_error(self, request, client_address) -> None:
        # A client that hangs up mid-file (the module on a failed check, curl on exit) is expected here.
        pass

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"{self.scheme}://{host}:{port}"

    def start(self) -> FileServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def deterministic_bytes(size: int, seed: int = 7) -> bytes:
    """The same pseudo-random bytes on every run, so digests in tests are stable."""
    import random

    return random.Random(seed).randbytes(size)


def current_group() -> str:
    """The name of this process's group: what the role's directory takes as the agent's group in tests."""
    import grp

    return grp.getgrgid(os.getgid()).gr_name


def run_module(args: dict[str, Any], check: bool = False, env: dict[str, str] | None = None):
    """Run `ansible localhost -m model_stage` from the repo root; returns (result dict, completed process)."""
    command = on_localhost("ansible", "localhost", "-m", "llorch.kit.model_stage", "-a", json.dumps(args))
    if check:
        command.append("--check")
    run_env = dict(os.environ)
    run_env.update(
        ANSIBLE_CONFIG=str(REPO_ROOT / "ansible.cfg"),
        ANSIBLE_LOAD_CALLBACK_PLUGINS="1",
        ANSIBLE_STDOUT_CALLBACK="ansible.posix.json",
        ANSIBLE_NOCOLOR="1",
    )
    run_env.update(env or {})
    proc = subprocess.run(command, cwd=REPO_ROOT, env=run_env, capture_output=True, text=True, timeout=120)
    try:
        # At -v Ansible prints "Using <config> as config file" before the callback's JSON.
        start = 0 if proc.stdout.startswith("{") else proc.stdout.find("\n{") + 1
        output = json.loads(proc.stdout[start:])
        result = first_task_result(output)
    except (ValueError, KeyError, IndexError) as exc:
        raise AssertionError(f"no JSON result from ansible:\n{proc.stdout}\n{proc.stderr}") from exc
    return result, proc


def ansible_stage_models(inventory: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """playbooks/stage_models.yml from the repo root against `inventory` (a 0600 file: it holds the token)."""
    env = dict(
        os.environ,
        ANSIBLE_CONFIG=str(REPO_ROOT / "ansible.cfg"),
        ANSIBLE_ROLES_PATH=str(REPO_ROOT / "roles"),
        ANSIBLE_NOCOLOR="1",
    )
    return subprocess.run(
        [
            str(Path(sys.executable).parent / "ansible-playbook"),
            "-i",
            str(inventory),
            "playbooks/stage_models.yml",
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )

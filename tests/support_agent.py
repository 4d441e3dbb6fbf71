"""Helpers for the agent tests: a real pool-managerd process fed by the stand-in nvidia-smi.

Only the GPU is faked (files/testing/nvidia-smi-standin replaying a fixture); the agent is the real
program talking HTTP to a real orchestratord.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web
from support import REPO_ROOT, TEST_TOKEN, Daemon, free_port, package_env
from support_nvsmi import real_recordings_dir
from support_tls import relay_to

STANDIN = REPO_ROOT / "files" / "testing" / "nvidia-smi-standin"
FIXTURES = REPO_ROOT / "files" / "testing" / "nvsmi"
MIB = 1024 * 1024


def nvsmi_real() -> Path:
    """The shared real recordings ($LLORCH_NVSMI_REAL, else beside the checkout or its main checkout)."""
    return real_recordings_dir()


def standin_env(fixture: str = "lab-2x-l4", **extra: str) -> dict[str, str]:
    """`fixture`: a name under files/testing/nvsmi, or the absolute path of a fixture directory."""
    return package_env(NVIDIA_SMI_STANDIN_FIXTURE=str(FIXTURES / fixture), **extra)


class ChangingMachine:
    """A private copy of a stand-in fixture whose GPUs' free memory the test changes under a running agent.

    The stand-in reads its fixture afresh at every call, so a rewritten `query-gpu.csv` is what the next
    nvidia-smi call prints. Each rewrite goes to a temporary file renamed over the old one: a probe running
    at that moment reads the old machine or the new one, never half of each. Used memory follows
    (total - reserved - free), as on a real GPU.
    """

    def __init__(self, directory: Path, fixture: str = "lab-2x-l4"):
        shutil.copytree(FIXTURES / fixture, directory)
        self.directory = directory
        self._csv = directory / "query-gpu.csv"

    def set_free_mib(self, gpu_index: int, free_mib: int) -> None:
        rows = list(csv.reader(io.StringIO(self._csv.read_text()), skipinitialspace=True))
        header = [cell.split(" [")[0] for cell in rows[0]]
        column = {name: position for position, name in enumerate(header)}
        (row,) = [row for row in rows[1:] if int(row[column["index"]]) == gpu_index]
        total, reserved = (int(row[column[name]].split()[0]) for name in ("memory.total", "memory.reserved"))
        assert 0 <= free_mib <= total - reserved, (free_mib, total, reserved)
        row[column["memory.free"]] = f"{free_mib} MiB"
        row[column["memory.used"]] = f"{total - reserved - free_mib} MiB"
        temporary = self._csv.with_name(".query-gpu.csv.tmp")
        temporary.write_text("".join(", ".join(cells) + "\n" for cells in rows))
        os.replace(temporary, self._csv)


@dataclass
class AgentProcess:
    """A real pool-managerd started as `python -m pool_managerd --config FILE`."""

    workdir: Path
    config: dict[str, Any]
    fixture: str = "lab-2x-l4"
    proc: subprocess.Popen | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / "pool-managerd.log"

    @property
    def config_path(self) -> Path:
        return self.workdir / "pool-managerd.yml"

    @property
    def models_dir(self) -> Path:
        return Path(self.config["models_dir"])

    def write_config(self) -> None:
        self.config_path.write_text(yaml.safe_dump(self.config))

    def command(self, *extra: str) -> list[str]:
        return [sys.executable, "-m", "pool_managerd", "--config", str(self.config_path), *extra]

    def start(self) -> AgentProcess:
        self.write_config()
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.command(),
            env=standin_env(self.fixture),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
        )
        return self

    def run_once(self, *extra: str, timeout: float = 30) -> subprocess.CompletedProcess:
        """Run the agent to completion (--once, or a setup it refuses) and capture its output."""
        self.write_config()
        return subprocess.run(
            self.command(*extra),
            env=standin_env(self.fixture),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.workdir,
        )

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, signum: int = signal.SIGTERM, timeout: float = 15) -> int:
        assert self.proc is not None
        self.proc.send_signal(signum)
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.running():
            self.proc.kill()
            self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def write_manifest(self, models: dict[str, dict[str, Any]] | str) -> None:
        """Write the manifest atomically, as staging does (a str is written verbatim, e.g. a torn one)."""
        text = models if isinstance(models, str) else json.dumps(models)
        temporary = self.models_dir / ".manifest.json.tmp"
        temporary.write_text(text)
        os.replace(temporary, self.models_dir / "manifest.json")


def make_agent(
    workdir: Path,
    daemon: Daemon | None,
    fixture: str = "lab-2x-l4",
    token: str | None = None,
    **overrides: Any,
) -> AgentProcess:
    """An agent (not started) pointed at `daemon`, with fast test timings and its own models dir."""
    token_file = workdir / "api-token"
    workdir.mkdir(parents=True, exist_ok=True)
    token_file.write_text((token or (daemon.token if daemon else TEST_TOKEN)) + "\n")
    token_file.chmod(0o600)
    models_dir = workdir / "models"
    models_dir.mkdir(exist_ok=True)
    config: dict[str, Any] = {
        "control_url": daemon.url if daemon else "http://127.0.0.1:9",
        "token_file": str(token_file),
        "node_id": "gpu-node-1",
        "address": "http://gpu-node-1.lab:8000",
        "models_dir": str(models_dir),
        # The agent's own credentials stay in the test's folder, never in /var/lib.
        "credential_dir": str(workdir / "credentials"),
        "nvidia_smi": str(STANDIN),
        "request_timeout_s": 2,
        "backoff_initial_s": 0.1,
        "backoff_max_s": 1,
        "gpu_probe_interval_s": 1,
    }
    config.update(overrides)
    return AgentProcess(workdir=workdir, config=config, fixture=fixture)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def registered(request: web.Request) -> web.StreamResponse:
    """The answer of a control plane that takes the registration: heartbeats every 100 ms."""
    body = await request.json()
    return web.json_response(
        {
            "node_id": body["node_id"],
            "status": "registering",
            "heartbeat_interval_ms": 100,
            "node_timeout_ms": 3000,
        }
    )


async def beat_ok(request: web.Request) -> web.StreamResponse:
    return web.json_response({"next_heartbeat_ms": 100, "drain": False})


async def deleted(request: web.Request) -> web.StreamResponse:
    return web.Response(status=204)


@dataclass
class Seen:
    """One request the scripted control plane received."""

    at: float  # time.monotonic()
    method: str
    path: str
    body: bytes


class ScriptedControlPlane:
    """A real HTTP server in a thread of the test process that answers as the test scripts it: a broken,
    hostile or hung control plane for the real agent to face. Assign `register`, `heartbeat` or `deregister`
    (async aiohttp handlers) at any time; every request is recorded in `seen`."""

    def __init__(self) -> None:
        self.register: Handler = registered
        self.heartbeat: Handler = beat_ok
        self.deregister: Handler = deleted
        self.seen: list[Seen] = []
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def requests(self, method: str, kind: str) -> list[Seen]:
        """The requests of one kind: 'register', 'heartbeat' or '' (any path) for `method`."""
        return [s for s in self.seen if s.method == method and s.path.endswith(kind)]

    @property
    def registrations(self) -> list[Seen]:
        return self.requests("POST", "/register")

    @property
    def heartbeats(self) -> list[Seen]:
        return self.requests("POST", "/heartbeat")

    def _route(self, name: str) -> Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            self.seen.append(Seen(time.monotonic(), request.method, request.path, await request.read()))
            return await getattr(self, name)(request)

        return handle

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post("/v2/nodes/register", self._route("register"))
        app.router.add_post("/v2/nodes/{node_id}/heartbeat", self._route("heartbeat"))
        app.router.add_delete("/v2/nodes/{node_id}", self._route("deregister"))
        runner = web.AppRunner(app, shutdown_timeout=0.5)
        self._loop.run_until_complete(runner.setup())
        self._loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self._ready.set()
        self._loop.run_forever()
        # Handlers still running (a hung answer) end here, not as "Task was destroyed" at exit.
        pending = asyncio.all_tasks(self._loop)
        for task in pending:
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self._loop.run_until_complete(runner.cleanup())
        self._loop.close()

    def __enter__(self) -> ScriptedControlPlane:
        self._thread.start()
        assert self._ready.wait(10), "the scripted control plane did not start"
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


# --- TLS: a CA the test makes, and a TLS front that records how each connection opened ---------------------


TLS_HANDSHAKE_RECORD = b"\x16"  # the first byte of every TLS connection (a handshake record)


@dataclass
class Connection:
    """One TCP connection the TLS front accepted."""

    first_byte: bytes  # b"\x16" for TLS; b"P" for a plain-HTTP POST; b"" when nothing came
    handshake_done: bool = False


class TlsFront:
    """A TLS-terminating front on 127.0.0.1 for a plain-HTTP server, with a certificate the test issued
    (orchestratord serves plain HTTP today; this stands where a TLS proxy would). It records how every
    connection opened, so a test can tell that a client spoke nothing but TLS, and whether its handshake
    completed."""

    def __init__(self, upstream_port: int, cert: Path, key: Path):
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.load_cert_chain(cert, key)
        self._upstream_port = upstream_port
        self.connections: list[Connection] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"https://127.0.0.1:{self._listener.getsockname()[1]}"
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._serve, daemon=True)
        self._loop_thread.start()
        threading.Thread(target=self._accept, daemon=True).start()

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()
        # Relays still running end here, not as "Task was destroyed" at exit.
        pending = asyncio.all_tasks(self._loop)
        for task in pending:
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self._loop.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._sniff, args=(client,), daemon=True).start()

    def _sniff(self, client: socket.socket) -> None:
        """Look at the first byte without taking it; only a TLS handshake goes on to the upstream."""
        client.settimeout(5)
        try:
            first = client.recv(1, socket.MSG_PEEK)
        except OSError:
            first = b""
        connection = Connection(first)
        self.connections.append(connection)
        if first != TLS_HANDSHAKE_RECORD:
            client.close()
            return
        client.setblocking(False)
        try:  # the coroutine is made in the loop, so a front closed meanwhile leaves none unawaited
            self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._relay(client, connection)))
        except RuntimeError:  # the loop is closed: the front was closed meanwhile
            client.close()

    async def _relay(self, client: socket.socket, connection: Connection) -> None:
        reader = asyncio.StreamReader()
        protocol = asyncio.StreamReaderProtocol(reader)
        try:
            transport, _ = await self._loop.connect_accepted_socket(
                lambda: protocol, client, ssl=self._context, ssl_handshake_timeout=5
            )
        except (OSError, ssl.SSLError, TimeoutError):  # the client refused our certificate, or gave up
            client.close()
            return
        connection.handshake_done = True
        writer = asyncio.StreamWriter(transport, protocol, reader, self._loop)
        await relay_to(self._upstream_port, reader, writer)

    def close(self) -> None:
        self._listener.close()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop_thread.join(10)

    def __enter__(self) -> TlsFront:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

"""Helpers for the registry-side tests: run Ansible's real CLIs against a real daemon, seed the daemon.

Every Ansible call is a subprocess from the repository root with the repo's ansible.cfg, the way an
operator runs it; the daemon is the real orchestratord from support.make_daemon.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml
from support import REPO_ROOT, Daemon, sample_heartbeat, sample_registration
from support_tls import relay_to, write_self_signed_certificate

VENV_BIN = Path(sys.executable).parent


def ansible_env(daemon: Daemon | None, tmp_path: Path, **extra: str) -> dict[str, str]:
    """Env for an Ansible CLI: the repo config, the registry URL and token, nothing that steers Ansible."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("ANSIBLE_", "LLORCH_")) and name != "PYTHONPATH"
    }
    # An inventory with no hosts, so `localhost` is Ansible's implicit one (same Python, local connection)
    # whatever the lab has generated into the default inventory.
    empty_inventory = tmp_path / "empty-inventory.yml"
    if not empty_inventory.exists():
        empty_inventory.write_text("all: {}\n")
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        ANSIBLE_CONFIG=str(REPO_ROOT / "ansible.cfg"),
        ANSIBLE_INVENTORY=str(empty_inventory),
        ANSIBLE_LOCAL_TEMP=str(tmp_path / "ansible-tmp"),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_DEPRECATION_WARNINGS="0",
    )
    if daemon is not None:
        env.update(LLORCH_URL=daemon.url, LLORCH_API_TOKEN=daemon.token)
    env.update(extra)
    return env


def run(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    """Run an Ansible CLI from the repository root; never raises on a non-zero exit."""
    return subprocess.run(
        [str(VENV_BIN / args[0]), *args[1:]],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def inventory_file(tmp_path: Path, name: str = "nodes", **options: Any) -> Path:
    """A `*.llorch_registry.yml` file with these options (url and token come from the environment)."""
    path = tmp_path / f"{name}.llorch_registry.yml"
    path.write_text(yaml.safe_dump({"plugin": "llorch.kit.llorch_registry", **options}))
    return path


def plain(value: Any) -> Any:
    """`--list` output without Ansible's `{"__ansible_unsafe": ...}` wrappers.

    Ansible 2.19 marks every string an inventory plugin sets as untrusted (never templated) and shows
    that in `--list`; the tests compare the values themselves.
    """
    if isinstance(value, dict):
        if set(value) == {"__ansible_unsafe"}:
            return value["__ansible_unsafe"]
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [plain(item) for item in value]
    return value


def inventory_list(env: dict[str, str], source: Path, *extra: str) -> dict[str, Any]:
    """`ansible-inventory --list`, parsed; fails with Ansible's output when the source did not parse."""
    done = run(["ansible-inventory", "-i", str(source), "--list", *extra], env)
    assert done.returncode == 0, done.stderr
    assert "Unable to parse" not in done.stderr, done.stderr
    return plain(json.loads(done.stdout))


def group_hosts(listing: dict[str, Any], group: str) -> list[str]:
    return sorted(listing.get(group, {}).get("hosts", []))


def run_tasks(env: dict[str, str], tmp_path: Path, tasks: list[dict], *extra: str) -> list[dict[str, Any]]:
    """Run tasks in one localhost play with the json stdout callback; the result of each task, in order."""
    playbook = tmp_path / f"play-{len(list(tmp_path.glob('play-*.yml')))}.yml"
    play = {"name": "Registry test play", "hosts": "localhost", "gather_facts": False, "tasks": tasks}
    playbook.write_text(yaml.safe_dump([play], sort_keys=False))
    done = run(
        ["ansible-playbook", str(playbook), *extra],
        {**env, "ANSIBLE_STDOUT_CALLBACK": "ansible.builtin.json"},
    )
    try:
        report = json.loads(done.stdout)
    except ValueError:
        raise AssertionError(f"no JSON from ansible-playbook:\n{done.stdout}\n{done.stderr}") from None
    return [task["hosts"]["localhost"] for task in report["plays"][0]["tasks"]]


def add_node(
    daemon: Daemon,
    node_id: str,
    models: list[str] | None = None,
    heartbeat: bool = True,
    engines: list[dict[str, Any] | None] | None = None,
    **pool: Any,
) -> dict[str, Any]:
    """Register a node with two pools (and send one heartbeat unless told not to) through the daemon's
    HTTP API; `engines` gives each pool's engine reading in order (support.engine_status), else none."""
    registration = sample_registration(node_id, pools=2)
    answer = daemon.api("POST", "/v2/nodes/register", registration)
    assert answer.status == 200, answer.text
    if heartbeat:
        send_heartbeat(daemon, registration, models, engines=engines, **pool)
    return registration


def send_heartbeat(
    daemon: Daemon,
    registration: dict[str, Any],
    models: list[str] | None = None,
    engines: list[dict[str, Any] | None] | None = None,
    **pool: Any,
):
    node_id = registration["node_id"]
    body = sample_heartbeat(registration, models, **pool)
    for reading, engine in zip(body["pools"], engines or [], strict=False):
        reading["engine"] = engine
    answer = daemon.api("POST", f"/v2/nodes/{node_id}/heartbeat", body)
    assert answer.status == 200, answer.text


def node_record(daemon: Daemon, node_id: str) -> dict[str, Any] | None:
    answer = daemon.api("GET", f"/v2/nodes/{node_id}")
    return answer.body if answer.status == 200 else None


class TlsProxy:
    """A TLS front for a daemon on 127.0.0.1, with a self-signed certificate made for the test.

    orchestratord speaks plain HTTP today; this stands where a TLS-terminating proxy would, so the
    client's certificate checks (validate_certs, ca_path) meet a real handshake.
    """

    def __init__(self, daemon: Daemon, workdir: Path):
        self.cert = workdir / "registry-cert.pem"
        key = workdir / "registry-key.pem"
        write_self_signed_certificate(self.cert, key)
        self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._context.load_cert_chain(self.cert, key)
        self._upstream_port = daemon.config["listen_port"]
        self._loop = asyncio.new_event_loop()
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._relay, "127.0.0.1", 0, ssl=self._context)
        )
        self.url = f"https://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

    async def _relay(self, client_reader, client_writer) -> None:
        await relay_to(self._upstream_port, client_reader, client_writer)

    def close(self) -> None:
        self._server.close()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)


def forward(handler: BaseHTTPRequestHandler, daemon: Daemon) -> None:
    """Pass the handler's request on to `daemon` (token and content type only) and its answer back."""
    length = int(handler.headers.get("Content-Length") or 0)
    request = urllib.request.Request(
        daemon.url + handler.path,
        data=handler.rfile.read(length) if length else None,
        method=handler.command,
        headers={k: v for k, v in handler.headers.items() if k.lower() in ("authorization", "content-type")},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            status, body = answer.status, answer.read()
    except urllib.error.HTTPError as error:
        status, body = error.code, error.read()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


class _ReadHookHandler(BaseHTTPRequestHandler):
    server: ReadHookRelay
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args) -> None:
        pass

    def relay(self) -> None:
        relay = self.server
        if self.command == "GET":
            with relay.lock:
                relay.reads += 1
                hook = relay.hooks.pop(relay.reads, None)
            if hook is not None:
                hook()  # before the read is answered: this read already sees what the hook changed
        forward(self, relay.daemon)

    do_GET = do_POST = do_DELETE = relay


class ReadHookRelay(ThreadingHTTPServer):
    """Relays to a daemon and runs `hooks[n]` when the n-th GET arrives, before answering it.

    A wait that polls the registry then meets a change made while it waits, at a known point (after it
    has seen the old state at least once) and without the test sleeping: `hooks={2: go_online}`.
    """

    daemon_threads = True

    def __init__(self, daemon: Daemon, hooks: dict[int, Any]):
        super().__init__(("127.0.0.1", 0), _ReadHookHandler)
        self.daemon = daemon
        self.hooks = dict(hooks)
        self.reads = 0
        self.lock = threading.Lock()
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def __enter__(self) -> ReadHookRelay:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()
        self.server_close()

"""The llorch_* modules through `ansible` and `ansible-playbook`, against a real orchestratord."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from support import free_port
from support_registry import TlsProxy, add_node, ansible_env, node_record, run, run_tasks

URL_AND_TOKEN_FROM_ENV: dict = {}  # the modules read LLORCH_URL / LLORCH_API_TOKEN themselves


@pytest.fixture
def slow_daemon(daemon_factory):
    """A daemon whose nodes stay online for the whole test, however slow the machine."""
    return daemon_factory(node_timeout_ms=120_000)


def node_task(state: str, check: bool = False, **params) -> dict:
    task = {"llorch.kit.llorch_node": {"node_id": "gpu-a", "state": state, **params}, "diff": True}
    if check:
        task["check_mode"] = True
    return task


READ_GPU_A = {"llorch.kit.llorch_nodes_info": {"node_id": "gpu-a"}}


def test_drain_undrain_and_remove_are_idempotent_and_check_mode_changes_nothing(slow_daemon, tmp_path):
    add_node(slow_daemon, "gpu-a", ["m1"])
    env = ansible_env(slow_daemon, tmp_path)

    results = run_tasks(
        env,
        tmp_path,
        [
            node_task("drained", check=True),
            READ_GPU_A,
            node_task("drained"),
            node_task("drained"),
            node_task("present", check=True),
            READ_GPU_A,
            node_task("present"),
            node_task("present"),
            node_task("absent", check=True),
            READ_GPU_A,
            node_task("absent"),
            node_task("absent"),
        ],
    )
    assert [result.get("failed", False) for result in results] == [False] * 12, results
    (
        drain_check,
        after_drain_check,
        drain,
        drain_again,
        undrain_check,
        after_undrain_check,
        undrain,
        undrain_again,
        remove_check,
        after_remove_check,
        remove,
        remove_again,
    ) = results

    assert drain_check["changed"] and drain_check["node"]["status"] == "draining"
    assert drain_check["diff"]["before"]["state"] == "present"
    assert drain_check["diff"]["after"]["state"] == "drained"
    assert after_drain_check["nodes"][0]["drain"] is False
    assert drain["changed"] and drain["node"]["drain"] is True and drain["node"]["status"] == "draining"
    assert not drain_again["changed"] and drain_again["state_before"] == "drained"

    assert undrain_check["changed"] and after_undrain_check["nodes"][0]["drain"] is True
    assert undrain["changed"] and undrain["node"]["drain"] is False and undrain["node"]["status"] == "online"
    assert not undrain_again["changed"]

    assert remove_check["changed"] and remove_check["node"] == {}
    assert after_remove_check["count"] == 1
    assert remove["changed"] and remove["state_before"] == "present"
    assert not remove_again["changed"] and remove_again["state_before"] == "absent"
    assert node_record(slow_daemon, "gpu-a") is None


def test_drain_wait_fails_with_the_busy_slot_count_and_succeeds_when_idle(slow_daemon, tmp_path):
    # Two pools of four slots, one free in each: six busy.
    add_node(slow_daemon, "gpu-a", ["m1"], slots_free=1)
    add_node(slow_daemon, "gpu-idle", ["m1"])
    env = ansible_env(slow_daemon, tmp_path)

    busy, idle = run_tasks(
        env,
        tmp_path,
        [
            {**node_task("drained", wait=True, wait_timeout=1), "ignore_errors": True},
            {
                "llorch.kit.llorch_node": {
                    "node_id": "gpu-idle",
                    "state": "drained",
                    "wait": True,
                    "wait_timeout": 30,
                }
            },
        ],
    )

    assert busy["failed"]
    assert "node gpu-a still had 6 busy slot(s) after 1 s" in busy["msg"]
    assert node_record(slow_daemon, "gpu-a")["drain"] is True  # the drain itself stays
    assert not idle.get("failed") and idle["changed"] and idle["busy_slots"] == 0


class _RacingHandler(BaseHTTPRequestHandler):
    """Relays to the daemon; before relaying a DELETE it deletes the node itself, like another operator
    whose request lands between the module's read and its delete."""

    server: RacingProxy
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args) -> None:
        pass

    def relay(self) -> None:
        daemon = self.server.daemon
        if self.command == "DELETE":
            assert daemon.api("DELETE", self.path).status in (200, 204)
            self.server.raced.append(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        request = urllib.request.Request(
            daemon.url + self.path,
            data=self.rfile.read(length) if length else None,
            method=self.command,
            headers={k: v for k, v in self.headers.items() if k.lower() in ("authorization", "content-type")},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                status, body = answer.status, answer.read()
        except urllib.error.HTTPError as error:
            status, body = error.code, error.read()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_DELETE = relay


class RacingProxy(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, daemon):
        super().__init__(("127.0.0.1", 0), _RacingHandler)
        self.daemon = daemon
        self.raced: list[str] = []
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.shutdown()
        self.server_close()


def test_absent_reports_no_change_when_the_node_vanished_before_its_delete(slow_daemon, tmp_path):
    add_node(slow_daemon, "gpu-a", ["m1"])
    proxy = RacingProxy(slow_daemon)
    try:
        (removed_by_someone_else,) = run_tasks(
            ansible_env(slow_daemon, tmp_path, LLORCH_URL=proxy.url), tmp_path, [node_task("absent")]
        )
    finally:
        proxy.close()

    assert proxy.raced == ["/v2/nodes/gpu-a"]  # the race did happen: the module's DELETE met a 404
    assert not removed_by_someone_else.get("failed"), removed_by_someone_else
    assert removed_by_someone_else["changed"] is False, removed_by_someone_else
    assert removed_by_someone_else["state_before"] == "present"
    assert removed_by_someone_else["node"] == {}
    assert node_record(slow_daemon, "gpu-a") is None


def test_state_present_for_an_unknown_node_explains_how_nodes_join(slow_daemon, tmp_path):
    done = run(
        ["ansible", "localhost", "-m", "llorch.kit.llorch_node", "-a", "node_id=gpu-nowhere state=drained"],
        ansible_env(slow_daemon, tmp_path),
    )
    assert done.returncode != 0
    assert f"node gpu-nowhere is not registered with {slow_daemon.url}" in done.stdout


def test_nodes_info_filters_by_status_model_and_id_and_summarises(slow_daemon, tmp_path):
    add_node(slow_daemon, "gpu-a", ["m1", "m2"], slots_free=3)
    add_node(slow_daemon, "gpu-b", ["m2"])
    add_node(slow_daemon, "gpu-c", heartbeat=False)
    env = ansible_env(slow_daemon, tmp_path)

    everything, online_m1, registering, unknown = run_tasks(
        env,
        tmp_path,
        [
            {"llorch.kit.llorch_nodes_info": URL_AND_TOKEN_FROM_ENV},
            {"llorch.kit.llorch_nodes_info": {"status": ["online"], "model": "m1"}},
            {"llorch.kit.llorch_nodes_info": {"status": ["registering", "offline"]}},
            {"llorch.kit.llorch_nodes_info": {"node_id": "gpu-zzz"}},
        ],
    )

    assert [node["node_id"] for node in everything["nodes"]] == ["gpu-a", "gpu-b", "gpu-c"]
    assert everything["count"] == 3 and not everything["changed"]
    assert [node["node_id"] for node in online_m1["nodes"]] == ["gpu-a"]
    summary = online_m1["nodes"][0]["summary"]
    assert summary["pools_ready"] == 2 and summary["pools_total"] == 2
    assert summary["slots_free"] == 6 and summary["slots_busy"] == 2
    assert summary["vram_free_bytes"] == 2 * 70 * 1024**3
    assert 0 <= summary["heartbeat_age_s"] < 60
    assert [node["node_id"] for node in registering["nodes"]] == ["gpu-c"]
    assert registering["nodes"][0]["summary"]["heartbeat_age_s"] is None
    assert unknown["nodes"] == [] and unknown["count"] == 0


def test_catalog_info_reports_replicated_and_single_node_models(slow_daemon, tmp_path):
    add_node(slow_daemon, "gpu-a", ["m-shared", "m-alone"])
    add_node(slow_daemon, "gpu-b", ["m-shared"])
    env = ansible_env(slow_daemon, tmp_path)

    catalog, one_model = run_tasks(
        env,
        tmp_path,
        [
            {"llorch.kit.llorch_catalog_info": URL_AND_TOKEN_FROM_ENV},
            {"llorch.kit.llorch_catalog_info": {"model": "m-alone"}},
        ],
    )

    assert catalog["replicated_models"] == ["m-shared"]
    assert catalog["single_node_models"] == ["m-alone"]
    assert catalog["total_models"] == 2
    by_model = {entry["model_id"]: entry for entry in catalog["models"]}
    assert by_model["m-shared"]["replicas"] == 2 and sorted(by_model["m-shared"]["nodes"]) == [
        "gpu-a",
        "gpu-b",
    ]
    assert by_model["m-alone"]["nodes"] == ["gpu-a"]
    assert set(catalog["availability"]) == {"gpu-a", "gpu-b"}
    assert [entry["model_id"] for entry in one_model["models"]] == ["m-alone"]


def test_errors_name_the_registry_and_never_show_the_token(daemon, tmp_path):
    wrong_token = "wrong-token-" + "z" * 40
    dead_url = f"http://127.0.0.1:{free_port()}"
    token_file = tmp_path / "token"
    token_file.write_text(daemon.token + "\n")
    token_file.chmod(0o600)
    env = ansible_env(daemon, tmp_path, LLORCH_WRONG_TOKEN=wrong_token)
    # A socket that takes connections (the kernel's backlog) but never answers: a hung registry.
    silent = socket.create_server(("127.0.0.1", 0), backlog=8)
    silent_url = f"http://127.0.0.1:{silent.getsockname()[1]}"
    with silent:
        # The token reaches the module as a task argument here (the way a vaulted variable does), so the
        # test covers Ansible's censoring of the no_log option, not only the environment fallback.
        results = run_tasks(
            env,
            tmp_path,
            [
                {
                    "llorch.kit.llorch_nodes_info": {"token": "{{ lookup('env', 'LLORCH_WRONG_TOKEN') }}"},
                    "ignore_errors": True,
                },
                {"llorch.kit.llorch_nodes_info": {"url": dead_url}, "ignore_errors": True},
                {
                    "llorch.kit.llorch_nodes_info": {
                        "url": "",
                        "token": "{{ lookup('env', 'LLORCH_API_TOKEN') }}",
                    },
                    "ignore_errors": True,
                },
                {"llorch.kit.llorch_nodes_info": {"token": "", "token_file": str(token_file)}},
                {
                    "llorch.kit.llorch_nodes_info": {"token_file": str(tmp_path / "missing")},
                    "ignore_errors": True,
                },
                {"llorch.kit.llorch_nodes_info": {"url": silent_url, "timeout": 1}, "ignore_errors": True},
            ],
        )
    rejected, unreachable, no_url, from_file, missing_file, hung = results
    assert rejected["msg"] == f"token rejected by {daemon.url} (401)"
    assert unreachable["msg"] == f"cannot reach the registry at {dead_url}: connection refused"
    assert no_url["msg"].startswith("no registry URL")
    assert not from_file.get("failed") and from_file["count"] == 0
    assert hung["msg"] == f"cannot reach the registry at {silent_url}: timed out"
    assert missing_file["msg"].startswith(f"cannot read token_file {tmp_path / 'missing'}")

    verbose = run(
        [
            "ansible",
            "localhost",
            "-vvvv",
            "-m",
            "llorch.kit.llorch_nodes_info",
            "-a",
            "token={{ lookup('env', 'LLORCH_WRONG_TOKEN') }}",
        ],
        env,
    )
    assert "token rejected" in verbose.stdout
    for output in (json.dumps(results), verbose.stdout + verbose.stderr):
        assert wrong_token not in output
        assert daemon.token not in output


class RawTcpServer:
    """A TCP server on 127.0.0.1 that answers every connection with fixed bytes and hangs up: something
    that is not an HTTP server (an SSH port) or one that breaks off mid-answer."""

    def __init__(self, answer: bytes):
        self.answer = answer
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            with conn, contextlib.suppress(OSError):
                conn.settimeout(2)
                conn.sendall(self.answer)  # an SSH server speaks first
                conn.recv(65536)
                conn.sendall(self.answer)

    def close(self) -> None:
        self.sock.close()


def test_a_url_that_does_not_answer_http_gives_the_one_line_reason(daemon, tmp_path):
    servers = {
        "ssh": RawTcpServer(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n"),
        "cut_short": RawTcpServer(
            b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n{"nodes": ['
        ),
        "silent_hangup": RawTcpServer(b""),
    }
    try:
        results = run_tasks(
            ansible_env(daemon, tmp_path),
            tmp_path,
            [
                {"llorch.kit.llorch_nodes_info": {"url": server.url}, "ignore_errors": True}
                for server in servers.values()
            ],
        )
    finally:
        for server in servers.values():
            server.close()

    for (name, server), result in zip(servers.items(), results, strict=True):
        assert result.get("failed") is True, (name, result)
        assert result["msg"].startswith(f"cannot reach the registry at {server.url}: "), (name, result)
        assert "\n" not in result["msg"] and "MODULE FAILURE" not in result["msg"], (name, result)
        assert "Traceback" not in json.dumps(result), (name, result)
        assert "SSH-2.0" not in result["msg"]  # what the other end sent is not echoed
    ssh, cut_short, silent_hangup = (result["msg"] for result in results)
    assert ssh.endswith("the answer is not HTTP (is it really orchestratord?)"), ssh
    assert cut_short.endswith("the answer was cut short"), cut_short
    assert "closed without an answer" in silent_hangup, silent_hangup


def test_ansible_doc_documents_every_module(tmp_path):
    done = run(
        [
            "ansible-doc",
            "--json",
            "-t",
            "module",
            "llorch.kit.llorch_node",
            "llorch.kit.llorch_nodes_info",
            "llorch.kit.llorch_catalog_info",
        ],
        ansible_env(None, tmp_path),
    )
    assert done.returncode == 0, done.stderr
    docs = json.loads(done.stdout)
    for name in ("llorch.kit.llorch_node", "llorch.kit.llorch_nodes_info", "llorch.kit.llorch_catalog_info"):
        assert {"url", "token", "token_file", "validate_certs", "ca_path", "timeout"} <= set(
            docs[name]["doc"]["options"]
        )
        assert docs[name]["examples"] and docs[name]["return"]
    assert docs["llorch.kit.llorch_node"]["doc"]["options"]["state"]["choices"] == [
        "present",
        "drained",
        "absent",
    ]


def test_tls_certificates_are_checked_unless_told_otherwise(slow_daemon, tmp_path):
    add_node(slow_daemon, "gpu-a", ["m1"])
    proxy = TlsProxy(slow_daemon, tmp_path)
    try:
        untrusted, with_ca, unchecked = run_tasks(
            ansible_env(slow_daemon, tmp_path, LLORCH_URL=proxy.url),
            tmp_path,
            [
                {"llorch.kit.llorch_nodes_info": URL_AND_TOKEN_FROM_ENV, "ignore_errors": True},
                {"llorch.kit.llorch_nodes_info": {"ca_path": str(proxy.cert)}},
                {"llorch.kit.llorch_nodes_info": {"validate_certs": False}},
            ],
        )
    finally:
        proxy.close()

    assert untrusted["failed"], untrusted
    assert untrusted["msg"].startswith(
        f"cannot reach the registry at {proxy.url}: TLS certificate not trusted"
    )
    assert [node["node_id"] for node in with_ca["nodes"]] == ["gpu-a"]
    assert [node["node_id"] for node in unchecked["nodes"]] == ["gpu-a"]

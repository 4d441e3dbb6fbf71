"""The llorch_* modules through `ansible` and `ansible-playbook`, against a real orchestratord."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from support import engine_status, free_port, sample_registration
from support_registry import (
    ReadHookRelay,
    TlsProxy,
    add_node,
    ansible_env,
    forward,
    node_record,
    run,
    run_tasks,
    send_heartbeat,
)

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


def test_drain_wait_counts_busy_engines_and_never_waits_on_a_dead_or_loading_one(slow_daemon, tmp_path):
    # gpu-a: a busy engine (4 slots, 1 free) and a dead one whose reading, out of rule, shows 2 busy.
    busy_engine = engine_status("m1", "http://10.89.0.11:8101", "busy")
    add_node(
        slow_daemon, "gpu-a", ["m1"], engines=[busy_engine, engine_status("m1", state="dead")], slots_free=1
    )
    # gpu-down: one engine loading, one dead, both pools reporting slots in use: nothing is in flight.
    down = [engine_status("m1", state="loading"), engine_status("m1", state="dead")]
    add_node(slow_daemon, "gpu-down", ["m1"], engines=down, slots_free=2)
    env = ansible_env(slow_daemon, tmp_path)

    busy, idle = run_tasks(
        env,
        tmp_path,
        [
            {**node_task("drained", wait=True, wait_timeout=1), "ignore_errors": True},
            node_task("drained", wait=True, wait_timeout=30, node_id="gpu-down"),
        ],
    )

    assert busy["failed"]
    assert "node gpu-a still had 3 busy slot(s) after 1 s" in busy["msg"]  # the busy engine's only
    assert not idle.get("failed") and idle["changed"] and idle["busy_slots"] == 0


def test_nodes_info_summarises_engines(slow_daemon, tmp_path):
    add_node(slow_daemon, "gpu-a", ["m1"], engines=[engine_status("m1"), engine_status("m1", state="dead")])
    (info,) = run_tasks(ansible_env(slow_daemon, tmp_path), tmp_path, [READ_GPU_A])
    [node] = info["nodes"]
    assert (node["summary"]["engines_total"], node["summary"]["engines_serving"]) == (2, 1)
    assert node["served"] == ["m1"]
    assert [pool["engine"]["state"] for pool in node["pools"]] == ["ready", "dead"]


def wait_task(node_id: str, **waits) -> dict:
    return {"llorch.kit.llorch_nodes_info": {"node_id": node_id, **waits}, "ignore_errors": True}


def test_nodes_info_waits_for_a_node_that_registers_and_comes_online_during_the_wait(slow_daemon, tmp_path):
    registration = sample_registration("gpu-late", pools=2)

    def register_and_beat() -> None:
        assert slow_daemon.api("POST", "/v2/nodes/register", registration).status == 200
        send_heartbeat(slow_daemon, registration, ["m1"])

    # The first read finds no node (404); the node registers and beats before the second is answered.
    with ReadHookRelay(slow_daemon, {2: register_and_beat}) as relay:
        env = ansible_env(slow_daemon, tmp_path, LLORCH_URL=relay.url)
        (waited,) = run_tasks(env, tmp_path, [wait_task("gpu-late", wait_status=["online"], wait_timeout=60)])
        reads = relay.reads

    assert not waited.get("failed"), waited
    assert waited["count"] == 1 and waited["nodes"][0]["status"] == "online"
    assert reads >= 2


def test_nodes_info_waits_for_models_listed_during_the_wait_also_in_check_mode(slow_daemon, tmp_path):
    registration = add_node(slow_daemon, "gpu-a", ["m1"])
    staged = ["m1", "meta-llama/Llama-3.1-8B-Instruct"]
    with ReadHookRelay(slow_daemon, {2: lambda: send_heartbeat(slow_daemon, registration, staged)}) as relay:
        env = ansible_env(slow_daemon, tmp_path, LLORCH_URL=relay.url)
        task = wait_task("gpu-a", wait_status=["online", "draining"], wait_models=staged, wait_timeout=60)
        (waited,) = run_tasks(env, tmp_path, [{**task, "check_mode": True}])
        reads = relay.reads

    assert not waited.get("failed"), waited
    assert sorted(waited["nodes"][0]["models"]) == sorted(staged)
    assert reads >= 2


def test_nodes_info_wait_returns_at_once_when_the_node_already_matches(slow_daemon, tmp_path):
    add_node(slow_daemon, "gpu-a", ["m1"])
    with ReadHookRelay(slow_daemon, {}) as relay:
        env = ansible_env(slow_daemon, tmp_path, LLORCH_URL=relay.url)
        (waited,) = run_tasks(
            env, tmp_path, [wait_task("gpu-a", wait_status=["online"], wait_models=["m1"], wait_timeout=60)]
        )
        reads = relay.reads
    assert not waited.get("failed") and waited["nodes"][0]["node_id"] == "gpu-a", waited
    assert reads == 1


def test_nodes_info_wait_times_out_saying_what_it_last_saw(slow_daemon, tmp_path):
    add_node(slow_daemon, "gpu-a", ["m1"])
    env = ansible_env(slow_daemon, tmp_path)
    missing_models, unknown_node, no_node_id, negative = run_tasks(
        env,
        tmp_path,
        [
            wait_task("gpu-a", wait_status=["online"], wait_models=["m1", "m2", "m3"], wait_timeout=1),
            wait_task("gpu-never", wait_status=["online"], wait_timeout=1),
            {"llorch.kit.llorch_nodes_info": {"wait_status": ["online"]}, "ignore_errors": True},
            wait_task("gpu-a", wait_status=["online"], wait_timeout=-1),
        ],
    )
    assert missing_models["msg"] == (
        f"node gpu-a did not reach status online and models m1, m2, m3 listed at {slow_daemon.url} "
        "within 1 s; last seen: status online, models not listed: m2, m3"
    )
    assert unknown_node["msg"] == (
        f"node gpu-never did not reach status online at {slow_daemon.url} within 1 s; "
        "last seen: the registry does not know the node"
    )
    assert missing_models["nodes"][0]["models"] == ["m1"]  # the last record seen travels with the failure
    assert unknown_node["nodes"] == [] and unknown_node["count"] == 0
    assert no_node_id["failed"] and "node_id" in no_node_id["msg"] and "wait_status" in no_node_id["msg"]
    assert negative["msg"] == "wait_timeout must be 0 or more seconds, got -1"


def test_present_with_wait_returns_once_the_node_comes_online_during_the_wait(slow_daemon, tmp_path):
    # Registered, never heard from: "registering" until its first heartbeat, as after a fresh start.
    registration = add_node(slow_daemon, "gpu-a", heartbeat=False)
    add_node(slow_daemon, "gpu-quiet", heartbeat=False)
    with ReadHookRelay(slow_daemon, {3: lambda: send_heartbeat(slow_daemon, registration, ["m1"])}) as relay:
        env = ansible_env(slow_daemon, tmp_path, LLORCH_URL=relay.url)
        came_online, stayed_quiet = run_tasks(
            env,
            tmp_path,
            [
                node_task("present", wait=True, wait_timeout=60),
                {
                    **node_task("present", wait=True, wait_timeout=1, node_id="gpu-quiet"),
                    "ignore_errors": True,
                },
            ],
        )

    assert not came_online.get("failed"), came_online
    assert not came_online["changed"] and came_online["node"]["status"] == "online"
    assert stayed_quiet["msg"] == (
        f"node gpu-quiet was not online at {relay.url} after 1 s of waiting; last seen: status registering"
    )


def test_drain_wait_returns_once_the_last_request_finishes_during_the_wait(slow_daemon, tmp_path):
    registration = add_node(slow_daemon, "gpu-a", ["m1"], slots_free=1)
    finish = {3: lambda: send_heartbeat(slow_daemon, registration, ["m1"])}  # every slot free again
    with ReadHookRelay(slow_daemon, finish) as relay:
        env = ansible_env(slow_daemon, tmp_path, LLORCH_URL=relay.url)
        (drained,) = run_tasks(env, tmp_path, [node_task("drained", wait=True, wait_timeout=60)])
        reads = relay.reads

    assert not drained.get("failed"), drained
    assert drained["changed"] and drained["busy_slots"] == 0 and reads >= 3


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
        forward(self, daemon)

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
    # Staged only: no engine serves either model.
    assert [entry["served"] for entry in catalog["models"]] == [False, False]


def test_catalog_info_tells_served_from_staged(slow_daemon, tmp_path):
    url = "http://10.89.0.11:8101"
    add_node(slow_daemon, "gpu-a", ["m-served", "m-staged"], engines=[engine_status("m-served", url)])
    (catalog,) = run_tasks(
        ansible_env(slow_daemon, tmp_path), tmp_path, [{"llorch.kit.llorch_catalog_info": {}}]
    )
    by_model = {entry["model_id"]: entry for entry in catalog["models"]}
    assert by_model["m-served"]["served"] is True and by_model["m-served"]["pools_ready"] == 1
    assert by_model["m-served"]["engines"] == [
        {
            "node_id": "gpu-a",
            "pool_id": "pool-0",
            "kind": "llama.cpp",
            "state": "ready",
            "url": url,
            "serving": True,
        }
    ]
    assert by_model["m-staged"]["served"] is False and by_model["m-staged"]["engines"] == []
    assert catalog["availability"]["gpu-a"]["served"] == ["m-served"]


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


def test_a_token_file_others_could_read_or_swap_is_refused_as_the_services_refuse_it(daemon, tmp_path):
    """The controller reads token_file with the contract's reader: owner-only, no link, UTF-8, not empty."""
    good = tmp_path / "token"
    good.write_text(daemon.token + "\n")
    good.chmod(0o600)
    group_readable = tmp_path / "group-readable"
    group_readable.write_text(daemon.token + "\n")
    group_readable.chmod(0o640)
    world_readable = tmp_path / "world-readable"
    world_readable.write_text(daemon.token + "\n")
    world_readable.chmod(0o604)
    link = tmp_path / "link-to-token"
    link.symlink_to(good)
    not_utf8 = tmp_path / "latin1"
    not_utf8.write_bytes(b"\xe9" * 40 + b"\n")
    not_utf8.chmod(0o600)
    empty = tmp_path / "empty"
    empty.write_text("\n")
    empty.chmod(0o600)
    cases = [good, group_readable, world_readable, link, not_utf8, empty]
    # The env token is right: a refused file must fail the task, never fall back to it.
    env = ansible_env(daemon, tmp_path)
    results = run_tasks(
        env,
        tmp_path,
        [
            {"llorch.kit.llorch_nodes_info": {"token_file": str(path)}, "ignore_errors": True}
            for path in cases
        ],
    )
    by_name = dict(zip([path.name for path in cases], results, strict=True))
    assert not by_name["token"].get("failed") and by_name["token"]["count"] == 0, by_name["token"]
    assert by_name["group-readable"]["msg"] == (
        f"cannot read token_file {group_readable}: readable by group or others (mode 0640): "
        f"run chmod 600 {group_readable}"
    )
    assert "readable by group or others (mode 0604)" in by_name["world-readable"]["msg"]
    assert by_name["link-to-token"]["msg"] == (
        f"cannot read token_file {link}: a symbolic link; name the file itself"
    )
    assert by_name["latin1"]["msg"] == f"cannot read token_file {not_utf8}: not UTF-8 text (at byte 0)"
    assert by_name["empty"]["msg"] == f"cannot read token_file {empty}: empty"
    for result in results:
        assert "Traceback" not in json.dumps(result)
        assert daemon.token not in json.dumps(result)


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


class _EndlessHandler(BaseHTTPRequestHandler):
    """Answers every request with 200 and a body that never ends (no length, closed only by the client)."""

    protocol_version = "HTTP/1.0"

    def log_message(self, format, *args) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        chunk = b" " * (1024 * 1024)
        with contextlib.suppress(OSError):
            while True:
                self.wfile.write(chunk)


def test_an_endless_answer_is_cut_at_the_bound_not_read_into_memory(tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _EndlessHandler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        env = ansible_env(None, tmp_path, LLORCH_URL=url, LLORCH_API_TOKEN="t" * 40)
        (result,) = run_tasks(env, tmp_path, [{"llorch.kit.llorch_nodes_info": {}, "ignore_errors": True}])
    finally:
        server.shutdown()
    assert result["failed"] is True
    assert result["msg"] == (
        f"the registry at {url} answered GET /v2/nodes with more than 134217728 bytes; "
        f"not read (is {url} really orchestratord?)"
    )

"""The control host after converge: orchestratord runs hardened, as its own user, and knows the GPU node."""

import os
import time

import pytest
import testinfra.utils.ansible_runner
from service_checks import (
    assert_hardening_in_effect,
    assert_ip_filtering_in_effect,
    main_process,
    registry_get,
    unit_properties,
)

testinfra_hosts = testinfra.utils.ansible_runner.AnsibleRunner(
    os.environ["MOLECULE_INVENTORY_FILE"]
).get_hosts("control")

TOKEN_FILE = "/etc/llorch/orchestratord.token"


def test_orchestratord_is_enabled_and_running(host):
    service = host.service("orchestratord")
    assert service.is_enabled
    assert service.is_running


def test_orchestratord_runs_as_its_own_unprivileged_user(host):
    user = host.user("orchestratord")
    assert user.exists and user.uid != 0
    assert user.shell in ("/usr/sbin/nologin", "/bin/false")
    assert main_process(host, "orchestratord")["user"] == "orchestratord"


def test_orchestratord_hardening_is_configured_and_in_effect(host):
    props = unit_properties(
        host,
        "orchestratord",
        "NoNewPrivileges",
        "ProtectSystem",
        "ProtectHome",
        "PrivateTmp",
        "Restart",
        "RestartPreventExitStatus",
        "PrivateDevices",
        "ProtectProc",
        "ProcSubset",
        "RemoveIPC",
        "PrivateMounts",
        "MemoryMax",
        "TasksMax",
    )
    assert props == {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "Restart": "on-failure",
        # Exit 2 is "fix the configuration or the database": no restart loop.
        "RestartPreventExitStatus": "2",
        "PrivateDevices": "yes",
        "ProtectProc": "invisible",
        "ProcSubset": "pid",
        "RemoveIPC": "yes",
        "PrivateMounts": "yes",
        "MemoryMax": str(2 * 1024**3),
        "TasksMax": "512",
    }
    process = assert_hardening_in_effect(host, "orchestratord", proc_subset_pid=True)
    # PrivateDevices: its own read-only /dev with the pseudo devices only (no /dev/console, /dev/kmsg, ...).
    assert process["dev_mount_options"].startswith("ro")


def test_orchestratord_talks_only_to_the_inventory_networks(host):
    assert_ip_filtering_in_effect(host, "orchestratord", allowed=("10.89.240.11", 22))


def test_token_file_is_private_to_the_service_user(host):
    token = host.file(TOKEN_FILE)
    assert token.mode == 0o600
    assert token.user == "orchestratord"
    assert len(token.content_string.strip()) >= 32


def test_orchestratord_listens_on_9200_and_is_ready(host):
    assert host.socket("tcp://0.0.0.0:9200").is_listening
    health = host.check_output(
        "python3 -c %s", "import urllib.request as u; print(u.urlopen('http://127.0.0.1:9200/ready').status)"
    )
    assert health.strip() == "200"


def test_the_gpu_node_is_online_in_the_registry(host):
    nodes = registry_get(host, "/v2/nodes", TOKEN_FILE)["nodes"]
    by_id = {node["node_id"]: node for node in nodes}
    assert by_id["molecule-gpu"]["status"] == "online"
    gpus = by_id["molecule-gpu"]["capabilities"]["gpus"]
    assert [gpu["name"] for gpu in gpus] == ["NVIDIA L4", "NVIDIA L4"]


def test_the_gpu_nodes_pool_is_ready_with_its_engine(host):
    # The registry learns the engine's state at the agent's next heartbeat (every 5 s): poll, with a deadline.
    deadline = time.monotonic() + 30
    while True:
        node = registry_get(host, "/v2/nodes/molecule-gpu", TOKEN_FILE)
        pool = {pool["pool_id"]: pool for pool in node["pools"]}["gpus01"]
        if pool["ready"] or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert pool["ready"], pool
    assert (pool["slots_total"], pool["slots_free"]) == (2, 2)
    engine = pool["engine"]
    assert (engine["kind"], engine["state"], engine["model_id"]) == ("llama.cpp", "ready", "llorch-lab/tiny")
    assert engine["url"] == "http://10.89.240.11:8101"


@pytest.mark.parametrize("path", ["/v2/nodes"])
def test_the_registry_refuses_requests_without_the_token(host, path):
    status = host.check_output(
        "python3 -c %s",
        "import urllib.request as u, urllib.error as e\n"
        "try:\n"
        f"    u.urlopen('http://127.0.0.1:9200{path}')\n"
        "except e.HTTPError as err:\n"
        "    print(err.code)",
    )
    assert status.strip() == "401"

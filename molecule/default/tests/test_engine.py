"""The GPU node's engine after converge: llama-server runs as its own user, hardened, healthy, and answers a
chat completion with the node's engine API key, which it never shows in argv."""

import json
import os
import time

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
).get_hosts("gpu_nodes")

POOL = "gpus01"
UNIT = f"llorch-engine@{POOL}"
ENGINE_URL = "http://10.89.240.11:8101"
KEY_FILE = "/etc/pool-managerd/engine-api-key"
# The cluster's admin token, on the control host only: the node holds its own credential, which may not
# read the registry.
CONTROL_TOKEN_FILE = "/etc/llorch/orchestratord.token"

# Run on the node as root: reads the key from its 0600 file (its path in argv, never the key), asks the
# engine, prints the status code and the body. argv: URL, the key file or "-" for none, JSON body or "".
ASK_ENGINE = """
import json, sys, urllib.error, urllib.request
url, key_file, body = sys.argv[1:]
headers = {"Content-Type": "application/json"}
if key_file != "-":
    headers["Authorization"] = "Bearer " + open(key_file).read().strip()
request = urllib.request.Request(url, data=body.encode() or None, headers=headers)
try:
    with urllib.request.urlopen(request, timeout=60) as answer:
        print(answer.status); print(answer.read().decode())
except urllib.error.HTTPError as error:
    print(error.code); print(error.read().decode())
"""


def ask_engine(host, path, use_key=True, body=None):
    out = host.check_output(
        "python3 -c %s %s %s %s",
        ASK_ENGINE,
        ENGINE_URL + path,
        KEY_FILE if use_key else "-",
        json.dumps(body) if body is not None else "",
    )
    status, _, text = out.partition("\n")
    return int(status), text


def test_engine_unit_is_enabled_and_running(host):
    service = host.service(UNIT)
    assert service.is_enabled
    assert service.is_running


def test_engine_runs_as_its_own_user_in_the_models_group_only(host):
    user = host.user("llorch-engine")
    assert user.exists and user.uid != 0
    assert user.shell == "/usr/sbin/nologin"
    assert sorted(user.groups) == ["llorch-engine", "llorch-models"]
    process = main_process(host, UNIT)
    assert process["user"] == "llorch-engine"
    # engine_exec replaced itself with the engine: the unit's main process is llama-server (its command
    # name; /proc/<pid>/exe needs CAP_SYS_PTRACE, which root in the container lacks).
    assert host.check_output("ps -o comm= -p %s", process["pid"]).strip() == "llama-server"


def test_engine_hardening_is_configured_and_in_effect(host):
    props = unit_properties(
        host,
        UNIT,
        "NoNewPrivileges",
        "ProtectSystem",
        "ProtectHome",
        "PrivateTmp",
        "ProtectProc",
        "ProcSubset",
        "DevicePolicy",
        "MemoryDenyWriteExecute",
        "RestrictNamespaces",
        "Restart",
        "RestartPreventExitStatus",
        "StartLimitBurst",
    )
    assert props == {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "ProtectProc": "invisible",
        # A GPU pool: CUDA and NVML read /proc/driver/nvidia.
        "ProcSubset": "all",
        "DevicePolicy": "closed",
        "MemoryDenyWriteExecute": "yes",
        "RestrictNamespaces": "yes",
        "Restart": "on-failure",
        "RestartPreventExitStatus": "2",
        "StartLimitBurst": "5",
    }
    allowed = set(host.check_output("systemctl show %s -p DeviceAllow", UNIT).splitlines())
    # This pool's GPUs (0 and 1) and the driver's shared nodes, nothing of another pool.
    own = {"DeviceAllow=/dev/nvidia0 rw", "DeviceAllow=/dev/nvidia1 rw", "DeviceAllow=/dev/nvidiactl rw"}
    assert own <= allowed
    assert_hardening_in_effect(host, UNIT, proc_subset_pid=False)


def test_engine_talks_only_to_the_inventory_networks(host):
    assert_ip_filtering_in_effect(host, UNIT, allowed=("10.89.240.10", 9200))


def test_engine_sees_only_its_gpus_and_the_key_is_never_in_argv(host):
    pid = main_process(host, UNIT)["pid"]
    environ = host.file(f"/proc/{pid}/environ").content_string.split("\0")
    assert "CUDA_VISIBLE_DEVICES=0,1" in environ
    argv = host.file(f"/proc/{pid}/cmdline").content_string.split("\0")
    key = host.file(KEY_FILE).content_string.strip()
    assert len(key) >= 32
    assert not any(key in arg for arg in argv)
    assert "--api-key-file" in argv and "--api-key" not in argv


def test_engine_key_file_is_root_only(host):
    key = host.file(KEY_FILE)
    assert (key.user, key.group, key.mode) == ("root", "root", 0o600)


def test_engine_is_healthy(host):
    status, _ = ask_engine(host, "/health", use_key=False)
    assert status == 200


def test_engine_answers_a_chat_completion_with_the_key(host):
    body = {"model": "llorch-lab/tiny", "max_tokens": 8, "messages": [{"role": "user", "content": "Hello"}]}
    status, text = ask_engine(host, "/v1/chat/completions", body=body)
    assert status == 200, text
    reply = json.loads(text)
    assert reply["model"] == "llorch-lab/tiny"
    assert reply["usage"]["completion_tokens"] > 0


def test_engine_refuses_a_completion_without_the_key(host):
    body = {"model": "llorch-lab/tiny", "max_tokens": 8, "messages": [{"role": "user", "content": "Hello"}]}
    status, _ = ask_engine(host, "/v1/chat/completions", use_key=False, body=body)
    assert status == 401


def pool_in_registry(host):
    # Asked on the control host with the admin token (the node's own credential may not read the registry).
    control = testinfra.utils.ansible_runner.AnsibleRunner(os.environ["MOLECULE_INVENTORY_FILE"]).get_host(
        "molecule-control"
    )
    node = registry_get(control, "/v2/nodes/molecule-gpu", CONTROL_TOKEN_FILE)
    return {pool["pool_id"]: pool for pool in node["pools"]}[POOL]


def wait_for_pool(host, what, matches, timeout=60):
    deadline = time.monotonic() + timeout
    while True:
        pool = pool_in_registry(host)
        if matches(pool):
            return pool
        assert time.monotonic() < deadline, f"{what}: the registry still shows {pool}"
        time.sleep(0.2)


# Last in this file: it takes the engine down for a few seconds.
def test_a_killed_engine_leaves_the_registry_and_systemd_brings_it_back(host):
    wait_for_pool(host, "pool ready before the kill", lambda pool: pool["ready"])
    killed = main_process(host, UNIT)["pid"]
    host.check_output("kill -9 %s", killed)
    # Dead within one poll of the agent: a change out of serving is sent to the registry at once.
    down = wait_for_pool(host, "pool not ready after kill -9", lambda pool: not pool["ready"], timeout=10)
    assert down["engine"]["state"] in ("dead", "loading"), down
    # Restart=on-failure (RestartSec=2) starts a new engine; the agent, never restarted, sees it serve.
    wait_for_pool(host, "pool ready again after systemd's restart", lambda pool: pool["ready"], timeout=60)
    assert main_process(host, UNIT)["pid"] != killed
    assert int(unit_properties(host, UNIT, "NRestarts")["NRestarts"]) >= 1
    assert host.service("pool-managerd").is_running

"""The GPU node after converge: pool-managerd runs hardened, as its own user, with its own node identity
(joined through the role's join token): no copy of the cluster's admin token, its node and recovery tokens
private to it, and a node credential that may neither drain the node nor read the registry."""

import json
import os
import ssl
import urllib.request
from pathlib import Path

import testinfra.utils.ansible_runner
from service_checks import (
    assert_hardening_in_effect,
    assert_ip_filtering_in_effect,
    main_process,
    unit_properties,
)

testinfra_hosts = testinfra.utils.ansible_runner.AnsibleRunner(
    os.environ["MOLECULE_INVENTORY_FILE"]
).get_hosts("gpu_nodes")

SHARED_TOKEN_FILE = "/etc/llorch/pool-managerd.token"
JOIN_TOKEN_FILE = "/etc/llorch/pool-managerd.join-token"
CREDENTIAL_DIR = "/var/lib/pool-managerd/credentials"
NODE = "molecule-gpu"
# The registry as the controller reaches it (llorch_controller_url), with the scenario's CA and admin token.
PROJECT = Path(os.environ["MOLECULE_PROJECT_DIRECTORY"])
REGISTRY = "https://10.89.240.10:9200"
CA_FILE = PROJECT / ".lab" / "molecule" / "pki" / "ca.crt"
ADMIN_TOKEN_FILE = PROJECT / ".lab" / "molecule" / "api-token"

# Run on the node as root: reads the node token from its file (the path in argv, never the token) and
# prints the status of each request to the registry, the way the agent reaches it.
AS_THE_NODE = """
import json, ssl, sys, urllib.error, urllib.request
token = open(sys.argv[1]).read().splitlines()[0]
context = ssl.create_default_context(cafile="/etc/llorch/tls/ca.crt")
for method, path, body in json.loads(sys.argv[2]):
    request = urllib.request.Request(
        "https://molecule-control:9200" + path, method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as answer:
            print(answer.status)
    except urllib.error.HTTPError as error:
        print(error.code)
"""


def as_admin(path):
    """GET a registry route from this machine with the cluster's admin token (in a header, never argv)."""
    request = urllib.request.Request(
        REGISTRY + path, headers={"Authorization": "Bearer " + ADMIN_TOKEN_FILE.read_text().strip()}
    )
    context = ssl.create_default_context(cafile=str(CA_FILE))
    with urllib.request.urlopen(request, timeout=10, context=context) as answer:
        return json.loads(answer.read())


def test_pool_managerd_is_enabled_and_running(host):
    service = host.service("pool-managerd")
    assert service.is_enabled
    assert service.is_running


def test_pool_managerd_runs_as_its_own_unprivileged_user(host):
    user = host.user("pool-managerd")
    assert user.exists and user.uid != 0
    assert main_process(host, "pool-managerd")["user"] == "pool-managerd"


def test_pool_managerd_hardening_is_configured_and_in_effect(host):
    props = unit_properties(
        host,
        "pool-managerd",
        "NoNewPrivileges",
        "ProtectSystem",
        "ProtectHome",
        "PrivateTmp",
        "RestartPreventExitStatus",
        "DevicePolicy",
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
        "RestartPreventExitStatus": "2",
        "DevicePolicy": "closed",
        "ProtectProc": "invisible",
        # NVML reads /proc/driver/nvidia.
        "ProcSubset": "all",
        "RemoveIPC": "yes",
        "PrivateMounts": "yes",
        "MemoryMax": str(512 * 1024**2),
        "TasksMax": "128",
    }
    allowed = host.check_output("systemctl show pool-managerd -p DeviceAllow").splitlines()
    assert {"DeviceAllow=char-nvidia-frontend rw", "DeviceAllow=char-nvidia-uvm rw"} <= set(allowed)
    assert_hardening_in_effect(host, "pool-managerd", proc_subset_pid=False)


def test_pool_managerd_talks_only_to_the_inventory_networks(host):
    assert_ip_filtering_in_effect(host, "pool-managerd", allowed=("10.89.240.10", 9200))


def test_models_folder_belongs_to_root_and_is_read_only_to_the_agent(host):
    models = host.file("/var/lib/llorch/models")
    assert (models.user, models.group, models.mode) == ("root", "llorch-models", 0o750)
    config = host.file("/etc/systemd/system/pool-managerd.service").content_string
    assert "ReadOnlyPaths=/var/lib/llorch/models" in config
    assert "/var/lib/llorch/models" not in config.split("ReadWritePaths=")[1].splitlines()[0]


def test_the_node_keeps_no_shared_token_and_no_spent_join_token(host):
    assert not host.file(SHARED_TOKEN_FILE).exists
    assert not host.file(JOIN_TOKEN_FILE).exists
    config = host.file("/etc/llorch/pool-managerd.yml").content_string
    assert "token_file: " not in config.replace("join_token_file: ", "")
    assert f'join_token_file: "{JOIN_TOKEN_FILE}"' in config
    assert f'credential_dir: "{CREDENTIAL_DIR}"' in config


def test_the_nodes_own_tokens_are_private_to_the_agent_user(host):
    folder = host.file(CREDENTIAL_DIR)
    assert (folder.user, folder.mode) == ("pool-managerd", 0o700)
    for name in ("node-token", "recovery-token"):
        token = host.file(f"{CREDENTIAL_DIR}/{name}")
        assert (token.user, token.group, token.mode) == ("pool-managerd", "pool-managerd", 0o600), name
    assert host.file(f"{CREDENTIAL_DIR}/node-token").content_string.startswith("lln_")


def test_the_registry_lists_the_node_online_with_its_own_credentials_and_no_join_credential_left():
    assert as_admin(f"/v2/nodes/{NODE}")["status"] == "online"
    names = {item["name"]: item for item in as_admin("/v2/credentials")["credentials"]}
    assert names[f"node/{NODE}"]["node_id"] == NODE and names[f"node/{NODE}"]["usable"]
    assert f"recovery/{NODE}" in names
    # The role revoked the spent join credential once the node was online.
    assert not [name for name in names if name.startswith(f"join-{NODE}-")]


def test_the_nodes_own_credential_may_neither_drain_it_nor_read_the_registry(host):
    requests = [
        ["POST", f"/v2/nodes/{NODE}/drain", {"drain": True}],
        ["GET", "/v2/nodes", None],
        ["GET", f"/v2/nodes/{NODE}", None],
    ]
    statuses = host.check_output(
        "python3 -c %s %s %s", AS_THE_NODE, f"{CREDENTIAL_DIR}/node-token", json.dumps(requests)
    ).split()
    assert statuses == ["403", "403", "403"]
    assert as_admin(f"/v2/nodes/{NODE}")["drain"] is False


def test_the_agent_reaches_the_control_host_by_name_over_https_trusting_the_cluster_ca(host):
    config = host.file("/etc/llorch/pool-managerd.yml").content_string
    assert "https://molecule-control:9200" in config
    assert 'ca_file: "/etc/llorch/tls/ca.crt"' in config
    ca = host.file("/etc/llorch/tls/ca.crt")
    assert (ca.user, ca.group, ca.mode) == ("root", "root", 0o644)
    # From the node, by the name the agent uses: the certificate holds it and the cluster CA signed it.
    status = host.check_output(
        "python3 -c %s",
        "import ssl, urllib.request as u\n"
        "context = ssl.create_default_context(cafile='/etc/llorch/tls/ca.crt')\n"
        "print(u.urlopen('https://molecule-control:9200/health', timeout=5, context=context).status)",
    )
    assert status.strip() == "200"

"""The GPU node after converge: pool-managerd runs hardened, as its own user, with its token kept private."""

import os

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

TOKEN_FILE = "/etc/llorch/pool-managerd.token"


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


def test_token_file_is_private_to_the_agent_user(host):
    token = host.file(TOKEN_FILE)
    assert token.mode == 0o600
    assert token.user == "pool-managerd"


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

"""The GPU node after converge: pool-managerd runs hardened, as its own user, with its token kept private."""

import os

import testinfra.utils.ansible_runner
from service_checks import main_process, unit_properties

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
        host, "pool-managerd", "NoNewPrivileges", "ProtectSystem", "ProtectHome", "PrivateTmp"
    )
    assert props == {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
    }
    process = main_process(host, "pool-managerd")
    assert process["no_new_privs"] == "1"
    assert process["root_mount_options"].startswith("ro")


def test_token_file_is_private_to_the_agent_user(host):
    token = host.file(TOKEN_FILE)
    assert token.mode == 0o600
    assert token.user == "pool-managerd"


def test_the_agent_reaches_the_control_host_by_name(host):
    config = host.file("/etc/llorch/pool-managerd.yml").content_string
    assert "http://molecule-control:9200" in config
    assert host.addr("molecule-control").port(9200).is_reachable

"""The control host after converge: orchestratord runs hardened, as its own user, and knows the GPU node."""

import os
import socket
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import testinfra.utils.ansible_runner
from cryptography import x509
from service_checks import (
    CA_FILE,
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
CERT_FILE = "/etc/llorch/tls/orchestratord.crt"
KEY_FILE = "/etc/llorch/tls/orchestratord.key"
# The scenario's PKI folder on the controller (llorch_pki_dir in molecule.yml).
_PROJECT = Path(os.environ.get("MOLECULE_PROJECT_DIRECTORY", Path(__file__).resolve().parents[3]))
PKI = _PROJECT / ".lab" / "molecule" / "pki"


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


def test_orchestratord_listens_on_9200_and_is_ready_over_https(host):
    assert host.socket("tcp://0.0.0.0:9200").is_listening
    health = host.check_output(
        "python3 -c %s",
        "import ssl, urllib.request as u\n"
        f"context = ssl.create_default_context(cafile={CA_FILE!r})\n"
        "print(u.urlopen('https://127.0.0.1:9200/ready', context=context).status)",
    )
    assert health.strip() == "200"


def _controller_ca() -> x509.Certificate:
    return x509.load_pem_x509_certificate((PKI / "ca.crt").read_bytes())


def test_the_certificate_holds_the_control_hosts_names_and_the_cluster_ca_signed_it(host):
    certificate = x509.load_pem_x509_certificate(host.file(CERT_FILE).content_string.encode())
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(names.get_values_for_type(x509.DNSName)) == {"molecule-control", "localhost"}
    assert {str(a) for a in names.get_values_for_type(x509.IPAddress)} == {"10.89.240.10", "127.0.0.1"}
    # The host's CA is the controller's, and it signed the certificate (raises when it did not).
    assert host.file(CA_FILE).content_string.encode() == (PKI / "ca.crt").read_bytes()
    certificate.verify_directly_issued_by(_controller_ca())


def test_https_from_the_controller_trusting_the_cluster_ca_answers():
    context = ssl.create_default_context(cafile=str(PKI / "ca.crt"))
    with urllib.request.urlopen("https://10.89.240.10:9200/health", timeout=10, context=context) as answer:
        assert answer.status == 200


def test_https_trusting_only_the_system_cas_fails_the_handshake():
    system_cas = ssl.create_default_context()
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        urllib.request.urlopen("https://10.89.240.10:9200/health", timeout=10, context=system_cas)


def test_plain_http_to_the_port_gets_no_http_answer():
    with socket.create_connection(("10.89.240.10", 9200), timeout=10) as conn:
        conn.sendall(b"GET /health HTTP/1.1\r\nHost: 10.89.240.10\r\nConnection: close\r\n\r\n")
        answer = b""
        try:
            while chunk := conn.recv(4096):
                answer += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    assert not answer.startswith(b"HTTP/"), answer[:80]


def test_tls_files_on_the_host_key_private_to_the_service_user(host):
    key = host.file(KEY_FILE)
    assert (key.user, key.group, key.mode) == ("orchestratord", "orchestratord", 0o600)
    for public in (CERT_FILE, CA_FILE):
        assert (host.file(public).user, host.file(public).mode) == ("root", 0o644)
    # The CA key never leaves the controller.
    assert not host.file("/etc/llorch/tls/ca.key").exists
    config = host.file("/etc/llorch/orchestratord.yml").content_string
    assert f'tls_cert_file: "{CERT_FILE}"' in config and f'tls_key_file: "{KEY_FILE}"' in config
    assert "plain_http" not in config


def test_a_reload_keeps_the_process_and_it_serves_on(host):
    unit = host.file("/etc/systemd/system/orchestratord.service").content_string
    assert "ExecReload=/bin/kill -HUP $MAINPID" in unit
    pid_before = host.check_output("systemctl show -p MainPID --value orchestratord")
    host.run_expect([0], "systemctl reload orchestratord")
    deadline = time.monotonic() + 15
    while True:
        ready = host.run(
            "python3 -c %s",
            "import ssl, urllib.request as u\n"
            f"context = ssl.create_default_context(cafile={CA_FILE!r})\n"
            "print(u.urlopen('https://127.0.0.1:9200/ready', context=context).status)",
        )
        if ready.stdout.strip() == "200" or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert ready.stdout.strip() == "200", ready.stderr
    assert host.check_output("systemctl show -p MainPID --value orchestratord") == pid_before


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
        "import ssl, urllib.request as u, urllib.error as e\n"
        f"context = ssl.create_default_context(cafile={CA_FILE!r})\n"
        "try:\n"
        f"    u.urlopen('https://127.0.0.1:9200{path}', context=context)\n"
        "except e.HTTPError as err:\n"
        "    print(err.code)",
    )
    assert status.strip() == "401"

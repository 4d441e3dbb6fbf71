"""Rotation without downtime, the very last check (after test_renewal.py: it replaces the CA itself):
playbooks/rotate_credentials.yml moves both hosts to a new CA and the GPU node to a new token while the agent
heartbeats. Afterwards nothing restarted, the node stayed online, its agent logged no failed heartbeat since
the rotation began, the served certificate chains to the new CA, and the old CA is gone from every host."""

import os
import re
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
import testinfra
import testinfra.utils.ansible_runner
from service_checks import CA_FILE, registry_get

INVENTORY = os.environ["MOLECULE_INVENTORY_FILE"]
testinfra_hosts = testinfra.utils.ansible_runner.AnsibleRunner(INVENTORY).get_hosts("control")

PROJECT = Path(os.environ.get("MOLECULE_PROJECT_DIRECTORY", Path(__file__).resolve().parents[3]))
PKI = PROJECT / ".lab" / "molecule" / "pki"
TOKEN_FILE = "/etc/llorch/orchestratord.token"
ADDRESS = "10.89.240.10"
NODE = "molecule-gpu"
# What the agent logs when a request to the control plane fails (agent.py's _trouble, identity.py).
FAILED = re.compile(
    r"(WARNING|ERROR).*(control plane|token|certificate|ca_file|join)|gave no answer|joined |HTTP 401"
)


def handshake(cafile: Path) -> bytes:
    context = ssl.create_default_context(cafile=str(cafile))
    with (
        socket.create_connection((ADDRESS, 9200), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=ADDRESS) as tls,
    ):
        return tls.getpeercert(binary_form=True)


@pytest.fixture(scope="module")
def rotated(host):
    """Runs the playbook once; the state before it, for the checks."""
    gpu = testinfra.get_host(f"ansible://{NODE}?ansible_inventory={INVENTORY}")
    before = {
        "since": gpu.check_output("date -u '+%Y-%m-%d %H:%M:%S'"),
        "orchestratord": host.check_output("systemctl show -p MainPID --value orchestratord"),
        "pool-managerd": gpu.check_output("systemctl show -p MainPID --value pool-managerd"),
        "old_ca": (PKI / "ca.crt").read_bytes(),
    }
    command = [
        str(Path(sys.executable).with_name("ansible-playbook")),
        "--inventory",
        str(Path(INVENTORY).parent),
        str(PROJECT / "playbooks" / "rotate_credentials.yml"),
    ]
    done = subprocess.run(command, env=dict(os.environ), capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    return gpu, before


def test_nothing_restarted_and_the_node_stayed_online(host, rotated):
    gpu, before = rotated
    assert host.check_output("systemctl show -p MainPID --value orchestratord") == before["orchestratord"]
    assert gpu.check_output("systemctl show -p MainPID --value pool-managerd") == before["pool-managerd"]
    assert registry_get(host, f"/v2/nodes/{NODE}", TOKEN_FILE)["status"] == "online"


def test_the_agent_logged_no_failed_heartbeat_since_the_rotation_began(rotated):
    gpu, before = rotated
    journal = gpu.check_output("journalctl -u pool-managerd --no-pager -o cat --since %s", before["since"])
    assert [line for line in journal.splitlines() if FAILED.search(line)] == [], journal[-3000:]
    assert "node token renewed" in journal and "changed: new connections trust" in journal, journal[-3000:]


def test_the_served_certificate_chains_to_the_new_ca_and_the_old_ca_is_gone(host, rotated):
    gpu, before = rotated
    new_ca = (PKI / "ca.crt").read_bytes()
    assert new_ca != before["old_ca"]
    handshake(PKI / "ca.crt")
    retired = sorted((PKI / "retired").iterdir())[-1]
    assert retired.read_bytes() == before["old_ca"]
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer certificate"):
        handshake(retired)
    for on in (host, gpu):
        assert on.file(CA_FILE).content_string.encode() == new_ca
    assert not (PKI / "next").exists()


def test_old_node_tokens_are_revoked(host, rotated):
    names = [c["name"] for c in registry_get(host, "/v2/credentials", TOKEN_FILE)["credentials"]]
    assert f"node/{NODE}" in names and f"recovery/{NODE}" in names
    assert not [name for name in names if name.endswith("/old")], names

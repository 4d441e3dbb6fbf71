"""Renewal without a restart, the last check (it changes the certificate): renew_certificates.yml re-issues
orchestratord's certificate on the controller, copies it to the control host and reloads the daemon; new
handshakes get the new certificate, and the process is the same."""

import datetime
import json
import os
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import testinfra.utils.ansible_runner
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

testinfra_hosts = testinfra.utils.ansible_runner.AnsibleRunner(
    os.environ["MOLECULE_INVENTORY_FILE"]
).get_hosts("control")

PROJECT = Path(os.environ.get("MOLECULE_PROJECT_DIRECTORY", Path(__file__).resolve().parents[3]))
PKI = PROJECT / ".lab" / "molecule" / "pki"
CERT_FILE = "/etc/llorch/tls/orchestratord.crt"
ADDRESS = "10.89.240.10"


def served_certificate() -> bytes:
    """The DER of the certificate a new handshake gets, trusting the scenario's CA only."""
    context = ssl.create_default_context(cafile=str(PKI / "ca.crt"))
    with (
        socket.create_connection((ADDRESS, 9200), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=ADDRESS) as tls,
    ):
        return tls.getpeercert(binary_form=True)


def run_renewal(*args: str) -> dict:
    env = dict(os.environ, ANSIBLE_STDOUT_CALLBACK="ansible.posix.json")
    command = [
        str(Path(sys.executable).with_name("ansible-playbook")),
        "--inventory",
        str(Path(os.environ["MOLECULE_INVENTORY_FILE"]).parent),
        str(PROJECT / "playbooks" / "renew_certificates.yml"),
        *args,
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout)


def ran(report: dict, task_name: str, host_name: str) -> list[dict]:
    return [
        result
        for play in report["plays"]
        for task in play["tasks"]
        if task["task"]["name"].endswith(task_name)
        for host, result in task["hosts"].items()
        if host == host_name
    ]


def test_renew_certificates_reissues_copies_and_reloads_without_a_restart(host):
    before = served_certificate()
    pid = host.check_output("systemctl show -p MainPID --value orchestratord")

    # Nothing is due: nothing changes, nothing reloads.
    report = run_renewal()
    assert [r for r in ran(report, "Reload orchestratord", "molecule-control") if r.get("changed")] == []
    assert served_certificate() == before

    # Every certificate within 90 days of its end is due now: re-issued (91 days), copied, reloaded.
    report = run_renewal("-e", "llorch_pki_cert_valid_days=91", "-e", "llorch_pki_renew_before_days=90")
    reloads = ran(report, "Reload orchestratord", "molecule-control")
    assert reloads and reloads[0].get("changed"), reloads
    deadline = time.monotonic() + 15
    while (after := served_certificate()) == before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert after != before
    on_host = x509.load_pem_x509_certificate(host.file(CERT_FILE).content_string.encode())
    assert after == on_host.public_bytes(Encoding.DER)
    days = (on_host.not_valid_after_utc - datetime.datetime.now(datetime.UTC)).days
    assert days in (90, 91), days
    assert host.check_output("systemctl show -p MainPID --value orchestratord") == pid

"""The kit's CA on the controller (role llorch_pki) and TLS in the roles' files.

Real ansible-playbook runs on localhost: the PKI role makes the CA once and a server certificate per control
host for its inventory names and addresses, changes nothing on a second run, refuses a folder inside the
inventory, signs with a vault-encrypted CA key without rewriting it; orchestratord's and the agent's configs
are rendered by the roles' own templates and read back with the daemons' own loaders; validate_inventory
holds the lab switch and the URLs together; status.yml prints the days left.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from support import REPO_ROOT, TEST_TOKEN
from support_roles import failures, local_host, render_role, run_playbook

sys.path.insert(0, str(REPO_ROOT / "files" / "orchestratord"))
from orchestratord.config import load_settings as load_daemon_settings

ORCHESTRATORD_ROLE = REPO_ROOT / "roles" / "orchestratord"
AGENT_ROLE = REPO_ROOT / "roles" / "pool_managerd"
ANSIBLE_VAULT = Path(sys.executable).with_name("ansible-vault")

PKI_PLAY = [{"name": "PKI", "hosts": "all", "gather_facts": False, "roles": ["llorch_pki"]}]


def cluster_inventory(pki_dir: Path, **shared: Any) -> dict[str, Any]:
    """One control host (inventory name ctl-1, address 10.20.0.10) and one GPU node, both this machine."""
    return {
        "all": {
            "vars": {
                "llorch_pki_dir": str(pki_dir),
                "llorch_api_token": TEST_TOKEN,
                "llorch_control_url": "https://ctl.example.internal:9200",
                "llorch_controller_url": "https://10.20.0.10:9200",
                **shared,
            },
            "children": {
                "control": {"hosts": {"ctl-1": local_host(ansible_host="10.20.0.10")}},
                "gpu_nodes": {"hosts": {"gpu-1": local_host(ansible_host="10.20.1.11")}},
            },
        }
    }


def changed_tasks(output: dict[str, Any]) -> list[str]:
    return [
        f"{task['task']['name']} on {host}"
        for play in output["plays"]
        for task in play["tasks"]
        for host, result in task["hosts"].items()
        if result.get("changed")
    ]


def certificate(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def names_of(cert: x509.Certificate) -> tuple[set[str], set[str]]:
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(sans.get_values_for_type(x509.DNSName)), {
        str(a) for a in sans.get_values_for_type(x509.IPAddress)
    }


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


@pytest.fixture
def pki_dir(tmp_path: Path) -> Path:
    # Beside the test's folder, not in it: tmp_path holds the inventory (hosts.yml), where a PKI is refused.
    return tmp_path.parent / f"{tmp_path.name}-pki"


def test_the_ca_is_made_once_and_each_control_host_gets_a_certificate_for_its_names(tmp_path, pki_dir):
    pin_file = tmp_path / "pin"
    pin = {
        "ansible.builtin.copy": {
            "content": "{{ llorch_pki_ca_sha256 }}",
            "dest": str(pin_file),
            "mode": "0600",
        }
    }
    play = [{**PKI_PLAY[0], "tasks": [{**pin, "run_once": True}]}]
    rc, output = run_playbook(tmp_path, play, cluster_inventory(pki_dir))
    assert rc == 0, failures(output)
    # The pin join tokens carry: sha256 of the CA certificate's DER.
    der = certificate(pki_dir / "ca.crt").public_bytes(Encoding.DER)
    assert pin_file.read_text() == hashlib.sha256(der).hexdigest()

    ca = certificate(pki_dir / "ca.crt")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert mode(pki_dir) == 0o700 and mode(pki_dir / "ca.key") == 0o600
    server = certificate(pki_dir / "ctl-1" / "server.crt")
    server.verify_directly_issued_by(ca)
    # The inventory name, the address Ansible uses, both URLs' hosts, loopback for the readiness check.
    assert names_of(server) == ({"ctl-1", "ctl.example.internal", "localhost"}, {"10.20.0.10", "127.0.0.1"})
    assert mode(pki_dir / "ctl-1") == 0o700 and mode(pki_dir / "ctl-1" / "server.key") == 0o600
    # The GPU node was in the play too, but serves nothing: no certificate for it.
    assert not (pki_dir / "gpu-1").exists()

    files = {path: path.read_bytes() for path in pki_dir.rglob("*") if path.is_file()}
    rc, output = run_playbook(tmp_path, PKI_PLAY, cluster_inventory(pki_dir))
    assert rc == 0, failures(output)
    assert changed_tasks(output) == []
    assert {path: path.read_bytes() for path in pki_dir.rglob("*") if path.is_file()} == files


def test_other_names_re_issue_the_certificate_with_the_same_ca(tmp_path, pki_dir):
    rc, output = run_playbook(tmp_path, PKI_PLAY, cluster_inventory(pki_dir))
    assert rc == 0, failures(output)
    ca_bytes = (pki_dir / "ca.crt").read_bytes()

    inventory = cluster_inventory(pki_dir, llorch_pki_server_extra_names=["llorch.example.com", "10.20.0.99"])
    rc, output = run_playbook(tmp_path, PKI_PLAY, inventory)
    assert rc == 0, failures(output)
    assert [name for name in changed_tasks(output) if "server certificate" in name] != []
    server = certificate(pki_dir / "ctl-1" / "server.crt")
    assert names_of(server) == (
        {"ctl-1", "ctl.example.internal", "llorch.example.com"},
        {"10.20.0.10", "10.20.0.99"},
    )
    assert (pki_dir / "ca.crt").read_bytes() == ca_bytes
    server.verify_directly_issued_by(certificate(pki_dir / "ca.crt"))


def test_a_certificate_within_the_renewal_margin_is_re_issued_and_the_ca_kept(tmp_path, pki_dir):
    # Issued for 2 days, then a run with the defaults (90 days, renew 30 days before the end) finds it due.
    short = cluster_inventory(pki_dir, llorch_pki_cert_valid_days=2, llorch_pki_renew_before_days=1)
    rc, output = run_playbook(tmp_path, PKI_PLAY, short)
    assert rc == 0, failures(output)
    first = certificate(pki_dir / "ctl-1" / "server.crt")
    ca_bytes = (pki_dir / "ca.crt").read_bytes()

    rc, output = run_playbook(tmp_path, PKI_PLAY, cluster_inventory(pki_dir))
    assert rc == 0, failures(output)
    assert changed_tasks(output) == ["llorch_pki : Issue or renew the server certificate of ctl-1 on ctl-1"]
    renewed = certificate(pki_dir / "ctl-1" / "server.crt")
    assert renewed.serial_number != first.serial_number
    assert (renewed.not_valid_after_utc - renewed.not_valid_before_utc).days in (89, 90)
    assert (pki_dir / "ca.crt").read_bytes() == ca_bytes
    renewed.verify_directly_issued_by(certificate(pki_dir / "ca.crt"))


def test_a_pki_folder_inside_the_inventory_folder_is_refused_before_anything_is_made(tmp_path):
    inside = tmp_path / "pki"
    rc, output = run_playbook(tmp_path, PKI_PLAY, cluster_inventory(inside))
    assert rc != 0
    (message,) = set(failures(output).values())
    assert message.startswith(f"llorch_pki_dir ({inside}) lies inside the inventory folder"), message
    assert "default: ~/.local/share/llorch-kit/pki" in message
    assert not inside.exists()


def test_a_vault_encrypted_ca_key_signs_without_being_rewritten_and_leaves_no_clear_copy(tmp_path, pki_dir):
    rc, output = run_playbook(tmp_path, PKI_PLAY, cluster_inventory(pki_dir))
    assert rc == 0, failures(output)
    password_file = tmp_path / "vault-password"
    password_file.write_text("a vault password for the test\n")
    password_file.chmod(0o600)
    clear_key = (pki_dir / "ca.key").read_bytes()
    subprocess.run(
        [str(ANSIBLE_VAULT), "encrypt", "--vault-password-file", str(password_file), str(pki_dir / "ca.key")],
        check=True,
        capture_output=True,
    )
    vaulted = (pki_dir / "ca.key").read_bytes()
    assert vaulted.startswith(b"$ANSIBLE_VAULT;")
    # Other names: the server certificate must be signed again, with the vaulted key.
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    inventory = cluster_inventory(pki_dir, llorch_pki_server_extra_names=["llorch.example.com"])
    env = {"ANSIBLE_VAULT_PASSWORD_FILE": str(password_file), "TMPDIR": str(scratch)}
    rc, output = run_playbook(tmp_path, PKI_PLAY, inventory, env=env)
    assert rc == 0, failures(output)

    server = certificate(pki_dir / "ctl-1" / "server.crt")
    assert "llorch.example.com" in names_of(server)[0]
    server.verify_directly_issued_by(certificate(pki_dir / "ca.crt"))
    assert (pki_dir / "ca.key").read_bytes() == vaulted
    # The decrypted copy's folder is gone, and the key never showed in the output.
    assert list(scratch.glob("llorch-pki-*")) == []
    clear_body = b"".join(clear_key.splitlines()[1:-1]).decode()
    assert clear_body[:40] not in str(output)


def _render(tmp_path: Path, role: Path, template: str, facts: list[str], host_vars: dict[str, Any]) -> dict:
    """The role's template rendered with its defaults (as group vars) and vars, plus the named internal
    variables as JSON: {"config": path, name: value}."""
    shared = {"llorch_api_token": TEST_TOKEN, "llorch_pki_dir": "/home/op/pki"}
    return render_role(tmp_path, role.name, template, tuple(facts), "ctl-1", shared, host_vars)


def test_orchestratord_config_names_the_tls_files_and_the_role_copies_them_from_the_pki(tmp_path):
    rendered = _render(
        tmp_path,
        ORCHESTRATORD_ROLE,
        "orchestratord.yml.j2",
        ["_orchestratord_tls_files", "_orchestratord_folders"],
        {},
    )
    values = yaml.safe_load(rendered["config"].read_text())
    assert (values["tls_cert_file"], values["tls_key_file"], values["tls_ca_file"]) == (
        "/etc/llorch/tls/orchestratord.crt",
        "/etc/llorch/tls/orchestratord.key",
        "/etc/llorch/tls/ca.crt",
    )
    assert "plain_http" not in values
    copies = {item["path"]: item for item in rendered["_orchestratord_tls_files"]}
    assert copies["/etc/llorch/tls/orchestratord.key"] == {
        "src": "/home/op/pki/ctl-1/server.key",
        "path": "/etc/llorch/tls/orchestratord.key",
        "owner": "orchestratord",
        "group": "orchestratord",
        "mode": "0600",
    }
    assert copies["/etc/llorch/tls/orchestratord.crt"]["src"] == "/home/op/pki/ctl-1/server.crt"
    assert copies["/etc/llorch/tls/ca.crt"]["src"] == "/home/op/pki/ca.crt"
    assert {"path": "/etc/llorch/tls", "owner": "root", "group": "root", "mode": "0755"} in rendered[
        "_orchestratord_folders"
    ]


def test_orchestratord_config_with_the_lab_switch_is_plain_http_and_copies_nothing(tmp_path):
    rendered = _render(
        tmp_path,
        ORCHESTRATORD_ROLE,
        "orchestratord.yml.j2",
        ["_orchestratord_tls_files"],
        {"orchestratord_plain_http": True},
    )
    settings = load_daemon_settings(rendered["config"], environ={})
    assert settings.plain_http is True and settings.tls_cert_file is None and settings.tls_key_file is None
    assert rendered["_orchestratord_tls_files"] == []


def test_orchestratord_tls_config_reads_back_through_the_daemons_loader(tmp_path):
    # The daemon checks that the files exist and are safe: point the role's paths at real ones.
    from support_tls import write_ca, write_server_certificate

    ca = write_ca(tmp_path / "ca.crt")
    write_server_certificate(ca, tmp_path / "server.crt", tmp_path / "server.key")
    rendered = _render(
        tmp_path,
        ORCHESTRATORD_ROLE,
        "orchestratord.yml.j2",
        [],
        {
            "orchestratord_tls_cert_file": str(tmp_path / "server.crt"),
            "orchestratord_tls_key_file": str(tmp_path / "server.key"),
            "orchestratord_tls_ca_file": str(tmp_path / "ca.crt"),
        },
    )
    settings = load_daemon_settings(rendered["config"], environ={})
    assert settings.plain_http is False
    assert (settings.tls_cert_file, settings.tls_key_file, settings.tls_ca_file) == (
        str(tmp_path / "server.crt"),
        str(tmp_path / "server.key"),
        str(tmp_path / "ca.crt"),
    )


AGENT_VARS = {"pool_managerd_pools": [], "llorch_engine_config_dir": "/etc/pool-managerd"}


@pytest.mark.parametrize(
    ("url", "ca_file", "copied"),
    [
        ("https://ctl-1:9200", "/etc/llorch/tls/ca.crt", "/home/op/pki/ca.crt"),
        ("http://ctl-1:9200", None, None),
    ],
)
def test_the_agent_trusts_the_cluster_ca_for_an_https_control_url(tmp_path, url, ca_file, copied):
    rendered = _render(
        tmp_path,
        AGENT_ROLE,
        "pool-managerd.yml.j2",
        ["_pool_managerd_tls_files"],
        {**AGENT_VARS, "llorch_control_url": url},
    )
    values = yaml.safe_load(rendered["config"].read_text())
    assert values["control_url"] == url
    assert values.get("ca_file") == ca_file
    assert [item["src"] for item in rendered["_pool_managerd_tls_files"]] == ([copied] if copied else [])
    if ca_file:
        assert rendered["_pool_managerd_tls_files"][0]["mode"] == "0644"


def test_a_ca_bundle_named_by_the_inventory_is_used_and_nothing_is_copied(tmp_path):
    rendered = _render(
        tmp_path,
        AGENT_ROLE,
        "pool-managerd.yml.j2",
        ["_pool_managerd_tls_files"],
        {
            **AGENT_VARS,
            "llorch_control_url": "https://ctl-1:9200",
            "llorch_control_ca_file": "/usr/local/share/ca-certificates/company.crt",
        },
    )
    assert (
        yaml.safe_load(rendered["config"].read_text())["ca_file"]
        == "/usr/local/share/ca-certificates/company.crt"
    )
    assert rendered["_pool_managerd_tls_files"] == []


VALIDATE = [{"name": "Validate", "hosts": "all", "gather_facts": False, "roles": ["validate_inventory"]}]


@pytest.mark.parametrize(
    ("plain_http", "urls", "expected"),
    [
        (None, {"llorch_control_url": "https://ctl:9200"}, None),
        (True, {"llorch_control_url": "http://ctl:9200"}, None),
        (
            None,
            {"llorch_control_url": "http://ctl:9200"},
            "llorch_control_url is 'http://ctl:9200' but orchestratord serves HTTPS "
            "(orchestratord_plain_http is false)",
        ),
        (
            False,
            {"llorch_control_url": "https://ctl:9200", "llorch_controller_url": "http://10.0.0.1:9200"},
            "llorch_controller_url is 'http://10.0.0.1:9200' but orchestratord serves HTTPS",
        ),
        (
            True,
            {"llorch_control_url": "https://ctl:9200"},
            "orchestratord serves HTTP (orchestratord_plain_http: true, the lab switch)",
        ),
        (
            None,
            {
                "llorch_control_url": "https://ctl:9200",
                "llorch_control_urls": ["https://a:9200", "http://b:9200"],
            },
            "llorch_control_urls[1] is 'http://b:9200'",
        ),
        (
            "sometimes",
            {"llorch_control_url": "https://ctl:9200"},
            'orchestratord_plain_http of ctl is "sometimes"',
        ),
    ],
)
def test_validate_inventory_holds_the_lab_switch_and_the_urls_together(tmp_path, plain_http, urls, expected):
    control = local_host(**({} if plain_http is None else {"orchestratord_plain_http": plain_http}))
    inventory = {
        "all": {
            "vars": {"llorch_api_token": TEST_TOKEN, **urls},
            "children": {
                "control": {"hosts": {"ctl": control}},
                "gpu_nodes": {"hosts": {"gpu-1": local_host()}},
            },
        }
    }
    rc, output = run_playbook(tmp_path, VALIDATE, inventory)
    message = " ".join(failures(output).values())
    if expected is None:
        assert rc == 0, message
    else:
        assert rc != 0 and expected in message, message


def test_status_prints_the_days_left_and_warns_below_the_threshold(tmp_path, pki_dir):
    rc, output = run_playbook(tmp_path, PKI_PLAY, cluster_inventory(pki_dir))
    assert rc == 0, failures(output)
    # Nothing answers at this URL: the certificates are read and shown before the registry is asked.
    inventory = cluster_inventory(
        pki_dir,
        llorch_controller_url="https://127.0.0.1:9",
        llorch_pki_warn_days=365,
        ansible_python_interpreter=sys.executable,
    )
    status = [{"ansible.builtin.import_playbook": str(REPO_ROOT / "playbooks" / "status.yml")}]
    _, output = run_playbook(tmp_path, status, inventory)
    shown = [
        result["msg"]
        for play in output["plays"]
        for task in play["tasks"]
        if task["task"]["name"] == "Show the days left of the cluster's certificates"
        for result in task["hosts"].values()
    ]
    assert len(shown) == 1, output
    lines = shown[0]
    assert len(lines) == 2
    ca_line, server_line = lines
    # The CA (3650 days) is above the threshold; the server certificate (90 days) is below it.
    assert ca_line.startswith("cluster CA: 36") and " days left (until " in ca_line, ca_line
    assert re.match(r"WARNING: orchestratord on ctl-1: (89|90) days left \(until ", server_line), server_line
    assert server_line.endswith("fewer than 365: run playbooks/renew_certificates.yml"), server_line

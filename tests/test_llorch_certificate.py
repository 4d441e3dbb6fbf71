"""llorch.kit.llorch_certificate through real ansible-playbook runs on localhost: the cluster CA, server
certificates it signs (served by a real HTTPS orchestratord), renewal, re-issue on new names or another CA,
state=info and check mode that write nothing."""

from __future__ import annotations

import hashlib
import socket
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from support import make_daemon
from support_registry import ansible_env, run_tasks
from support_tls import TlsDaemon


@pytest.fixture
def pki(tmp_path) -> Path:
    return tmp_path / "pki"


def ca_task(pki: Path, **options) -> dict:
    return {
        "llorch.kit.llorch_certificate": {
            "kind": "ca",
            "path": str(pki / "ca.crt"),
            "private_key_path": str(pki / "ca.key"),
            **options,
        }
    }


def server_task(pki: Path, host: str = "control-1", ca: str = "ca", **options) -> dict:
    return {
        "llorch.kit.llorch_certificate": {
            "kind": "server",
            "path": str(pki / host / "server.crt"),
            "private_key_path": str(pki / host / "server.key"),
            "ca_path": str(pki / f"{ca}.crt"),
            "ca_private_key_path": str(pki / f"{ca}.key"),
            "dns_names": ["llorch-control.lab"],
            "ip_addresses": ["127.0.0.1"],
            **options,
        }
    }


def checked(task: dict) -> dict:
    return {**task, "check_mode": True}


def play(tmp_path: Path, *tasks: dict) -> list[dict]:
    results = run_tasks(ansible_env(None, tmp_path), tmp_path, list(tasks))
    for result in results:
        assert "exception" not in result, result
    return results


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under `folder` with its mode and bytes (an empty dict for a missing folder)."""
    return (
        {
            str(path.relative_to(folder)): (stat.S_IMODE(path.stat().st_mode), path.read_bytes())
            for path in sorted(folder.rglob("*"))
            if path.is_file()
        }
        if folder.exists()
        else {}
    )


def certificate(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_the_ca_is_made_once_with_an_owner_only_key_and_its_pin(pki, tmp_path):
    first, second = play(tmp_path, ca_task(pki), ca_task(pki))
    assert first["changed"] and first["reason"] == "missing", first
    assert not second["changed"] and second["reason"] == "none", second
    assert stat.S_IMODE((pki / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE(pki.stat().st_mode) == 0o700
    ca = certificate(pki / "ca.crt")
    assert (
        second["sha256"] == hashlib.sha256(ssl.PEM_cert_to_DER_cert((pki / "ca.crt").read_text())).hexdigest()
    )
    assert second["serial"] == format(ca.serial_number, "x") == first["serial"]
    assert 3649 <= second["days_left"] <= 3650
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert "PRIVATE KEY" not in str(first) + str(second)


def test_a_server_certificate_it_signs_is_served_by_orchestratord_and_verified_by_name(pki, tmp_path):
    _, issued, again = play(tmp_path, ca_task(pki), server_task(pki), server_task(pki))
    assert issued["changed"] and issued["reason"] == "missing", issued
    assert not again["changed"] and again["reason"] == "none"
    assert stat.S_IMODE((pki / "control-1" / "server.key").stat().st_mode) == 0o600
    assert 89 <= issued["days_left"] <= 90
    # A real HTTPS daemon with these files; a client trusting only the CA verifies it by its DNS name.
    plain = make_daemon(tmp_path / "daemon")
    config = {key: value for key, value in plain.config.items() if key != "plain_http"}
    config.update(
        tls_cert_file=str(pki / "control-1" / "server.crt"),
        tls_key_file=str(pki / "control-1" / "server.key"),
        tls_ca_file=str(pki / "ca.crt"),
    )
    daemon = TlsDaemon(workdir=plain.workdir, config=config, ca_file=pki / "ca.crt").start()
    try:
        client = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        with (
            socket.create_connection(("127.0.0.1", config["listen_port"]), timeout=5) as raw,
            client.wrap_socket(raw, server_hostname="llorch-control.lab") as tls,
        ):
            served = tls.getpeercert()
        assert ("DNS", "llorch-control.lab") in served["subjectAltName"]
        assert ("IP Address", "127.0.0.1") in served["subjectAltName"]
        assert daemon.api("GET", "/health", token=None).status == 200
    finally:
        daemon.stop()


def test_renewal_when_fewer_days_are_left_than_renew_before_days(pki, tmp_path):
    _, issued, kept = play(
        tmp_path,
        ca_task(pki),
        server_task(pki, valid_days=10, renew_before_days=5),
        server_task(pki, valid_days=10, renew_before_days=5),
    )
    assert issued["changed"] and 9 <= issued["days_left"] <= 10
    assert not kept["changed"] and kept["serial"] == issued["serial"]
    key_before = (pki / "control-1" / "server.key").read_bytes()
    # Fewer than 11 days left now: issued again, for the new valid_days, with a new key.
    (renewed,) = play(tmp_path, server_task(pki, valid_days=30, renew_before_days=11))
    assert renewed["changed"] and renewed["reason"] == "expiring", renewed
    assert renewed["serial"] != issued["serial"] and 29 <= renewed["days_left"] <= 30
    assert (pki / "control-1" / "server.key").read_bytes() != key_before
    assert stat.S_IMODE((pki / "control-1" / "server.key").stat().st_mode) == 0o600


def test_new_names_or_another_ca_issue_again(pki, tmp_path):
    _, first, renamed, same = play(
        tmp_path,
        ca_task(pki),
        server_task(pki),
        server_task(pki, dns_names=["llorch-control.lab", "control.example"]),
        server_task(pki, dns_names=["control.example", "LLORCH-control.lab"]),
    )
    assert renamed["changed"] and renamed["reason"] == "names_changed", renamed
    assert not same["changed"], same  # order and case of the names do not matter
    names = (
        certificate(pki / "control-1" / "server.crt")
        .extensions.get_extension_for_class(x509.SubjectAlternativeName)
        .value.get_values_for_type(x509.DNSName)
    )
    assert sorted(names) == ["control.example", "llorch-control.lab"]
    (other_ca, moved) = play(
        tmp_path,
        ca_task(pki, path=str(pki / "ca2.crt"), private_key_path=str(pki / "ca2.key"), common_name="CA two"),
        server_task(pki, ca="ca2", dns_names=["llorch-control.lab", "control.example"]),
    )
    assert other_ca["changed"] and moved["changed"] and moved["reason"] == "other_ca", moved
    assert certificate(pki / "control-1" / "server.crt").issuer == certificate(pki / "ca2.crt").subject
    assert first["serial"] != moved["serial"]


def test_state_info_and_check_mode_write_nothing(pki, tmp_path):
    missing_info, would_make_ca = play(
        tmp_path,
        {"llorch.kit.llorch_certificate": {"kind": "ca", "path": str(pki / "ca.crt"), "state": "info"}},
        checked(ca_task(pki)),
    )
    assert not missing_info["changed"] and missing_info["reason"] == "missing"
    assert missing_info["days_left"] is None
    assert would_make_ca["changed"] and would_make_ca["reason"] == "missing"
    assert not pki.exists()  # not even the folder

    play(tmp_path, ca_task(pki), server_task(pki))
    before = snapshot(pki)
    info, info_check, would_renew, would_rename = play(
        tmp_path,
        {
            "llorch.kit.llorch_certificate": {
                "kind": "server",
                "path": str(pki / "control-1" / "server.crt"),
                "state": "info",
                "renew_before_days": 60,
            }
        },
        checked(
            {"llorch.kit.llorch_certificate": {"kind": "ca", "path": str(pki / "ca.crt"), "state": "info"}}
        ),
        checked(server_task(pki, renew_before_days=95, valid_days=100)),
        checked(server_task(pki, dns_names=["elsewhere.lab"])),
    )
    assert not info["changed"] and info["reason"] == "none" and 89 <= info["days_left"] <= 90
    assert not info_check["changed"] and info_check["days_left"] >= 3649
    assert would_renew["changed"] and would_renew["reason"] == "expiring"
    assert would_rename["changed"] and would_rename["reason"] == "names_changed"
    assert snapshot(pki) == before


def test_a_linked_key_or_a_folder_open_to_others_is_refused(pki, tmp_path):
    play(tmp_path, ca_task(pki))
    (tmp_path / "elsewhere").mkdir()
    (pki / "linked").mkdir(mode=0o700)
    (pki / "linked" / "server.key").symlink_to(tmp_path / "elsewhere" / "target.key")
    open_folder = tmp_path / "open"
    open_folder.mkdir(mode=0o755)
    open_folder.chmod(0o755)
    linked, shared = run_tasks(
        ansible_env(None, tmp_path),
        tmp_path,
        [
            {**server_task(pki, host="linked"), "ignore_errors": True},
            {
                **server_task(pki, private_key_path=str(open_folder / "server.key")),
                "ignore_errors": True,
            },
        ],
    )
    assert linked["failed"] and "is a symbolic link" in linked["msg"], linked
    assert not (tmp_path / "elsewhere" / "target.key").exists()
    assert shared["failed"] and f"run chmod 700 {open_folder}" in shared["msg"], shared
    assert not (open_folder / "server.key").exists()

"""orchestratord serves HTTPS itself: the choice of HTTPS or plain HTTP, the key read safely, a renewed
certificate taken on SIGHUP without a restart, expiry in /metrics, and clients that verify it."""

from __future__ import annotations

import datetime
import http.client
import signal
import socket
import ssl
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from support import sample_registration, wait_until
from support_daemon import run_daemon_once, write_yaml
from support_tls import TlsDaemon, make_tls_daemon, write_ca, write_server_certificate

CHOOSE = (
    "orchestratord: orchestratord serves HTTPS: set tls_cert_file and tls_key_file, "
    "or plain_http: true (labs and tests only)"
)


@pytest.fixture
def tls_daemons(tmp_path) -> Iterator:
    """Start HTTPS daemons: `tls_daemons(name, ca=None, **config overrides)`."""
    started: list[TlsDaemon] = []

    def start(name: str = "orchestratord", ca=None, **overrides) -> TlsDaemon:
        daemon = make_tls_daemon(tmp_path / name, ca, **overrides).start()
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


def refused(result) -> str:
    """Exit 2 with one line on stderr and no traceback; returns that line."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def start_refused(tmp_path: Path, **overrides) -> str:
    """The one line with which a daemon with these TLS settings refuses to start."""
    daemon = make_tls_daemon(tmp_path / "refused")
    config = {**daemon.config, **overrides}
    config = {key: value for key, value in config.items() if value is not None}
    return refused(run_daemon_once(write_yaml(tmp_path / "c.yml", config)))


def served_certificate(daemon: TlsDaemon) -> bytes:
    """The DER of the certificate a new connection to the daemon is given."""
    with (
        socket.create_connection(("127.0.0.1", daemon.config["listen_port"]), timeout=5) as raw,
        daemon.client_context().wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        return tls.getpeercert(binary_form=True)


def der(path: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(path.read_text())


# --- the choice: HTTPS, or plain HTTP by an explicit switch ------------------------------------------------


def test_neither_tls_files_nor_plain_http_is_refused_with_one_line(tmp_path):
    line = start_refused(tmp_path, tls_cert_file=None, tls_key_file=None, tls_ca_file=None)
    assert line == CHOOSE


def test_plain_http_beside_tls_files_is_refused(tmp_path):
    line = start_refused(tmp_path, plain_http=True)
    assert "plain_http: true and tls_cert_file and tls_key_file are both set" in line


@pytest.mark.parametrize("left_out", ["tls_key_file", "tls_cert_file"])
def test_one_tls_file_alone_is_refused_naming_the_other(tmp_path, left_out):
    line = start_refused(tmp_path, **{left_out: None})
    assert f"without {left_out}: HTTPS needs both" in line


def test_plain_http_from_the_environment_is_a_bool(tmp_path):
    daemon = make_tls_daemon(tmp_path / "d")
    for name in ("tls_cert_file", "tls_key_file", "tls_ca_file"):
        daemon.config.pop(name)
    line = refused(
        run_daemon_once(write_yaml(tmp_path / "c.yml", daemon.config), ORCHESTRATORD_PLAIN_HTTP="no")
    )
    assert line == CHOOSE


# --- serving HTTPS ------------------------------------------------------------------------------------------


def test_https_serves_health_and_the_api_to_a_client_that_trusts_the_ca(tls_daemons):
    daemon = tls_daemons()
    assert daemon.api("GET", "/health", token=None).status == 200
    assert daemon.api("POST", "/v2/nodes/register", sample_registration("gpu-1")).status == 200
    assert [node["node_id"] for node in daemon.api("GET", "/v2/nodes").body["nodes"]] == ["gpu-1"]
    assert "https://127.0.0.1" in daemon.log() and "plain HTTP" not in daemon.log()
    with (
        socket.create_connection(("127.0.0.1", daemon.config["listen_port"]), timeout=5) as raw,
        daemon.client_context().wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        assert tls.version() in ("TLSv1.2", "TLSv1.3")


def handshake_at(daemon: TlsDaemon, version: ssl.TLSVersion) -> str:
    """The version a client offering only `version` settles on; raises ssl.SSLError when refused. The
    client allows old protocols itself (security level 0), so a refusal is the daemon's."""
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(cafile=str(daemon.ca_file))
    client.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():  # TLSVersion.TLSv1_1 is deprecated: that is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        client.minimum_version = client.maximum_version = version
    with (
        socket.create_connection(("127.0.0.1", daemon.config["listen_port"]), timeout=5) as raw,
        client.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        return tls.version()


def test_tls_1_2_and_1_3_are_served_and_1_1_is_refused(tls_daemons):
    daemon = tls_daemons()
    assert handshake_at(daemon, ssl.TLSVersion.TLSv1_2) == "TLSv1.2"
    assert handshake_at(daemon, ssl.TLSVersion.TLSv1_3) == "TLSv1.3"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old = ssl.TLSVersion.TLSv1_1
    with pytest.raises(ssl.SSLError):
        handshake_at(daemon, old)


def test_plain_http_to_the_https_port_gets_no_http_answer(tls_daemons):
    daemon = tls_daemons()
    connection = http.client.HTTPConnection("127.0.0.1", daemon.config["listen_port"], timeout=5)
    try:
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            connection.request("GET", "/health")
            connection.getresponse()
    finally:
        connection.close()


def test_a_client_trusting_another_ca_fails_the_handshake(tls_daemons, tmp_path):
    daemon = tls_daemons()
    write_ca(tmp_path / "other-ca.pem", "some other CA")
    other = ssl.create_default_context(cafile=str(tmp_path / "other-ca.pem"))
    with (
        socket.create_connection(("127.0.0.1", daemon.config["listen_port"]), timeout=5) as raw,
        pytest.raises(ssl.SSLCertVerificationError) as refused_by_client,
    ):
        other.wrap_socket(raw, server_hostname="127.0.0.1")
    assert "certificate verify failed" in str(refused_by_client.value)
    assert refused_by_client.value.verify_message == "unable to get local issuer certificate"
    assert daemon.api("GET", "/health", token=None).status == 200  # the daemon serves on


def test_a_connection_that_never_starts_its_handshake_is_closed_after_the_idle_timeout(tls_daemons):
    daemon = tls_daemons(connection_idle_timeout_ms=500)
    with socket.create_connection(("127.0.0.1", daemon.config["listen_port"]), timeout=10) as silent:
        opened = time.monotonic()
        assert silent.recv(1) == b""  # closed by the daemon (asyncio alone would wait 60 s)
        assert time.monotonic() - opened < 5
    assert daemon.api("GET", "/health", token=None).status == 200


def test_the_key_file_must_be_owner_only_and_not_a_link(tmp_path):
    daemon = make_tls_daemon(tmp_path / "d")
    key = Path(daemon.config["tls_key_file"])
    key.chmod(0o640)
    line = refused(run_daemon_once(write_yaml(tmp_path / "c.yml", daemon.config)))
    assert f"tls_key_file {key} is readable by group or others (mode 0640): run chmod 600 {key}" in line
    key.chmod(0o600)
    link = tmp_path / "key-link.pem"
    link.symlink_to(key)
    line = refused(
        run_daemon_once(write_yaml(tmp_path / "c.yml", {**daemon.config, "tls_key_file": str(link)}))
    )
    assert f"tls_key_file {link} is a symbolic link" in line
    assert "PRIVATE KEY" not in line


def test_a_key_that_does_not_match_the_certificate_is_refused(tmp_path):
    daemon = make_tls_daemon(tmp_path / "d")
    other = make_tls_daemon(tmp_path / "other")
    config = {**daemon.config, "tls_key_file": other.config["tls_key_file"]}
    line = refused(run_daemon_once(write_yaml(tmp_path / "c.yml", config)))
    assert "cannot be served together: key values mismatch" in line


def test_an_encrypted_key_is_refused_without_asking_for_a_password(tmp_path):
    daemon = make_tls_daemon(tmp_path / "d")
    key_path = Path(daemon.config["tls_key_file"])
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"correct horse"),
        )
    )
    line = refused(run_daemon_once(write_yaml(tmp_path / "c.yml", daemon.config), timeout=10))
    assert f"tls_key_file {key_path} is encrypted" in line


def test_a_server_certificate_the_ca_file_does_not_sign_is_refused(tmp_path):
    daemon = make_tls_daemon(tmp_path / "d")
    write_ca(tmp_path / "other-ca.pem", "some other CA")
    config = {**daemon.config, "tls_ca_file": str(tmp_path / "other-ca.pem")}
    line = refused(run_daemon_once(write_yaml(tmp_path / "c.yml", config)))
    assert "does not verify against tls_ca_file" in line and "unable to get local issuer certificate" in line


def test_an_expired_certificate_is_refused_at_start_naming_its_not_after(tmp_path):
    daemon = make_tls_daemon(tmp_path / "d")
    ca = write_ca(tmp_path / "ca.pem")
    expired_at = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
    write_server_certificate(ca, tmp_path / "old.pem", tmp_path / "old-key.pem", not_after=expired_at)
    config = {
        **daemon.config,
        "tls_cert_file": str(tmp_path / "old.pem"),
        "tls_key_file": str(tmp_path / "old-key.pem"),
        "tls_ca_file": str(tmp_path / "ca.pem"),
    }
    line = refused(run_daemon_once(write_yaml(tmp_path / "c.yml", config)))
    assert f"tls_cert_file {tmp_path / 'old.pem'} expired at 2026-01-02T03:04:05Z" in line


# --- SIGHUP: a renewed certificate without a restart -------------------------------------------------------


def renew(daemon: TlsDaemon, ca, not_after: datetime.datetime | None = None):
    """Write a new certificate and key over the served files (as the renewal playbook does)."""
    return write_server_certificate(
        ca, Path(daemon.config["tls_cert_file"]), Path(daemon.config["tls_key_file"]), not_after=not_after
    )


def test_sighup_serves_a_renewed_certificate_to_new_connections_without_a_restart(tls_daemons, tmp_path):
    ca = write_ca(tmp_path / "ca.pem")
    daemon = tls_daemons(ca=ca)
    pid = daemon.proc.pid
    first = served_certificate(daemon)
    # A connection opened before the reload stays open and keeps working.
    kept = http.client.HTTPSConnection(
        "127.0.0.1", daemon.config["listen_port"], timeout=5, context=daemon.client_context()
    )
    kept.request("GET", "/health")
    assert kept.getresponse().read()

    later = datetime.datetime.now(datetime.UTC).replace(microsecond=0) + datetime.timedelta(days=40)
    renewed = renew(daemon, ca, later)
    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: served_certificate(daemon) != first, timeout=10, what="the renewed certificate served")
    assert served_certificate(daemon) == der(Path(daemon.config["tls_cert_file"]))
    assert renewed.not_valid_after_utc == later
    assert daemon.proc.poll() is None and daemon.proc.pid == pid
    assert (
        f"TLS reloaded: serving {daemon.config['tls_cert_file']}, valid until {later:%Y-%m-%dT%H:%M:%SZ}"
        in (daemon.log())
    )
    kept.request("GET", "/health")
    assert kept.getresponse().status == 200
    kept.close()


def test_sighup_with_a_broken_pair_keeps_the_old_certificate_and_logs_one_error(tls_daemons, tmp_path):
    ca = write_ca(tmp_path / "ca.pem")
    daemon = tls_daemons(ca=ca)
    served = served_certificate(daemon)
    # A new certificate with a key that is not its own (the key half-copied, a mixed-up file).
    renew(daemon, ca)
    stray = ec.generate_private_key(ec.SECP256R1())
    key_path = Path(daemon.config["tls_key_file"])
    key_path.write_bytes(
        stray.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    daemon.proc.send_signal(signal.SIGHUP)
    errors = wait_until(
        lambda: [line for line in daemon.log().splitlines() if " ERROR " in line],
        timeout=10,
        what="the refused reload's log line",
    )
    assert len(errors) == 1, daemon.log()
    assert "TLS reload refused, still serving the certificate valid until" in errors[0]
    assert "key values mismatch" in errors[0]
    assert served_certificate(daemon) == served
    assert daemon.api("GET", "/health", token=None).status == 200


# --- expiry in /metrics ------------------------------------------------------------------------------------


def expiry_gauge(daemon: TlsDaemon) -> dict[str, float]:
    text = daemon.api("GET", "/metrics", token=None).text
    name = "orchestratord_tls_certificate_expiry_timestamp_seconds"
    values = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line.rsplit(" ", 1)
            values[labels.split('certificate="', 1)[1].split('"', 1)[0]] = float(value)
    return values


def test_metrics_show_when_the_server_certificate_and_the_ca_expire_and_follow_a_reload(
    tls_daemons, tmp_path
):
    ca = write_ca(tmp_path / "ca.pem")
    daemon = tls_daemons(ca=ca)
    assert expiry_gauge(daemon) == {
        "ca": ca[1].not_valid_after_utc.timestamp(),
        "server": ssl_not_after(Path(daemon.config["tls_cert_file"])),
    }
    later = datetime.datetime.now(datetime.UTC).replace(microsecond=0) + datetime.timedelta(hours=20)
    renew(daemon, ca, later)
    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: expiry_gauge(daemon)["server"] == later.timestamp(), timeout=10, what="the new expiry")


def ssl_not_after(path: Path) -> float:
    from cryptography import x509

    return x509.load_pem_x509_certificate(path.read_bytes()).not_valid_after_utc.timestamp()


def test_plain_http_has_no_expiry_gauge_and_survives_a_sighup(daemon):
    assert "orchestratord_tls_certificate_expiry" not in daemon.api("GET", "/metrics", token=None).text
    assert "plain_http: true" in daemon.log()
    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(
        lambda: "no certificate to reload on plain HTTP" in daemon.log(), timeout=10, what="the SIGHUP line"
    )
    assert daemon.proc.poll() is None and daemon.api("GET", "/health", token=None).status == 200


# --- the real clients against the daemon's own HTTPS ------------------------------------------------------


def test_pool_managerd_with_its_ca_file_registers_and_heartbeats_over_the_daemons_own_https(
    tls_daemons, tmp_path
):
    from support_agent import make_agent

    daemon = tls_daemons(node_timeout_ms=60_000)
    agent = make_agent(tmp_path / "agent", daemon, ca_file=str(daemon.ca_file)).start()
    try:
        assert agent.config["control_url"].startswith("https://127.0.0.1:")

        def online() -> bool:
            assert agent.running(), agent.log()
            answer = daemon.api("GET", "/v2/nodes/gpu-node-1")
            return answer.status == 200 and answer.body["status"] == "online"

        wait_until(online, timeout=20, what="the agent's node online over HTTPS")
        assert f"registered with {daemon.url}" in agent.log()
    finally:
        agent.stop()


def test_modules_with_ca_path_read_the_daemons_own_https(tls_daemons, tmp_path):
    from support_registry import add_node, ansible_env, run_tasks

    daemon = tls_daemons(node_timeout_ms=60_000)
    add_node(daemon, "gpu-a", ["m1"])
    with_ca, without_ca = run_tasks(
        ansible_env(daemon, tmp_path),
        tmp_path,
        [
            {"llorch.kit.llorch_nodes_info": {"ca_path": str(daemon.ca_file)}},
            {"llorch.kit.llorch_nodes_info": {}, "ignore_errors": True},
        ],
    )
    assert [node["node_id"] for node in with_ca["nodes"]] == ["gpu-a"]
    assert without_ca["failed"] and "TLS certificate not trusted" in without_ca["msg"], without_ca
    assert daemon.token not in without_ca["msg"]

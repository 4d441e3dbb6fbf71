"""db_ca_file: orchestratord checks the PostgreSQL server's certificate against the CA it is given.

The server is a real PostgreSQL taking TLS connections only (as role postgresql sets it up), with a
certificate for 127.0.0.1 that the kit's own module (llorch.kit.llorch_certificate, as role llorch_pki
runs it) issued from a kit-made CA. verify-full with that CA serves; a foreign CA, or a host name the
certificate does not hold, is refused at start with exit code 2 and one clear line; settings that
cannot work together are refused before anything connects."""

from __future__ import annotations

import shutil
import signal
import sys
from pathlib import Path

import pytest
from support import REPO_ROOT, make_daemon, wait_until
from support_daemon import online_node, run_daemon_once, status_of, write_yaml
from support_postgres import fresh_database, serving, start_tls_postgres
from support_registry import ansible_env, run_tasks
from support_tls import write_ca

sys.path.insert(0, str(REPO_ROOT / "files" / "orchestratord"))
from orchestratord.config import ConfigError, load_settings


@pytest.fixture(scope="module")
def kit_pki(tmp_path_factory) -> Path:
    """The cluster CA and a server certificate for 127.0.0.1, made by llorch.kit.llorch_certificate."""
    pki = tmp_path_factory.mktemp("pki")
    results = run_tasks(
        ansible_env(None, pki),
        pki,
        [
            {
                "llorch.kit.llorch_certificate": {
                    "kind": "ca",
                    "path": str(pki / "ca.crt"),
                    "private_key_path": str(pki / "ca.key"),
                }
            },
            {
                "llorch.kit.llorch_certificate": {
                    "kind": "server",
                    "path": str(pki / "db" / "server.crt"),
                    "private_key_path": str(pki / "db" / "server.key"),
                    "ca_path": str(pki / "ca.crt"),
                    "ca_private_key_path": str(pki / "ca.key"),
                    "common_name": "db",
                    "ip_addresses": ["127.0.0.1"],
                }
            },
        ],
    )
    assert all(result.get("changed") and not result.get("failed") for result in results), results
    return pki


@pytest.fixture(scope="module")
def tls_postgres(kit_pki):
    with serving(start_tls_postgres(kit_pki / "db" / "server.crt", kit_pki / "db" / "server.key")) as server:
        yield server


def db_settings(server, workdir: Path, sslmode: str, host: str = "127.0.0.1") -> dict:
    settings = fresh_database(server, workdir)
    settings["db_url"] = settings["db_url"].replace("@127.0.0.1:", f"@{host}:") + f"?sslmode={sslmode}"
    return settings


def refusal(result) -> str:
    """The one error line of a daemon that refused to start with exit code 2."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    errors = [line for line in lines if " ERROR " in line or line.startswith("orchestratord:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def test_verify_full_with_the_kit_ca_serves_and_keeps_what_it_wrote(tls_postgres, kit_pki, tmp_path):
    settings = db_settings(tls_postgres, tmp_path, "verify-full")
    daemon = make_daemon(tmp_path, **settings, db_ca_file=str(kit_pki / "ca.crt")).start()
    try:
        assert daemon.api("GET", "/ready").status == 200
        online_node(daemon, "gpu-1", ["llama"], serve="llama")
        assert daemon.api("POST", "/v2/nodes/gpu-1/drain", {"drain": True}).status == 200
        # Every connection of the daemon is TLS: the server takes no other (pg_hba holds hostssl only).
        rows = tls_postgres.sql(
            settings["db_url"].rsplit("/", 1)[1].split("?")[0],
            "SELECT count(*), bool_and(s.ssl) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) "
            "WHERE a.application_name LIKE 'orchestratord%'",
        )
        assert rows[0][0] >= 1 and rows[0][1] is True, rows
        daemon.restart()
        wait_until(lambda: status_of(daemon, "gpu-1") == "draining", timeout=10, what="the drain kept")
    finally:
        daemon.stop()


def test_sighup_reloads_db_ca_file_for_new_connections_and_keeps_the_trust_when_the_file_breaks(
    tls_postgres, kit_pki, tmp_path
):
    """A rotated cluster CA reaches the database connections without a restart (docs/tls.md#rotation):
    after SIGHUP, new connections trust what db_ca_file holds now; a file that no longer loads changes
    nothing but one ERROR line."""
    ca_file = tmp_path / "db-ca.crt"
    shutil.copyfile(kit_pki / "ca.crt", ca_file)
    settings = db_settings(tls_postgres, tmp_path, "verify-full")
    daemon = make_daemon(tmp_path, **settings, db_ca_file=str(ca_file)).start()

    def drain(value: bool) -> int:
        return daemon.api("POST", "/v2/nodes/gpu-1/drain", {"drain": value}).status

    try:
        online_node(daemon, "gpu-1", ["llama"], serve="llama")
        ca_file.write_bytes(b"not a certificate\n")
        daemon.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "db_ca_file reload refused" in daemon.log(), timeout=10, what="the refusal")
        assert drain(True) == 200, "a broken file keeps the trust held so far"
        write_ca(ca_file, common_name="someone else's CA")
        daemon.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "reloaded: new database connections" in daemon.log(), timeout=10, what="reload")
        # The pool's connections are replaced: the next write needs a new one, which the kit's CA no
        # longer vouches for.
        wait_until(lambda: drain(False) == 503, timeout=20, what="a write refused under a foreign CA")
        shutil.copyfile(kit_pki / "ca.crt", ca_file)
        daemon.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: drain(False) == 200, timeout=20, what="writes back under the kit's CA")
        assert daemon.proc.poll() is None, "nothing restarted"
    finally:
        daemon.stop()


def test_verify_ca_accepts_a_host_name_the_certificate_lacks(tls_postgres, kit_pki, tmp_path):
    # The certificate names 127.0.0.1 only: verify-ca checks the chain, not the name.
    settings = db_settings(tls_postgres, tmp_path, "verify-ca", host="localhost")
    daemon = make_daemon(tmp_path, **settings, db_ca_file=str(kit_pki / "ca.crt")).start()
    try:
        assert daemon.api("GET", "/ready").status == 200
    finally:
        daemon.stop()


def test_verify_full_refuses_a_host_name_the_certificate_lacks(tls_postgres, kit_pki, tmp_path):
    settings = db_settings(tls_postgres, tmp_path, "verify-full", host="localhost")
    config = write_yaml(
        tmp_path / "orchestratord.yml",
        {**make_daemon(tmp_path, **settings, db_ca_file=str(kit_pki / "ca.crt")).config},
    )
    line = refusal(run_daemon_once(config))
    assert "does not vouch for" in line and "localhost" in line, line


def test_a_foreign_ca_is_refused_with_a_clear_line(tls_postgres, tmp_path):
    write_ca(tmp_path / "foreign-ca.crt", common_name="someone else's CA")
    settings = db_settings(tls_postgres, tmp_path, "verify-full")
    config = write_yaml(
        tmp_path / "orchestratord.yml",
        make_daemon(tmp_path, **settings, db_ca_file=str(tmp_path / "foreign-ca.crt")).config,
    )
    line = refusal(run_daemon_once(config))
    assert "db_ca_file" in line and "does not vouch for" in line and "certificate verify failed" not in line
    assert "Traceback" not in line
    assert settings["db_password_file"] not in line


@pytest.mark.parametrize(
    ("content", "expected"),
    [(None, "cannot be read: No such file"), (b"not a certificate\n", "holds no usable CA certificate")],
)
def test_an_unusable_db_ca_file_is_refused(tls_postgres, tmp_path, content, expected):
    ca_file = tmp_path / "ca.crt"
    if content is not None:
        ca_file.write_bytes(content)
    settings = db_settings(tls_postgres, tmp_path, "verify-full")
    config = write_yaml(
        tmp_path / "orchestratord.yml", make_daemon(tmp_path, **settings, db_ca_file=str(ca_file)).config
    )
    line = refusal(run_daemon_once(config))
    assert f"db_ca_file {ca_file}" in line and expected in line, line


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"db_ca_file": "/etc/llorch/tls/db-ca.crt"}, "db_ca_file is set but db_url is not"),
        (
            {"db_url": "postgresql://o@db/llorch?sslmode=require", "db_ca_file": "/x/ca.crt"},
            "sslmode is require, which never checks",
        ),
        (
            {"db_url": "postgresql://o@db/llorch", "db_ca_file": "/x/ca.crt"},
            "sslmode is prefer, which never checks",
        ),
        ({"db_url": "postgresql://o@db/llorch?sslmode=verify-full"}, "sslmode=verify-full needs db_ca_file"),
        ({"db_url": "postgresql://o@db/llorch?sslmode=verify-ca"}, "sslmode=verify-ca needs db_ca_file"),
    ],
)
def test_inconsistent_db_tls_settings_are_refused_before_connecting(tmp_path, values, expected):
    path = write_yaml(tmp_path / "o.yml", values)
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={})
    assert expected in str(caught.value) and str(path) in str(caught.value)


def test_db_ca_file_from_the_environment_is_named_in_the_error(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_settings(None, environ={"ORCHESTRATORD_DB_CA_FILE": "/x/ca.crt"})
    assert "environment variable ORCHESTRATORD_DB_CA_FILE" in str(caught.value)

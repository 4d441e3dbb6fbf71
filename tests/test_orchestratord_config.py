"""Configuration: bad settings are refused at start with one line naming the key and the file."""

from __future__ import annotations

import socket

import pytest
from support import TEST_TOKEN, free_port, make_daemon
from support_daemon import run_daemon_once, write_yaml


@pytest.fixture
def base_config(tmp_path):
    token_file = tmp_path / "api-token"
    token_file.write_text(TEST_TOKEN + "\n")
    token_file.chmod(0o600)
    return {
        "listen_host": "127.0.0.1",
        "listen_port": free_port(),
        "token_file": str(token_file),
        "db_path": str(tmp_path / "registry.db"),
        "plain_http": True,
    }


def refused(result) -> str:
    """The daemon exited 2 with a single line on stderr and no traceback; returns that line."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_missing_config_file_is_named(tmp_path):
    line = refused(run_daemon_once(tmp_path / "absent.yml"))
    assert "absent.yml" in line and "not found" in line


def test_unknown_key_is_refused_with_key_and_file(tmp_path, base_config):
    config = write_yaml(tmp_path / "c.yml", {**base_config, "listen_prot": 9300})
    line = refused(run_daemon_once(config))
    assert "listen_prot" in line and str(config) in line


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("listen_port", "not-a-port"),
        ("listen_port", 70000),
        ("node_timeout_ms", -5),
        ("heartbeat_interval_ms", 1.5),
        ("metrics_enabled", "maybe"),
        ("log_level", "verbose"),
        ("max_body_bytes", 10),
    ],
)
def test_wrong_value_is_refused_with_key_and_file(tmp_path, base_config, key, value):
    config = write_yaml(tmp_path / "c.yml", {**base_config, key: value})
    line = refused(run_daemon_once(config))
    assert key in line and str(config) in line


def test_yaml_that_is_not_a_mapping_is_refused(tmp_path):
    config = tmp_path / "c.yml"
    config.write_text("- just\n- a list\n")
    line = refused(run_daemon_once(config))
    assert str(config) in line and "mapping" in line


def test_bad_environment_override_names_the_variable(tmp_path, base_config):
    config = write_yaml(tmp_path / "c.yml", base_config)
    line = refused(run_daemon_once(config, ORCHESTRATORD_NODE_TIMEOUT_MS="soon"))
    assert "ORCHESTRATORD_NODE_TIMEOUT_MS" in line and "node_timeout_ms" in line


def test_unknown_environment_override_is_refused(tmp_path, base_config):
    config = write_yaml(tmp_path / "c.yml", base_config)
    line = refused(run_daemon_once(config, ORCHESTRATORD_LISTEN_PROT="9300"))
    assert "ORCHESTRATORD_LISTEN_PROT" in line


def test_environment_overrides_the_file(tmp_path, monkeypatch):
    daemon = make_daemon(tmp_path / "d", heartbeat_interval_ms=200)
    monkeypatch.setenv("ORCHESTRATORD_HEARTBEAT_INTERVAL_MS", "1234")
    monkeypatch.setenv("ORCHESTRATORD_NODE_TIMEOUT_MS", "4321")
    daemon.start()
    try:
        from support import sample_registration

        answer = daemon.api("POST", "/v2/nodes/register", sample_registration("env-node"))
        assert answer.status == 200
        assert answer.body["heartbeat_interval_ms"] == 1234
        assert answer.body["node_timeout_ms"] == 4321
    finally:
        daemon.stop()


def test_no_token_at_all_refuses_to_start(tmp_path, base_config):
    del base_config["token_file"]
    config = write_yaml(tmp_path / "c.yml", base_config)
    line = refused(run_daemon_once(config))
    assert "token" in line and "LLORCH_API_TOKEN" in line


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_token_file_readable_by_others_is_refused(tmp_path, base_config, mode):
    token_file = tmp_path / "api-token"
    token_file.chmod(mode)
    config = write_yaml(tmp_path / "c.yml", base_config)
    line = refused(run_daemon_once(config))
    assert str(token_file) in line and "chmod 600" in line
    assert TEST_TOKEN not in line


def test_short_token_is_refused(tmp_path, base_config):
    del base_config["token_file"]
    config = write_yaml(tmp_path / "c.yml", base_config)
    line = refused(run_daemon_once(config, LLORCH_API_TOKEN="x" * 31))
    assert "32" in line and "LLORCH_API_TOKEN" in line


def test_missing_token_file_is_refused(tmp_path, base_config):
    base_config["token_file"] = str(tmp_path / "no-such-token")
    config = write_yaml(tmp_path / "c.yml", base_config)
    line = refused(run_daemon_once(config))
    assert "no-such-token" in line


def test_token_from_environment_and_only_its_fingerprint_logged(tmp_path, monkeypatch):
    daemon = make_daemon(tmp_path / "d", token_file=None)
    monkeypatch.setenv("LLORCH_API_TOKEN", TEST_TOKEN)
    # package_env() drops LLORCH_API_TOKEN from the environment, so hand it over through the env the
    # Popen inherits: start() uses package_env(), so patch that one call.
    import support

    original = support.package_env
    monkeypatch.setattr(
        support, "package_env", lambda **extra: original(LLORCH_API_TOKEN=TEST_TOKEN, **extra)
    )
    daemon.start()
    try:
        assert daemon.api("GET", "/v2/nodes").status == 200
        assert daemon.api("GET", "/v2/nodes", token="y" * len(TEST_TOKEN)).status == 401
    finally:
        daemon.stop()
    log = daemon.log()
    assert "token sha256:" in log
    assert TEST_TOKEN not in log


def test_unusable_database_path_is_one_clear_line(tmp_path, base_config):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    base_config["db_path"] = str(blocker / "registry.db")
    config = write_yaml(tmp_path / "c.yml", base_config)
    result = run_daemon_once(config)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"cannot open the database at db_path {blocker / 'registry.db'}" in result.stderr


def test_port_in_use_is_one_clear_line(tmp_path, base_config):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        base_config["listen_port"] = taken.getsockname()[1]
        config = write_yaml(tmp_path / "c.yml", base_config)
        result = run_daemon_once(config)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"cannot serve on 127.0.0.1:{base_config['listen_port']}" in result.stderr


def test_config_file_that_is_not_utf8_is_one_line(tmp_path, base_config):
    config = tmp_path / "c.yml"
    config.write_bytes(write_yaml(tmp_path / "plain.yml", base_config).read_bytes() + b"\n# caf\xe9\n")
    line = refused(run_daemon_once(config))
    assert str(config) in line and "UTF-8" in line


def test_token_file_that_is_not_utf8_is_one_line(tmp_path, base_config):
    token_file = tmp_path / "api-token"
    token_file.write_bytes(b"\xff\xfe" + b"x" * 40 + b"\n")
    config = write_yaml(tmp_path / "c.yml", base_config)
    line = refused(run_daemon_once(config))
    assert str(token_file) in line and "UTF-8" in line


def test_token_file_that_is_a_link_is_refused(tmp_path, base_config):
    # The token file may sit in a folder another user can write: a link there must not be followed.
    real = tmp_path / "api-token"
    link = tmp_path / "api-token-link"
    link.symlink_to(real)
    base_config["token_file"] = str(link)
    config = write_yaml(tmp_path / "c.yml", base_config)
    line = refused(run_daemon_once(config))
    assert str(link) in line and "symbolic link" in line
    assert TEST_TOKEN not in line

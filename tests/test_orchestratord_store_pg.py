"""The PostgreSQL store (db_url): a database that goes away answers writes 503 STORE_UNAVAILABLE while
reads, heartbeats and liveness carry on from memory, and nothing is lost once it is back; the schema is
migrated forward at start and a newer one is refused with exit code 2; the password stays out of the
URL, argv and the log. The store's contract on both backends is in test_orchestratord_durability.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from support import REPO_ROOT, free_port, make_daemon, sample_registration, wait_until
from support_daemon import beat, online_node, run_daemon_once, status_of
from support_postgres import daemon_sql, fresh_database

sys.path.insert(0, str(REPO_ROOT / "files" / "orchestratord"))
from orchestratord.config import ConfigError, load_settings, parse_db_url
from orchestratord.store_pg import MIGRATIONS

WRITE_FAILURE_LINE = "writes to the database PostgreSQL"


def pg_daemon(postgres, workdir: Path, **overrides):
    return make_daemon(workdir, **fresh_database(postgres, workdir), **overrides)


def password_of(daemon) -> str:
    return Path(daemon.config["db_password_file"]).read_text().strip()


def stored_pools(daemon, node_id: str) -> bytes | None:
    return daemon_sql(daemon.config, "SELECT pools FROM nodes WHERE node_id = $1", (node_id,))[0][0]


def refusal_line(result) -> str:
    """The one error line of a daemon that refused to start with exit code 2."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if " ERROR " in line or line.startswith("orchestratord: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def test_database_away_answers_writes_503_reads_and_heartbeats_go_on_nothing_lost(
    postgres,
    tmp_path,
):
    daemon = pg_daemon(postgres, tmp_path, node_timeout_ms=5000).start()
    try:
        registration = online_node(daemon, "gpu-1", ["llama"], serve="llama")
        assert daemon.api("GET", "/ready").status == 200
        postgres.stop()
        try:
            answer = daemon.api("POST", "/v2/nodes/register", sample_registration("gpu-2"))
            assert answer.status == 503, answer.text
            assert answer.body["code"] == "STORE_UNAVAILABLE"
            drain = daemon.api("POST", "/v2/nodes/gpu-1/drain", {"drain": True})
            assert drain.status == 503 and drain.body["code"] == "STORE_UNAVAILABLE"
            assert daemon.api("DELETE", "/v2/nodes/gpu-1").status == 503
            assert daemon.api("GET", "/ready").status == 503
            # Reads and liveness carry on from memory: the node's heartbeats keep it online.
            for _ in range(3):
                assert beat(daemon, registration, ["llama", "qwen"], serve="llama")["drain"] is False
            assert status_of(daemon, "gpu-1") == "online"
            node = daemon.api("GET", "/v2/nodes/gpu-1").body
            assert node["drain"] is False and node["models"] == ["llama", "qwen"]
        finally:
            postgres.start()
        wait_until(
            lambda: daemon.api("POST", "/v2/nodes/register", sample_registration("gpu-2")).status == 200,
            timeout=15,
            what="a registration once the database is back",
        )
        wait_until(lambda: daemon.api("GET", "/ready").status == 200, timeout=10, what="/ready 200 again")
        assert daemon.api("POST", "/v2/nodes/gpu-1/drain", {"drain": True}).status == 200
        # The heartbeats taken meanwhile reach the database with the next write-back.
        wait_until(
            lambda: b"qwen" in (stored_pools(daemon, "gpu-1") or b""),
            timeout=10,
            what="the readings taken while the database was away, written back",
        )
        daemon.restart()
        nodes = {node["node_id"]: node for node in daemon.api("GET", "/v2/nodes").body["nodes"]}
        assert sorted(nodes) == ["gpu-1", "gpu-2"]
        assert nodes["gpu-1"]["drain"] is True and nodes["gpu-1"]["models"] == ["llama", "qwen"]
        log = daemon.log()
        assert sum(WRITE_FAILURE_LINE in line and " fail " in line for line in log.splitlines()) == 1, log
        assert "work again" in log
        assert "Traceback" not in log
        assert password_of(daemon) not in log
    finally:
        daemon.stop()


def test_fresh_database_is_migrated_and_logged_then_left_alone(postgres, tmp_path):
    daemon = pg_daemon(postgres, tmp_path).start()
    daemon.restart()
    daemon.stop()
    assert daemon_sql(daemon.config, "SELECT version FROM schema_version ORDER BY version") == [
        (v,) for v in range(1, len(MIGRATIONS) + 1)
    ]
    log = daemon.log()
    assert log.count(f"from schema version 0 to {len(MIGRATIONS)}") == 1, (
        log
    )  # said once, at the first start only
    assert "database PostgreSQL t_" in log  # the start line names the backend, user, host and database
    assert password_of(daemon) not in log


def test_newer_schema_refuses_to_start_with_exit_code_2(postgres, tmp_path):
    daemon = pg_daemon(postgres, tmp_path).start()
    assert daemon.api("POST", "/v2/nodes/register", sample_registration("gpu-1")).status == 200
    daemon.stop()
    daemon_sql(daemon.config, "INSERT INTO schema_version (version) VALUES (7)")
    line = refusal_line(run_daemon_once(daemon.config_path))
    assert f"database schema version 7 is newer than this orchestratord ({len(MIGRATIONS)})" in line
    # Left as found, for a newer orchestratord.
    assert daemon_sql(daemon.config, "SELECT node_id FROM nodes") == [("gpu-1",)]


def test_password_in_db_url_is_refused_without_echoing_it(postgres, tmp_path):
    daemon = pg_daemon(postgres, tmp_path)
    password = password_of(daemon)
    daemon.config["db_url"] = daemon.config["db_url"].replace("@", f":{password}@", 1)
    daemon.write_config()
    line = refusal_line(run_daemon_once(daemon.config_path))
    assert "holds a password" in line and "db_password_file" in line
    assert password not in line


def test_wrong_password_refuses_to_start_with_exit_code_2(postgres, tmp_path):
    daemon = pg_daemon(postgres, tmp_path)
    Path(daemon.config["db_password_file"]).write_text("not-the-password\n")
    daemon.write_config()
    line = refusal_line(run_daemon_once(daemon.config_path))
    assert "refuses the login" in line and "db_password_file" in line
    assert "not-the-password" not in line


def test_database_not_there_at_start_exits_1_for_a_restart(tmp_path):
    nothing_listens = free_port()  # bound and released
    daemon = make_daemon(tmp_path, db_url=f"postgresql://nobody@127.0.0.1:{nothing_listens}/llorch")
    daemon.write_config()
    result = run_daemon_once(daemon.config_path)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "cannot open the database PostgreSQL nobody@127.0.0.1" in result.stderr


def test_two_daemons_starting_together_migrate_once(postgres, tmp_path):
    first = pg_daemon(postgres, tmp_path / "first")
    second = make_daemon(tmp_path / "second", db_url=first.config["db_url"])
    second.config["db_password_file"] = first.config["db_password_file"]
    try:
        # The advisory lock lets one apply each migration; the other waits, then finds it applied.
        for daemon in (first, second):
            daemon.start(wait=False)
        for daemon in (first, second):
            wait_until(daemon._answers, timeout=20, what=f"orchestratord on {daemon.url}")
        assert sorted(daemon_sql(first.config, "SELECT version FROM schema_version")) == [
            (v,) for v in range(1, len(MIGRATIONS) + 1)
        ]
        for version in range(1, len(MIGRATIONS) + 1):
            applied = [d.log().count(f"database schema version {version} applied") for d in (first, second)]
            assert sorted(applied) == [0, 1], applied
    finally:
        first.stop()
        second.stop()


@pytest.mark.parametrize(
    ("db_url", "words"),
    [
        ("postgresql://llorch:s3cret-pw@db:5432/llorch", "holds a password"),
        ("postgresql://llorch@db/llorch?password=s3cret-pw", "unknown parameter 'password'"),
        ("postgresql://llorch@db/llorch?sslmode=maybe", "sslmode must be one of"),
        ("mysql://llorch@db/llorch", "must start with postgresql://"),
        ("postgresql://db:5432/llorch", "needs a user, a host and a database"),
        ("postgresql://llorch@db:5432/", "needs a user, a host and a database"),
        ("postgresql://llorch@db:99999/llorch", "the port must be a number"),
    ],
)
def test_bad_db_url_is_one_clear_line_that_never_echoes_a_password(db_url, words):
    with pytest.raises(ConfigError) as refused:
        load_settings(None, {"ORCHESTRATORD_DB_URL": db_url})
    message = str(refused.value)
    assert words in message and "ORCHESTRATORD_DB_URL" in message
    assert "s3cret-pw" not in message and "\n" not in message


def test_db_url_names_user_host_port_and_database():
    target = parse_db_url("postgresql://orchestratord@db.lab:6432/llorch?sslmode=verify-full")
    assert (target.user, target.host, target.port, target.database) == (
        "orchestratord",
        "db.lab",
        6432,
        "llorch",
    )
    assert target.sslmode == "verify-full"
    assert str(target) == "PostgreSQL orchestratord@db.lab:6432/llorch"
    assert parse_db_url("postgres://u@h/d").port == 5432

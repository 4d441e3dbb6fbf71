"""validate_inventory for a replicated control plane: two control hosts need one shared PostgreSQL
database (orchestratord_db_url, no password in it, a vaulted password); a db group needs those settings."""

from __future__ import annotations

from support import TEST_TOKEN
from support_roles import local_host, validate

DB_URL = "postgresql://orchestratord@db-1:5432/orchestratord?sslmode=verify-full"
DB_PASSWORD = "a-vaulted-db-password-of-some-length"


def inventory(control=("ctl-a", "ctl-b"), db=("db-1",), **shared):
    children = {
        "control": {"hosts": {name: local_host() for name in control}},
        "gpu_nodes": {"hosts": {"gpu-1": local_host()}},
    }
    if db is not None:
        children["db"] = {"hosts": {name: local_host() for name in db}}
    shared_vars = {"llorch_api_token": TEST_TOKEN, "llorch_control_url": "https://ctl-a:9200", **shared}
    return {"all": {"vars": shared_vars, "children": children}}


def test_two_replicas_on_the_db_groups_server_pass(tmp_path):
    rc, message = validate(
        tmp_path, inventory(orchestratord_db_url=DB_URL, orchestratord_db_password=DB_PASSWORD)
    )
    assert rc == 0, message


def test_two_replicas_on_an_external_dsn_without_a_db_group_pass(tmp_path):
    url = "postgresql://llorch@pg.example.internal:6432/llorch?sslmode=verify-full"
    rc, message = validate(
        tmp_path, inventory(db=None, orchestratord_db_url=url, orchestratord_db_password=DB_PASSWORD)
    )
    assert rc == 0, message


def test_two_control_hosts_on_sqlite_are_refused(tmp_path):
    rc, message = validate(tmp_path, inventory(db=None))
    assert rc != 0
    assert "'control' holds 2 host(s) (ctl-a, ctl-b) on SQLite" in message, message


def test_a_db_group_without_the_database_settings_is_refused(tmp_path):
    rc, message = validate(tmp_path, inventory(control=("ctl-a",)))
    assert rc != 0
    assert "group 'db' holds 1 host(s) (db-1)" in message and "orchestratord_db_password" in message, message


def test_two_db_hosts_are_refused(tmp_path):
    rc, message = validate(
        tmp_path,
        inventory(db=("db-1", "db-2"), orchestratord_db_url=DB_URL, orchestratord_db_password=DB_PASSWORD),
    )
    assert rc != 0
    assert "group 'db' holds 2 host(s)" in message and "Patroni" in message, message


def test_a_password_in_the_db_url_is_refused_without_echoing_it(tmp_path):
    url = "postgresql://orchestratord:s3cret-in-url@db-1:5432/orchestratord"
    rc, message = validate(
        tmp_path, inventory(orchestratord_db_url=url, orchestratord_db_password=DB_PASSWORD)
    )
    assert rc != 0
    assert "without a password" in message and "s3cret-in-url" not in message, message


def test_a_missing_or_short_db_password_is_refused(tmp_path):
    rc, message = validate(
        tmp_path, inventory(orchestratord_db_url=DB_URL, orchestratord_db_password="short")
    )
    assert rc != 0
    assert (
        "orchestratord_db_password must be set, at least 16" in message
        and "short" not in message.split("must be set")[0]
    ), message


def test_control_hosts_naming_different_databases_are_refused(tmp_path):
    inv = inventory(orchestratord_db_password=DB_PASSWORD)
    hosts = inv["all"]["children"]["control"]["hosts"]
    hosts["ctl-a"]["orchestratord_db_url"] = DB_URL
    hosts["ctl-b"]["orchestratord_db_url"] = DB_URL.replace("db-1", "db-2")
    rc, message = validate(tmp_path, inv)
    assert rc != 0
    assert "name different databases" in message and "db-2" in message, message

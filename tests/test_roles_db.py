"""Role orchestratord's database settings, rendered and read back by the daemon's own loader: SQLite by
default, PostgreSQL with the password file, the cluster CA as db_ca_file and the asyncpg extra when
orchestratord_db_url is set; db_ca_file only with a verifying sslmode (the daemon refuses it otherwise)."""

from __future__ import annotations

import sys

import yaml
from support import REPO_ROOT
from support_roles import render_role

sys.path.insert(0, str(REPO_ROOT / "files" / "orchestratord"))
from orchestratord.config import database_target, load_settings

FACTS = ("_orchestratord_db_extras", "_orchestratord_db_private_files")
URL = "postgresql://orchestratord@db-1:5432/orchestratord?sslmode=verify-full"


def rendered(tmp_path, **overrides):
    out = render_role(tmp_path, "orchestratord", "orchestratord.yml.j2", FACTS, host_vars=overrides)
    return out, yaml.safe_load(out["config"].read_text()), load_settings(out["config"], environ={})


def test_sqlite_by_default_nothing_extra(tmp_path):
    out, values, settings = rendered(tmp_path, llorch_api_token="t" * 40)
    assert settings.db_url is None and "db_url" not in values and "db_ca_file" not in values
    assert out["_orchestratord_db_extras"] == [] and out["_orchestratord_db_private_files"] == []


def test_a_db_url_brings_the_password_file_the_cluster_ca_and_asyncpg(tmp_path):
    out, _values, settings = rendered(
        tmp_path, llorch_api_token="t" * 40, orchestratord_db_url=URL, orchestratord_db_password="p" * 24
    )
    assert settings.db_url == URL
    assert settings.db_password_file == "/etc/llorch/db-password"
    assert settings.db_ca_file == "/etc/llorch/tls/ca.crt"  # the cluster CA the TLS tasks copy there
    assert database_target(settings).ca_file == "/etc/llorch/tls/ca.crt"
    assert out["_orchestratord_db_extras"] == ["postgresql"]
    [password_file] = out["_orchestratord_db_private_files"]
    assert password_file == {"path": "/etc/llorch/db-password", "content": "p" * 24 + "\n"}


def test_a_db_url_without_a_verifying_sslmode_gets_no_ca_and_no_password_file_without_a_password(tmp_path):
    url = "postgresql://orchestratord@db-1:5432/orchestratord?sslmode=require"
    out, _values, settings = rendered(tmp_path, llorch_api_token="t" * 40, orchestratord_db_url=url)
    assert settings.db_url == url and settings.db_ca_file is None and settings.db_password_file is None
    assert out["_orchestratord_db_private_files"] == []

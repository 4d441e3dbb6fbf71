"""A throwaway PostgreSQL server for the tests, from Debian's packages (`make system-deps`).

initdb into a private temporary folder as an unprivileged user (PostgreSQL refuses root: when the tests
run as root, as here and in CI, the server runs as the `postgres` user the package creates), listening on
127.0.0.1 on a free port and on a socket in that folder. Every login needs a password (scram-sha-256,
nothing trusted); the superuser's random password sits in a 0600 file. Each test gets its own database and
login role, so tests sharing the session's server never see each other's rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest
from support import free_port

SERVER_USER = "postgres"
SUPERUSER = "postgres"


def server_bindir() -> Path:
    """The newest installed server's bin folder; fails (not skips) the test when there is none."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if not found:
        pytest.fail(
            "the PostgreSQL server is not installed (no /usr/lib/postgresql/*/bin/initdb): "
            "run `make system-deps`",
            pytrace=False,
        )
    return Path(found[-1]).parent


@dataclass
class PostgresServer:
    root: Path
    bindir: Path
    port: int = field(default_factory=free_port)
    password: str = field(default_factory=lambda: secrets.token_urlsafe(24))

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log_path(self) -> Path:
        return self.root / "server.log"

    def _as_server_user(self, *argv: str) -> list[str]:
        if os.geteuid() == 0:
            return ["runuser", "-u", SERVER_USER, "--", *argv]
        return list(argv)

    def _run(self, *argv: str) -> None:
        result = subprocess.run(self._as_server_user(*argv), capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv[:2])} failed ({result.returncode}):\n{result.stdout}{result.stderr}"
            )

    def init(self) -> PostgresServer:
        self.root.chmod(0o700)
        password_file = self.root / "superuser-password"
        password_file.write_text(self.password + "\n")
        password_file.chmod(0o600)
        if os.geteuid() == 0:
            account = pwd.getpwnam(SERVER_USER)
            for path in (self.root, password_file):
                os.chown(path, account.pw_uid, account.pw_gid)
        self._run(
            str(self.bindir / "initdb"),
            *("-D", str(self.data_dir), "-U", SUPERUSER, f"--pwfile={password_file}"),
            *("--auth=scram-sha-256", "--encoding=UTF8", "--no-locale", "--no-sync"),
        )
        # The tests stop the server cleanly; what they prove is the daemon's contract, not fsync.
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write(
                f"listen_addresses = '127.0.0.1'\nport = {self.port}\n"
                f"unix_socket_directories = '{self.root}'\nfsync = off\nfull_page_writes = off\nssl = off\n"
            )
        return self

    def start(self) -> None:
        self._run(
            str(self.bindir / "pg_ctl"), "-D", str(self.data_dir), "-l", str(self.log_path), "-w", "start"
        )

    def stop(self) -> None:
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "stop")

    def running(self) -> bool:
        return (self.data_dir / "postmaster.pid").exists()

    # --- databases for the tests

    async def _superuser(self, database: str = "postgres") -> asyncpg.Connection:
        return await asyncpg.connect(
            host="127.0.0.1", port=self.port, user=SUPERUSER, password=self.password, database=database
        )

    def sql(self, database: str, *statements: str) -> list:
        """Run statements as the superuser in `database`; the last one's rows."""

        async def run() -> list:
            conn = await self._superuser(database)
            try:
                rows: list = []
                for statement in statements:
                    rows = await conn.fetch(statement)
                return [tuple(row) for row in rows]
            finally:
                await conn.close()

        return asyncio.run(run())

    def create_database(self, name: str) -> tuple[str, str]:
        """A fresh database owned by a fresh login role of the same name: (db_url, its password)."""
        password = secrets.token_urlsafe(24)
        self.sql(
            "postgres",
            f"CREATE ROLE {name} LOGIN PASSWORD '{password}'",
            f"CREATE DATABASE {name} OWNER {name}",
        )
        return f"postgresql://{name}@127.0.0.1:{self.port}/{name}", password


def start_postgres() -> PostgresServer:
    bindir = server_bindir()
    if os.geteuid() == 0 and not shutil.which("runuser"):
        pytest.fail(
            "runuser is missing (util-linux): the tests start PostgreSQL as the postgres user", pytrace=False
        )
    root = Path(tempfile.mkdtemp(prefix="llorch-pg-"))
    server = PostgresServer(root=root, bindir=bindir).init()
    server.start()
    return server


@contextlib.contextmanager
def serving(server: PostgresServer) -> Iterator[PostgresServer]:
    """`server` for the block, then stopped (if a test left it running) and its files removed."""
    try:
        yield server
    finally:
        if server.running():
            server.stop()
        shutil.rmtree(server.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres():
    """One PostgreSQL server for the whole session, stopped and removed at the end."""
    with serving(start_postgres()) as server:
        yield server


def fresh_database(server: PostgresServer, workdir: Path) -> dict[str, str]:
    """A fresh database and the daemon settings for it: db_url and db_password_file, a 0600 file in
    `workdir` owned by the user running the daemon."""
    db_url, password = server.create_database("t_" + secrets.token_hex(6))
    workdir.mkdir(parents=True, exist_ok=True)
    password_file = workdir / "db-password"
    password_file.write_text(password + "\n")
    password_file.chmod(0o600)
    return {"db_url": db_url, "db_password_file": str(password_file)}


def daemon_sql(config: dict, statement: str, *rows: tuple) -> list[tuple]:
    """Run one statement on a daemon's PostgreSQL database as the daemon's own role, once per row of
    arguments (or once without any); the rows of the last run."""
    parts = urlsplit(config["db_url"])
    password = Path(config["db_password_file"]).read_text().strip()

    async def run() -> list[tuple]:
        conn = await asyncpg.connect(
            host=parts.hostname,
            port=parts.port,
            user=parts.username,
            password=password,
            database=parts.path.lstrip("/"),
        )
        try:
            result: list = []
            for args in rows or ((),):
                result = await conn.fetch(statement, *args)
            return [tuple(row) for row in result]
        finally:
            await conn.close()

    return asyncio.run(run())


# What each schema version added, undone: tests that start from an older version's database.
_UNDO_MIGRATION = {
    2: ["DROP TABLE credentials"],
    3: [
        "DROP TABLE changes",
        "DROP SEQUENCE change_seq",
        "ALTER TABLE nodes DROP COLUMN beat_seq, DROP COLUMN heartbeat_by, DROP COLUMN heartbeat_db_at, "
        "DROP COLUMN registered_db_at",
    ],
}


def downgrade_database(config: dict, version: int) -> None:
    """Put a daemon's database back to what schema `version` left (the daemon stopped)."""
    applied = max(row[0] for row in daemon_sql(config, "SELECT version FROM schema_version"))
    for undone in range(applied, version, -1):
        for statement in _UNDO_MIGRATION[undone]:
            daemon_sql(config, statement)
        daemon_sql(config, "DELETE FROM schema_version WHERE version = $1", (undone,))


def start_tls_postgres(cert_file: Path, key_file: Path) -> PostgresServer:
    """A throwaway server that takes TLS connections only (hostssl ... scram-sha-256, as role postgresql
    sets it up) with the given certificate and key; stop it and remove its root when done."""
    bindir = server_bindir()
    root = Path(tempfile.mkdtemp(prefix="llorch-pg-tls-"))
    server = PostgresServer(root=root, bindir=bindir).init()
    owner = pwd.getpwnam(SERVER_USER) if os.geteuid() == 0 else None
    for name, source, mode in (("server.crt", cert_file, 0o644), ("server.key", key_file, 0o600)):
        target = server.data_dir / name
        target.write_bytes(source.read_bytes())
        target.chmod(mode)
        if owner is not None:
            os.chown(target, owner.pw_uid, owner.pw_gid)
    # Later lines win: the TLS settings after init()'s `ssl = off`, and no plain-TCP line left in pg_hba.
    with (server.data_dir / "postgresql.conf").open("a") as conf:
        conf.write("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n")
    (server.data_dir / "pg_hba.conf").write_text(
        "local all all scram-sha-256\nhostssl all all 127.0.0.1/32 scram-sha-256\n"
    )
    server.start()
    return server

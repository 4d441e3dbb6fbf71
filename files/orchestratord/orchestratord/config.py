"""Settings: one typed object read once from a YAML file, with ORCHESTRATORD_<KEY> environment overrides."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import parse_qsl, unquote, urlsplit

import msgspec
import yaml

from .config_file import ConfigError, read_config_file
from .contract import (
    DEFAULT_MAX_MODELS_PER_NODE,
    DEFAULT_MAX_POOLS_PER_NODE,
    MIN_TOKEN_LENGTH,
    SecretFileError,
    read_secret_file,
)

ENV_PREFIX = "ORCHESTRATORD_"
TOKEN_ENV = "LLORCH_API_TOKEN"

Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
PositiveMs = Annotated[int, msgspec.Meta(ge=1)]


class Settings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    listen_host: str = "0.0.0.0"
    listen_port: Port = 9200
    # None: take the token from LLORCH_API_TOKEN instead.
    token_file: str | None = None
    db_path: str = "/var/lib/orchestratord/registry.db"
    # None: SQLite at db_path. Else PostgreSQL, postgresql://user@host:port/database (db_path unused); the
    # password comes from db_password_file (0600), never from the URL, which is logged.
    db_url: str | None = None
    db_password_file: str | None = None
    # The CA bundle that signed the database server's certificate (libpq's sslrootcert): needs db_url with
    # sslmode verify-ca or verify-full, which in turn need it (asyncpg would otherwise look in the daemon
    # user's ~/.postgresql/root.crt). For a managed service with a public CA, the system bundle.
    db_ca_file: str | None = None
    # PostgreSQL replicas (replication.py): how often each reads what the others wrote when no NOTIFY woke
    # it earlier. Other replicas' changes and heartbeats show within about this long.
    db_poll_interval_ms: Annotated[int, msgspec.Meta(ge=50, le=60_000)] = 1000
    heartbeat_interval_ms: PositiveMs = 5000
    # Three missed heartbeats: one lost packet or a slow GC pause must not flap a node
    # offline, yet a dead node leaves placement within 15 s.
    node_timeout_ms: PositiveMs = 15000
    max_body_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 1024 * 1024
    # What a node may claim. Each heartbeat's work and the daemon's memory grow with these, so a broken
    # or hostile agent is held to them: beyond a bound its registration or heartbeat gets a 400 (a new
    # node past max_nodes a 409), naming the field and the limit. The wire caps each list anyway (256
    # pools, 4096 models per pool); these are the tighter limits an operator sets for the cluster.
    max_nodes: Annotated[int, msgspec.Meta(ge=1)] = 10_000
    max_pools_per_node: Annotated[int, msgspec.Meta(ge=1, le=256)] = DEFAULT_MAX_POOLS_PER_NODE
    max_models_per_node: Annotated[int, msgspec.Meta(ge=1, le=65_536)] = DEFAULT_MAX_MODELS_PER_NODE
    # Connections: each agent keeps one open, so max_connections must exceed max_nodes. One that has not
    # presented the token within connection_idle_timeout_ms of opening is closed; at max_connections a
    # new one pushes out the oldest such. The open-files limit is raised to fit (see connections.py).
    max_connections: Annotated[int, msgspec.Meta(ge=1)] = 16_384
    connection_idle_timeout_ms: PositiveMs = 10_000
    metrics_enabled: bool = True
    # The client endpoint (/v1/*, gateway.py). None: no client keys, every /v1 call answers 401.
    client_keys_file: str | None = None
    # One file per node id holding that node's engine API key. None: engines are asked without a key.
    engine_keys_dir: str | None = None
    # Requests waiting per model for a free engine slot, and for how long at most.
    gateway_queue_max: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 256
    gateway_queue_timeout_ms: PositiveMs = 30_000
    gateway_connect_timeout_ms: PositiveMs = 2000
    # Request sent -> the engine's first real token: prompt processing of a long prompt counts here.
    gateway_first_byte_timeout_ms: PositiveMs = 120_000
    # Between two chunks of an engine's answer.
    gateway_idle_timeout_ms: PositiveMs = 60_000
    # Consecutive failures after which a pool gets nothing until its node's next heartbeat.
    gateway_set_aside_after: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 3
    # Requests sent to an engine beyond its free slots, which the engine queues itself: when a slot frees it
    # starts the next at once, without a round trip through the daemon (bench/gateway.py part 2). 0: never
    # more than its slots; everything else waits in the daemon's fair queue.
    gateway_engine_backlog: Annotated[int, msgspec.Meta(ge=0, le=64)] = 1
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    # HTTPS (tls.py): the server certificate first, then its intermediates, and its private key (owner-only,
    # no link). SIGHUP loads a renewed pair without a restart. plain_http: true serves plain HTTP instead,
    # for labs and tests only; one of the two must be chosen. tls_ca_file: the cluster CA's certificate
    # (public), checked against the server certificate and reported in /metrics.
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_ca_file: str | None = None
    plain_http: bool = False
    # Node credentials (credentials.py): how long a node token lives (renewed on a heartbeat once less
    # than half is left), and the single-use recovery token that lets a node off past that rejoin alone.
    node_credential_ttl_s: Annotated[int, msgspec.Meta(ge=2, le=365 * 86400)] = 86400
    node_recovery_ttl_s: Annotated[int, msgspec.Meta(ge=60, le=10 * 365 * 86400)] = 365 * 86400


SETTING_NAMES = tuple(Settings.__struct_fields__)
# Taken as written from the environment (a path "0600" stays a string).
STRING_SETTINGS = (
    "listen_host",
    "token_file",
    "db_path",
    "db_url",
    "db_password_file",
    "db_ca_file",
    "log_level",
    "client_keys_file",
    "engine_keys_dir",
    "tls_cert_file",
    "tls_key_file",
    "tls_ca_file",
)
DB_URL_SCHEMES = ("postgresql", "postgres")
# The only query parameter db_url takes: anything else (password=, passfile=) could carry a secret into a
# logged value or change what the daemon trusts behind its back.
DB_URL_SSLMODES = ("disable", "prefer", "require", "verify-ca", "verify-full")
# The modes that check the server's certificate against db_ca_file.
DB_URL_VERIFYING_SSLMODES = ("verify-ca", "verify-full")


@dataclass(frozen=True)
class DatabaseTarget:
    """Where the PostgreSQL store connects, parsed from db_url: everything but the password."""

    host: str
    port: int
    user: str
    database: str
    sslmode: str
    ca_file: str | None = None  # db_ca_file: the CA the server's certificate must verify against

    def __str__(self) -> str:  # for log lines and messages: no secret in it
        return f"PostgreSQL {self.user}@{self.host}:{self.port}/{self.database}"


def parse_db_url(url: str) -> DatabaseTarget:
    """db_url's parts, or ConfigError naming what is wrong (never echoing a password)."""
    parts = urlsplit(url)
    if parts.scheme not in DB_URL_SCHEMES:
        raise ConfigError(
            "db_url: must start with postgresql:// (e.g. postgresql://orchestratord@db:5432/llorch)"
        )
    if parts.password is not None:
        raise ConfigError(
            "db_url: holds a password; remove it and put the password in a 0600 file named by "
            "db_password_file"
        )
    try:
        port = parts.port or 5432
    except ValueError:
        raise ConfigError("db_url: the port must be a number from 1 to 65535") from None
    database = unquote(parts.path.lstrip("/"))
    if not parts.hostname or not parts.username or not database or "/" in database:
        raise ConfigError("db_url: needs a user, a host and a database: postgresql://user@host:port/database")
    sslmode = "prefer"
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key != "sslmode":
            raise ConfigError(f"db_url: unknown parameter {key!r} (only sslmode is taken)")
        if value not in DB_URL_SSLMODES:
            raise ConfigError(f"db_url: sslmode must be one of {', '.join(DB_URL_SSLMODES)}")
        sslmode = value
    return DatabaseTarget(parts.hostname, port, unquote(parts.username), database, sslmode)


def _field_of(error: msgspec.ValidationError) -> str:
    """The key a msgspec error is about ('... - at `$.listen_port`' -> 'listen_port')."""
    text = str(error)
    marker = "at `$."
    if marker in text:
        return text.split(marker, 1)[1].split("`", 1)[0].split("[", 1)[0]
    if "Object contains unknown field" in text:
        return text.split("`", 2)[1]
    return "?"


def _env_overrides(environ: dict[str, str]) -> dict:
    """ORCHESTRATORD_<KEY> values, parsed as YAML scalars so 9300 is an int and false a bool."""
    overrides = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        key = name[len(ENV_PREFIX) :].lower()
        if key not in SETTING_NAMES:
            raise ConfigError(f"environment variable {name}: unknown setting {key!r}")
        try:
            overrides[key] = yaml.safe_load(value) if value != "" else None
        except yaml.YAMLError:
            overrides[key] = value
        if key in STRING_SETTINGS and overrides[key] is not None:
            overrides[key] = str(value)
    return overrides


def load_settings(config_path: str | Path | None, environ: dict[str, str] | None = None) -> Settings:
    """Read the file (when given), apply environment overrides, check every value's type and range."""
    environ = dict(os.environ if environ is None else environ)
    raw: dict = {}
    source = "defaults"
    if config_path is not None:
        config_path = Path(config_path)
        raw = read_config_file(config_path)
        source = str(config_path)
        unknown = sorted(str(key) for key in raw if key not in SETTING_NAMES)
        if unknown:
            raise ConfigError(f"{source}: unknown key {unknown[0]!r} (known: {', '.join(SETTING_NAMES)})")
    env = _env_overrides(environ)
    merged = {**raw, **env}
    try:
        settings = msgspec.convert(merged, Settings)
    except msgspec.ValidationError as exc:
        key = _field_of(exc)
        where = f"environment variable {ENV_PREFIX}{key.upper()}" if key in env else source
        detail = str(exc).split(" - at ", 1)[0]
        raise ConfigError(f"{where}: key {key!r}: {detail}") from None
    if settings.db_url is not None:
        try:
            parse_db_url(settings.db_url)
        except ConfigError as exc:
            where = f"environment variable {ENV_PREFIX}DB_URL" if "db_url" in env else source
            raise ConfigError(f"{where}: {exc}") from None
    _check_db_tls(settings, source, env)
    return settings


def _check_db_tls(settings: Settings, source: str, env: dict) -> None:
    """db_ca_file and a verifying sslmode come together; either alone is a mistake said at start."""
    sslmode = parse_db_url(settings.db_url).sslmode if settings.db_url is not None else None
    if settings.db_ca_file is not None:
        where = f"environment variable {ENV_PREFIX}DB_CA_FILE" if "db_ca_file" in env else source
        if sslmode is None:
            raise ConfigError(f"{where}: db_ca_file is set but db_url is not (db_ca_file is for PostgreSQL)")
        if sslmode not in DB_URL_VERIFYING_SSLMODES:
            raise ConfigError(
                f"{where}: db_ca_file is set but db_url's sslmode is {sslmode}, which never checks the "
                "server's certificate: add ?sslmode=verify-full (or verify-ca) to db_url"
            )
    elif sslmode in DB_URL_VERIFYING_SSLMODES:
        where = f"environment variable {ENV_PREFIX}DB_URL" if "db_url" in env else source
        raise ConfigError(
            f"{where}: db_url's sslmode={sslmode} needs db_ca_file, the CA that signed the database's "
            "certificate (the system bundle /etc/ssl/certs/ca-certificates.crt for a public CA)"
        )


def database_target(settings: Settings) -> DatabaseTarget:
    """Where the PostgreSQL store connects: db_url's parts and the CA it checks the server with."""
    assert settings.db_url is not None
    return replace(parse_db_url(settings.db_url), ca_file=settings.db_ca_file)


def load_db_password(settings: Settings) -> str | None:
    """The PostgreSQL password from db_password_file (the contract's owner-only reader), or None: the
    server then authenticates otherwise (a client certificate, peer on a local socket)."""
    if settings.db_url is None or settings.db_password_file is None:
        return None
    try:
        return read_secret_file(settings.db_password_file, what="db_password_file", min_length=1)
    except SecretFileError as exc:
        raise ConfigError(str(exc)) from None


def describe_database(settings: Settings) -> str:
    """The database for log lines: the SQLite path, or PostgreSQL's user, host and database."""
    if settings.db_url is None:
        return settings.db_path
    return str(parse_db_url(settings.db_url))


def load_token(settings: Settings, environ: dict[str, str] | None = None) -> str:
    """The API token from token_file (0600 or stricter) or LLORCH_API_TOKEN; at least 32 characters."""
    environ = os.environ if environ is None else environ
    if settings.token_file:
        # The contract's reader: no link followed, owner-only, bounded, one line of UTF-8, long enough.
        try:
            return read_secret_file(settings.token_file, min_length=MIN_TOKEN_LENGTH)
        except SecretFileError as exc:
            raise ConfigError(str(exc)) from None
    elif environ.get(TOKEN_ENV):
        token = environ[TOKEN_ENV].strip()
    else:
        raise ConfigError(f"no API token: set token_file in the config or {TOKEN_ENV}")
    if len(token) < MIN_TOKEN_LENGTH:
        raise ConfigError(f"{TOKEN_ENV}: the token must be at least {MIN_TOKEN_LENGTH} characters")
    return token


def token_fingerprint(token: str) -> str:
    """A short, non-reversible name for the token that is safe to log."""
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()[:8]

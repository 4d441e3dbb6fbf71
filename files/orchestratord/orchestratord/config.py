"""Settings: one typed object read once from a YAML file, with ORCHESTRATORD_<KEY> environment overrides."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Annotated, Literal

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


SETTING_NAMES = tuple(Settings.__struct_fields__)
# Taken as written from the environment (a path "0600" stays a string).
STRING_SETTINGS = ("listen_host", "token_file", "db_path", "log_level", "client_keys_file", "engine_keys_dir")


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
        return msgspec.convert(merged, Settings)
    except msgspec.ValidationError as exc:
        key = _field_of(exc)
        where = f"environment variable {ENV_PREFIX}{key.upper()}" if key in env else source
        detail = str(exc).split(" - at ", 1)[0]
        raise ConfigError(f"{where}: key {key!r}: {detail}") from None


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

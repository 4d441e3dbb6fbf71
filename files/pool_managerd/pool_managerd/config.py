"""Settings: one typed object read once from /etc/llorch/pool-managerd.yml, checked key by key."""

from __future__ import annotations

import os
import re
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .contract import ID_RULE, valid_id

DEFAULT_CONFIG = "/etc/llorch/pool-managerd.yml"


class ConfigError(Exception):
    """A setup problem a person fixes; printed as one line, never as a traceback."""


@dataclass(frozen=True)
class PoolConfig:
    pool_id: str
    gpus: tuple[int, ...]
    slots_total: int


@dataclass(frozen=True)
class Settings:
    control_url: str
    token_file: Path
    node_id: str
    address: str
    models_dir: Path
    nvidia_smi: str
    pools: tuple[PoolConfig, ...] | None  # None: one pool "default" with every GPU
    allow_cpu_pools: bool
    deregister_on_stop: bool
    request_timeout_s: float
    ca_file: Path | None
    gpu_probe_interval_s: float
    gpu_probe_timeout_s: float
    backoff_initial_s: float
    backoff_max_s: float
    log_level: str


LOG_LEVELS = ("debug", "info", "warning", "error")


def _default_node_id() -> str:
    return socket.gethostname().split(".")[0] or "localhost"


# key -> (kind, default); a default of ... means required.
KEYS: dict[str, tuple[str, Any]] = {
    "control_url": ("url", ...),
    "token_file": ("path", ...),
    "node_id": ("id", None),  # None: the host name
    "address": ("text", None),  # None: http://<host name>:8000
    "models_dir": ("path", "/var/lib/llorch/models"),
    "nvidia_smi": ("text", "nvidia-smi"),
    "pools": ("pools", None),
    "allow_cpu_pools": ("bool", False),
    "deregister_on_stop": ("bool", True),
    "request_timeout_s": ("seconds", 5.0),
    "ca_file": ("path", None),
    "gpu_probe_interval_s": ("seconds", 15.0),
    "gpu_probe_timeout_s": ("seconds", 10.0),
    "backoff_initial_s": ("seconds", 0.5),
    "backoff_max_s": ("seconds", 30.0),
    "log_level": ("level", "info"),
}


def _check(key: str, kind: str, value: Any) -> Any:
    def wrong(expected: str) -> ConfigError:
        return ConfigError(f"'{key}' must be {expected}, not {value!r}")

    if kind in ("text", "path", "url", "id", "level"):
        if not isinstance(value, str) or not value.strip():
            raise wrong("a non-empty string")
        value = value.strip()
        if kind == "url" and not re.match(r"^https?://[^/\s]+", value):
            raise wrong("an http:// or https:// URL")
        if kind == "id" and not valid_id(value):
            raise wrong(ID_RULE)
        if kind == "level" and value.lower() not in LOG_LEVELS:
            raise wrong("one of " + ", ".join(LOG_LEVELS))
        return Path(value) if kind == "path" else value.rstrip("/") if kind == "url" else value
    if kind == "bool":
        if not isinstance(value, bool):
            raise wrong("true or false")
        return value
    if kind == "seconds":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise wrong("a number of seconds above 0")
        return float(value)
    if kind == "pools":
        return _check_pools(value)
    raise AssertionError(kind)


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_pools(value: Any) -> tuple[PoolConfig, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"'pools' must be a non-empty list of {{pool_id, gpus, slots_total}}: {value!r}")
    pools, seen_ids, seen_gpus = [], set(), {}
    for number, entry in enumerate(value):
        where = f"pools[{number}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"'{where}' must be a mapping with pool_id, gpus, slots_total")
        unknown = sorted(set(entry) - {"pool_id", "gpus", "slots_total"})
        if unknown:
            raise ConfigError(f"'{where}': unknown key '{unknown[0]}' (known: pool_id, gpus, slots_total)")
        pool_id = entry.get("pool_id")
        if not valid_id(pool_id):
            raise ConfigError(f"'{where}.pool_id' must be {ID_RULE}, not {pool_id!r}")
        if pool_id in seen_ids:
            raise ConfigError(f"'{where}.pool_id': {pool_id!r} is used by two pools")
        seen_ids.add(pool_id)
        gpus = entry.get("gpus", [])
        if not isinstance(gpus, list) or not all(_is_index(gpu) for gpu in gpus):
            raise ConfigError(f"'{where}.gpus' must be a list of GPU indices (0, 1, ...), not {gpus!r}")
        for gpu in gpus:
            if gpu in seen_gpus:
                raise ConfigError(f"'{where}.gpus': GPU {gpu} is already in pool {seen_gpus[gpu]!r}")
            seen_gpus[gpu] = pool_id
        slots = entry.get("slots_total", 1)
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 0:
            raise ConfigError(f"'{where}.slots_total' must be a whole number >= 0, not {slots!r}")
        pools.append(PoolConfig(pool_id=pool_id, gpus=tuple(gpus), slots_total=slots))
    return tuple(pools)


def load_settings(config_path: str | Path) -> Settings:
    """Read and check the config file; every problem is a ConfigError naming the file and the key."""
    path = Path(config_path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except OSError as error:
        raise ConfigError(f"config file {path} cannot be read: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {error.start})") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {error}".replace("\n", " ")) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings, not {type(raw).__name__}")
    unknown = sorted(str(key) for key in raw if key not in KEYS)
    if unknown:
        raise ConfigError(f"config file {path}: unknown key '{unknown[0]}' (known keys: {', '.join(KEYS)})")
    values: dict[str, Any] = {}
    for key, (kind, default) in KEYS.items():
        if key not in raw or raw[key] is None:
            if default is ...:
                raise ConfigError(f"config file {path}: '{key}' is required")
            values[key] = Path(default) if kind == "path" and default is not None else default
            continue
        try:
            values[key] = _check(key, kind, raw[key])
        except ConfigError as error:
            raise ConfigError(f"config file {path}: {error}") from None
    values["node_id"] = values["node_id"] or _default_node_id()
    values["address"] = values["address"] or f"http://{socket.gethostname()}:8000"
    values["log_level"] = values["log_level"].lower()
    if values["ca_file"] is not None:
        _check_ca_file(path, values["ca_file"])
    if values["backoff_max_s"] < values["backoff_initial_s"]:
        raise ConfigError(f"config file {path}: 'backoff_max_s' must not be below 'backoff_initial_s'")
    return Settings(**values)


def _check_ca_file(config_path: Path, ca_file: Path) -> None:
    """Load the CA bundle now: a wrong file is a config error, not a traceback at the first request."""
    if not ca_file.is_file():
        raise ConfigError(f"config file {config_path}: ca_file {ca_file} not found")
    try:
        ssl.create_default_context(cafile=str(ca_file))
    except ssl.SSLError as error:
        reason = error.reason or str(error)
        raise ConfigError(
            f"config file {config_path}: ca_file {ca_file} is not a PEM CA bundle ({reason})"
        ) from None
    except OSError as error:
        raise ConfigError(
            f"config file {config_path}: ca_file {ca_file} cannot be read: {error.strerror}"
        ) from None
    except ValueError:  # not UTF-8 / not text at all
        raise ConfigError(f"config file {config_path}: ca_file {ca_file} is not a PEM CA bundle") from None


def machine_id() -> str | None:
    """The systemd machine id, so the registry can tell a renamed host from a new one."""
    for candidate in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            text = Path(candidate).read_text(encoding="utf-8").strip()
        except OSError:
            continue
        if text:
            return text
    return None


def ram_total_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0

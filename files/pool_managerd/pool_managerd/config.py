"""Settings: one typed struct (msgspec), read once from /etc/llorch/pool-managerd.yml, as orchestratord's.

The pool rules are the wire's: a pool id is the contract's id, GPU indices and slot counts have the bounds
the daemon's registration schema has. A problem is one line naming the file and the key.
"""

from __future__ import annotations

import os
import re
import socket
import ssl
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import msgspec.inspect

from .config_file import ConfigError, read_config_file
from .contract import DEFAULT_MAX_POOLS_PER_NODE, ID_RULE, NODE_ID_RULE, valid_node_id
from .control_urls import MAX_CONTROL_URLS
from .wire import Address, Count, GpuIndex, Id

DEFAULT_CONFIG = "/etc/llorch/pool-managerd.yml"

# Each type says in its description what a person must write; an error message quotes it.
Text = Annotated[str, msgspec.Meta(pattern=r"\S", description="a non-empty string")]
ControlUrl = Annotated[
    str, msgspec.Meta(pattern=r"^https?://[^/\s]+", description="an http:// or https:// URL")
]
ControlUrlList = Annotated[
    tuple[ControlUrl, ...],
    msgspec.Meta(
        min_length=1,
        max_length=MAX_CONTROL_URLS,
        description=f"a list of 1-{MAX_CONTROL_URLS} http:// or https:// URLs",
    ),
]
Seconds = Annotated[float, msgspec.Meta(gt=0, description="a number of seconds above 0")]
Flag = Annotated[bool, msgspec.Meta(description="true or false")]
LogLevel = Annotated[
    Literal["debug", "info", "warning", "error"],
    msgspec.Meta(description="one of debug, info, warning, error"),
]
NodeId = Annotated[Id, msgspec.Meta(description=ID_RULE)]
NodeAddress = Annotated[Address, msgspec.Meta(description="a URL of 1-512 printable characters")]


class PoolConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    pool_id: Annotated[Id, msgspec.Meta(description=ID_RULE)]
    gpus: Annotated[
        tuple[GpuIndex, ...], msgspec.Meta(max_length=1024, description="a list of GPU indices (0, 1, ...)")
    ] = ()
    slots_total: Annotated[Count, msgspec.Meta(description="a whole number from 0 to 1000000")] = 1
    # The pool's engine (/etc/pool-managerd/engines/<pool_id>.yml): with one, the pool's slots are the
    # engine's parallel slots and the pool is ready only while its engine serves.
    engine_file: Text | None = None


class Settings(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    # Exactly one of the two. Once loaded, control_urls holds every URL in order (one for control_url) and
    # control_url the first: the agent moves along the list when a URL gives no answer (control_urls.py).
    control_url: ControlUrl | None = None
    control_urls: ControlUrlList | None = None
    # The cluster's shared token (an admin credential, as before node identities): needed only without
    # join_token_file, or as the last resort when no node credential works (identity.py).
    token_file: Text | None = None
    # A join token (`sha256:<CA pin>::<secret>`, or the secret alone over plain http) that buys this
    # node its own credential, kept in credential_dir (node-token, recovery-token; 0600).
    join_token_file: Text | None = None
    credential_dir: Text = "/var/lib/pool-managerd/credentials"
    node_id: NodeId | None = None  # None: the short host name
    address: NodeAddress | None = None  # None: http://<host name>:8000
    models_dir: Text = "/var/lib/llorch/models"
    nvidia_smi: Text = "nvidia-smi"
    # None: one pool "default" with every GPU (or "cpu" on a host without one). At most what orchestratord
    # takes by default from one node: more would have every registration refused.
    pools: (
        Annotated[
            tuple[PoolConfig, ...],
            msgspec.Meta(
                min_length=1,
                max_length=DEFAULT_MAX_POOLS_PER_NODE,
                description="a non-empty list of {pool_id, gpus, slots_total, engine_file}",
            ),
        ]
        | None
    ) = None
    allow_cpu_pools: Flag = False
    deregister_on_stop: Flag = True
    request_timeout_s: Seconds = 5.0
    ca_file: Text | None = None
    gpu_probe_interval_s: Seconds = 15.0
    gpu_probe_timeout_s: Seconds = 10.0
    backoff_initial_s: Seconds = 0.5
    backoff_max_s: Seconds = 30.0
    log_level: LogLevel = "info"
    # The key the engines take (read once at start): None means $CREDENTIALS_DIRECTORY/engine-api-key,
    # where systemd's LoadCredential= puts it. Needed only when a pool names an engine_file.
    engine_api_key_file: Text | None = None
    # How often each engine is read; never more than half the heartbeat interval apart.
    engine_poll_interval_s: Seconds = 1.0
    # The longest one read of an engine may take (also never above the interval): past it, the engine
    # is dead.
    engine_timeout_s: Seconds = 2.0


SETTING_NAMES = tuple(Settings.__struct_fields__)


def _shown(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _plain(node: Any) -> tuple[Any, str | None]:
    """The type under its Optional and metadata wrappers, and the description met on the way."""
    description = None
    while True:
        if isinstance(node, msgspec.inspect.Metadata):
            description = description or (node.extra_json_schema or {}).get("description")
            node = node.type
        elif isinstance(node, msgspec.inspect.UnionType):
            others = [t for t in node.types if not isinstance(t, msgspec.inspect.NoneType)]
            if len(others) != 1:
                return node, description
            node = others[0]
        else:
            return node, description


def explain(error: msgspec.ValidationError, raw: dict, root: type | None = None) -> str:
    """A msgspec error as a person reads it: which key, what it must be, what it is. `root` is the struct
    the mapping was decoded into (Settings unless said)."""
    detail, _sep, at = str(error).partition(" - at `")
    node, _definitions = _plain(msgspec.inspect.type_info(root or Settings))
    where, value = "", raw
    wanted: tuple[str, str, Any] | None = None  # (where, description, value) of the deepest described key
    for name, index in re.findall(r"\.(\w+)|\[(\d+)\]", at.rstrip("`")):
        if name:
            fields = {field.name: field for field in getattr(node, "fields", ())}
            if name not in fields:
                break
            node = fields[name].type
            where = f"{where}.{name}" if where else name
            value = value.get(name) if isinstance(value, dict) else None
        else:
            node = getattr(node, "item_type", None)
            where += f"[{index}]"
            value = value[int(index)] if isinstance(value, list) and int(index) < len(value) else None
        node, description = _plain(node)
        if description:
            wanted = (where, description, value)
    named = re.search(r"field `([^`]*)`", detail)
    if detail.startswith("Object contains unknown field") and named:
        known = ", ".join(field.name for field in getattr(node, "fields", ()))
        inside = f"'{where}': " if where else ""
        return f"{inside}unknown key {named.group(1)!r} (known: {known})"
    if detail.startswith("Object missing required field") and named:
        return f"'{where + '.' if where else ''}{named.group(1)}' is required"
    if wanted is not None:
        key, description, shown_value = wanted
        return f"'{key}' must be {description}, not {_shown(shown_value)}"
    return f"'{where}': {detail}"


def _check_pools(pools: tuple[PoolConfig, ...]) -> None:
    """What one pool cannot say alone: ids and GPUs are each used by one pool."""
    seen_ids: set[str] = set()
    owner_of_gpu: dict[int, str] = {}
    for number, pool in enumerate(pools):
        if pool.pool_id in seen_ids:
            raise ConfigError(f"'pools[{number}].pool_id': {pool.pool_id!r} is used by two pools")
        seen_ids.add(pool.pool_id)
        for gpu in pool.gpus:
            if gpu in owner_of_gpu:
                raise ConfigError(
                    f"'pools[{number}].gpus': GPU {gpu} is already in pool {owner_of_gpu[gpu]!r}"
                )
            owner_of_gpu[gpu] = pool.pool_id


def _control_urls(settings: Settings) -> tuple[str, ...]:
    """The URLs to try in order, from whichever of control_url and control_urls is set (exactly one is)."""
    if settings.control_url is None and settings.control_urls is None:
        raise ConfigError("set 'control_url' (one URL) or 'control_urls' (the control plane's URLs)")
    if settings.control_url is not None and settings.control_urls is not None:
        raise ConfigError("set 'control_url' or 'control_urls', not both")
    urls = tuple(url.rstrip("/") for url in settings.control_urls or (settings.control_url,))
    for number, url in enumerate(urls):
        if url in urls[:number]:
            raise ConfigError(f"'control_urls[{number}]': {url!r} is listed twice")
    return urls


def _default_node_id() -> str:
    return socket.gethostname().split(".")[0] or "localhost"


def load_settings(config_path: str | Path) -> Settings:
    """Read and check the config file; every problem is a ConfigError naming the file and the key."""
    path = Path(config_path)
    # A key set to null (an empty YAML value) means its default, as if it were left out.
    raw = {key: value for key, value in read_config_file(path).items() if value is not None}
    unknown = sorted(str(key) for key in raw if key not in SETTING_NAMES)
    if unknown:
        raise ConfigError(
            f"config file {path}: unknown key {unknown[0]!r} (known keys: {', '.join(SETTING_NAMES)})"
        )
    if isinstance(raw.get("log_level"), str):
        raw["log_level"] = raw["log_level"].lower()
    try:
        settings = msgspec.convert(raw, Settings)
        control_urls = _control_urls(settings)
        if settings.pools is not None:
            _check_pools(settings.pools)
        if settings.token_file is None and settings.join_token_file is None:
            raise ConfigError("set 'join_token_file' (a join token) or 'token_file' (the shared token)")
        if settings.backoff_max_s < settings.backoff_initial_s:
            raise ConfigError("'backoff_max_s' must not be below 'backoff_initial_s'")
        node_id = settings.node_id or _default_node_id()
        if not valid_node_id(node_id):
            where = "'node_id'" if settings.node_id else f"'node_id' is not set and the host name {node_id!r}"
            raise ConfigError(f"{where} is no valid node id ({NODE_ID_RULE})")
        if settings.ca_file is not None:
            _check_ca_file(settings.ca_file)
    except msgspec.ValidationError as error:
        raise ConfigError(f"config file {path}: {explain(error, raw)}") from None
    except ConfigError as error:
        raise ConfigError(f"config file {path}: {error}") from None
    return msgspec.structs.replace(
        settings,
        control_url=control_urls[0],
        control_urls=control_urls,
        node_id=node_id,
        address=settings.address or f"http://{socket.gethostname()}:8000",
    )


def _check_ca_file(ca_file: str) -> None:
    """Load the CA bundle now: a wrong file is a config error, not a traceback at the first request."""
    if not os.path.isfile(ca_file):
        raise ConfigError(f"ca_file {ca_file} not found")
    try:
        ssl.create_default_context(cafile=ca_file)
    except ssl.SSLError as error:
        raise ConfigError(f"ca_file {ca_file} is not a PEM CA bundle ({error.reason or error})") from None
    except OSError as error:
        raise ConfigError(f"ca_file {ca_file} cannot be read: {error.strerror}") from None
    except ValueError:  # not UTF-8 / not text at all
        raise ConfigError(f"ca_file {ca_file} is not a PEM CA bundle") from None


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

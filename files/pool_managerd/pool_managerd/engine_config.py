"""The engine file: /etc/pool-managerd/engines/<pool_id>.yml, one per pool that serves a model.

The role renders it (mode 0644, no secret); two programs read it: `engine_exec`, which launches the engine
the file describes, and the agent, which watches the engine at the file's URL. One strict struct for both:
an unknown key is refused (a typo must not be silently ignored), and every string, list and number has a
bound. A problem is one line naming the file and the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import msgspec

from .config import explain
from .config_file import ConfigError, read_config_file
from .contract import ENGINE_KINDS, ENGINE_URL_PATTERN, ENGINE_URL_RULE, ID_RULE, MODEL_ID_RULE
from .wire import GpuIndex, Id, ModelId

MAX_EXTRA_ARGS = 64
MAX_EXTRA_ARG_CHARS = 256
MAX_PARALLEL = 256
MAX_CONTEXT_SIZE = 1 << 24  # 16 M tokens: above any model's trained context today

# An absolute path of printable characters: it lands in argv and in log lines.
AbsolutePath = Annotated[
    str, msgspec.Meta(pattern=r"^/[^\x00-\x1f\x7f]{0,4095}(?!\n)$", description="an absolute path")
]
Host = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^[A-Za-z0-9.:\[\]_-]{1,253}(?!\n)$",
        description="a host name or IP address to listen on",
    ),
]
ExtraArg = Annotated[
    str,
    msgspec.Meta(
        pattern=rf"^[^\x00]{{0,{MAX_EXTRA_ARG_CHARS}}}$",
        description=f"a string of at most {MAX_EXTRA_ARG_CHARS} characters without NUL",
    ),
]


class EngineFile(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    pool_id: Annotated[Id, msgspec.Meta(description=ID_RULE)]
    kind: Annotated[Literal[ENGINE_KINDS], msgspec.Meta(description=f"one of {', '.join(ENGINE_KINDS)}")]
    model_id: Annotated[ModelId, msgspec.Meta(description=MODEL_ID_RULE)]
    # The staging manifest's folder: the model's path is read from its manifest, never written here.
    models_dir: AbsolutePath
    binary: AbsolutePath
    host: Host
    port: Annotated[int, msgspec.Meta(ge=1, le=65535, description="a port from 1 to 65535")]
    url: Annotated[str, msgspec.Meta(pattern=ENGINE_URL_PATTERN, description=ENGINE_URL_RULE)]
    gpus: Annotated[
        tuple[GpuIndex, ...], msgspec.Meta(max_length=1024, description="a list of GPU indices (0, 1, ...)")
    ] = ()
    context_size: Annotated[
        int,
        msgspec.Meta(ge=1, le=MAX_CONTEXT_SIZE, description=f"a whole number from 1 to {MAX_CONTEXT_SIZE}"),
    ] = 2048
    parallel: Annotated[
        int, msgspec.Meta(ge=1, le=MAX_PARALLEL, description=f"a whole number from 1 to {MAX_PARALLEL}")
    ] = 1
    extra_args: Annotated[
        tuple[ExtraArg, ...],
        msgspec.Meta(
            max_length=MAX_EXTRA_ARGS,
            description=f"a list of at most {MAX_EXTRA_ARGS} strings of at most {MAX_EXTRA_ARG_CHARS} "
            "characters without NUL",
        ),
    ] = ()

    @property
    def cuda_visible_devices(self) -> str:
        """The pool's GPUs as CUDA numbers them for the engine; "" (no GPU at all) for a CPU pool."""
        return ",".join(str(index) for index in self.gpus)


def load_engine_file(path: str | Path, pool_id: str | None = None) -> EngineFile:
    """Read and check one engine file; ConfigError (one line naming the file and the key) otherwise.

    With `pool_id`, the file must describe that pool: a file copied for another pool would otherwise make
    one pool report another's engine.
    """
    path = Path(path)
    try:
        raw = read_config_file(path, "engine file")
    except ConfigError as error:
        # The agent reads every pool's file: say whose it is (engine_exec names the pool itself).
        raise ConfigError(f"pool {pool_id}: {error}" if pool_id is not None else str(error)) from None
    try:
        engine = msgspec.convert(raw, EngineFile)
    except msgspec.ValidationError as error:
        raise ConfigError(f"engine file {path}: {explain(error, raw, EngineFile)}") from None
    if pool_id is not None and engine.pool_id != pool_id:
        raise ConfigError(f"engine file {path} describes pool {engine.pool_id!r}, not pool {pool_id!r}")
    return engine


def load_pool_engines(pools) -> dict[str, EngineFile]:
    """The engine file of every pool that names one, by pool id; ConfigError for the first bad one."""
    return {
        pool.pool_id: load_engine_file(pool.engine_file, pool_id=pool.pool_id)
        for pool in pools
        if pool.engine_file is not None
    }

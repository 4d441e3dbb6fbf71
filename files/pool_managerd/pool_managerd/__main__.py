"""Command line: `python -m pool_managerd --config FILE [--once]`.

Exit codes: 0 stopped cleanly (or --once printed the registration), 2 configuration error, 3 GPU probe
failed. Problems a person fixes are printed as one line on stderr, never as a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys

import msgspec

from . import __version__
from .agent import Agent
from .config import DEFAULT_CONFIG, ConfigError, load_settings
from .contract import SecretFileError, read_secret_file
from .engine_config import load_pool_engines
from .models import ModelManifest
from .node import probe_gpus, registration, resolve_pools, with_engine_slots
from .nvidia_smi import NvidiaSmiError

EXIT_CONFIG = 2
EXIT_GPU = 3


def _say(message: str) -> None:
    print(f"pool-managerd: {message}", file=sys.stderr)


def read_engine_key(settings) -> str:
    """The engines' API key, read once: engine_api_key_file, else what systemd's LoadCredential= put in
    $CREDENTIALS_DIRECTORY. SecretFileError or ConfigError (one line) when there is none."""
    path = settings.engine_api_key_file
    if path is None:
        credentials = os.environ.get("CREDENTIALS_DIRECTORY")
        if not credentials:
            raise ConfigError(
                "a pool names an engine_file, but neither engine_api_key_file is set nor "
                "$CREDENTIALS_DIRECTORY (LoadCredential=engine-api-key:...) gives the engine API key"
            )
        path = os.path.join(credentials, "engine-api-key")
    return read_secret_file(str(path), what="engine_api_key_file")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pool-managerd", description="llorch-kit GPU node agent: registers this node and heartbeats."
    )
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"config file (default {DEFAULT_CONFIG})")
    parser.add_argument(
        "--once",
        action="store_true",
        help="probe the GPUs, read the model manifest, print the registration as JSON and exit",
    )
    parser.add_argument("--version", action="version", version=f"pool-managerd {__version__}")
    args = parser.parse_args(argv)

    try:
        settings = load_settings(args.config)
        token = read_secret_file(str(settings.token_file)) if settings.token_file else None
    except (ConfigError, SecretFileError) as error:
        _say(str(error))
        return EXIT_CONFIG
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        gpus = probe_gpus(settings)
        pools = resolve_pools(settings, gpus)
        engines = load_pool_engines(pools)
        pools = with_engine_slots(pools, engines)
        engine_key = read_engine_key(settings) if engines else None
    except NvidiaSmiError as error:
        hint = "" if settings.allow_cpu_pools else " (a host without GPUs needs allow_cpu_pools: true)"
        _say(f"GPU probe failed: {error}{hint if error.kind in ('not-found', 'no-devices') else ''}")
        return EXIT_GPU
    except SecretFileError as error:
        _say(str(error))
        return EXIT_CONFIG
    except ConfigError as error:
        message = str(error)
        _say(
            message
            if message.startswith(("engine file ", "config file "))
            else f"config file {args.config}: {message}"
        )
        return EXIT_CONFIG

    if args.once:
        body = msgspec.to_builtins(registration(settings, gpus, pools))
        # Not part of the registration: the models a heartbeat would report, for operators.
        body["models_available"] = ModelManifest(settings.models_dir).available()
        print(json.dumps(body, indent=2, sort_keys=True))
        return 0
    return asyncio.run(Agent(settings, token, pools, gpus, engines, engine_key).run())


if __name__ == "__main__":
    sys.exit(main())

"""What orchestratord and pool-managerd share in reading their settings: the error a person fixes, and the
YAML file read into a mapping with one-line errors. One file, linked into both packages
(files/shared/config_file.py), as wire.py is; each service decodes the mapping into its own typed struct.
"""

from __future__ import annotations

from pathlib import Path

import yaml


class ConfigError(Exception):
    """A configuration problem a person fixes; printed as one line, never as a traceback (exit 2)."""


def read_config_file(path: Path, what: str = "config file") -> dict:
    """The mapping of settings in the YAML file at `path` ({} for an empty file). Raises ConfigError, whose
    message names the file as `what` (e.g. "engine file")."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} not found") from None
    except OSError as exc:
        raise ConfigError(f"{what} {path} cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        # Where, and the byte itself: a config file holds no secret (the token has its own file).
        byte = exc.object[exc.start]
        raise ConfigError(
            f"{what} {path} is not UTF-8 text: byte 0x{byte:02x} at offset {exc.start}"
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path} is not valid YAML: {exc}".replace("\n", " ")) from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{what} {path} must hold a mapping of settings, not {type(raw).__name__}")
    return raw

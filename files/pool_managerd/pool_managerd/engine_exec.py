"""`python -m pool_managerd.engine_exec /etc/pool-managerd/engines/<pool>.yml`: start a pool's engine.

The ExecStart of `llorch-engine@<pool>.service`. It reads the engine file, finds the model in the staging
manifest (verified entries only), builds the command line with the engine kind's adapter, sets
CUDA_VISIBLE_DEVICES to the pool's GPUs and replaces itself with the engine (`execve`: systemd supervises
the engine's own process, and the launch command has one home, the adapter).

The model is opened here, relative to the models folder and without following a link, checked on the open
descriptor against the manifest, and handed to the engine as /proc/self/fd/N: the engine loads exactly the
file that was checked, even if the name is swapped meanwhile.

A setup a person must fix exits 2 with one line naming the pool and the cause (the unit sets
RestartPreventExitStatus=2, so systemd does not restart it in a loop).
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys

from .config_file import ConfigError
from .contract import (
    MANIFEST_NAME,
    ManifestError,
    SecretFileError,
    open_models_dir,
    open_regular_at,
    read_manifest_at,
    read_secret_file,
)
from .engine_config import EngineFile, load_engine_file
from .engines import adapter_for

EXIT_SETUP = 2
CREDENTIAL_NAME = "engine-api-key"
HELP_TIMEOUT_S = 30.0
# Variables llama-server reads as settings (LLAMA_ARG_*, LLAMA_API_KEY): the engine file is the one home
# of the engine's settings, so none may come in from the environment.
FOREIGN_SETTINGS_PREFIX = "LLAMA_"


class SetupError(Exception):
    """A setup a person must fix; the message is one line, without the pool (the caller adds it)."""


def open_verified_model(engine: EngineFile) -> int:
    """A descriptor of the engine's model file, when the manifest lists it as staged and verified and the
    file is still what staging recorded (size and mtime). The caller owns the descriptor."""
    manifest = os.path.join(engine.models_dir, MANIFEST_NAME)
    try:
        folder = open_models_dir(engine.models_dir)
    except OSError as error:
        raise SetupError(f"models_dir {engine.models_dir} cannot be opened ({error.strerror})") from None
    try:
        try:
            entries, _problems = read_manifest_at(folder)
        except (OSError, ManifestError) as error:
            raise SetupError(f"model manifest {manifest} cannot be read ({error})") from None
        entry = entries.get(engine.model_id)
        if entry is None:
            raise SetupError(f"model {engine.model_id!r} is not staged on this node (not in {manifest})")
        if not entry.get("sha256"):
            raise SetupError(
                f"model {engine.model_id!r} is listed in {manifest} without a sha256: not verified, stage it"
            )
        name = _name_inside(entry["path"], engine.models_dir)
        if name is None:
            raise SetupError(
                f"model {engine.model_id!r}: its file {entry['path']!r} is not directly inside models_dir "
                f"{engine.models_dir}"
            )
        try:
            fd = open_regular_at(folder, name)
        except FileNotFoundError:
            raise SetupError(
                f"model {engine.model_id!r}: file {entry['path']} is missing; stage it again"
            ) from None
        except OSError as error:
            why = "a symbolic link" if error.errno == errno.ELOOP else (error.strerror or str(error))
            raise SetupError(f"model {engine.model_id!r}: file {entry['path']} refused ({why})") from None
        info = os.fstat(fd)
        recorded_mtime = entry.get("mtime_ns")
        if info.st_size != entry["size_bytes"] or (
            recorded_mtime is not None and info.st_mtime_ns != recorded_mtime
        ):
            os.close(fd)
            raise SetupError(
                f"model {engine.model_id!r}: file {entry['path']} changed since it was staged and verified "
                f"({info.st_size} bytes, the manifest says {entry['size_bytes']}); stage it again"
            )
        return fd
    finally:
        os.close(folder)


def _name_inside(path: str, models_dir: str) -> str | None:
    """The file's name inside models_dir, or None when the entry points elsewhere."""
    if not os.path.isabs(path):
        return path if "/" not in path and path not in (".", "..") else None
    folder, name = os.path.split(os.path.normpath(path))
    return name if folder == os.path.normpath(models_dir) and name not in ("", ".", "..") else None


def key_path() -> str:
    """The engine API key's path in the unit's credentials folder, after checking the key is usable."""
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    if not credentials:
        raise SetupError(
            "no engine API key: $CREDENTIALS_DIRECTORY is unset (the unit needs "
            f"LoadCredential={CREDENTIAL_NAME}:/etc/pool-managerd/{CREDENTIAL_NAME})"
        )
    path = os.path.join(credentials, CREDENTIAL_NAME)
    try:
        read_secret_file(path, what="engine API key")
    except SecretFileError as error:
        raise SetupError(str(error)) from None
    return path


def binary_help(binary: str) -> str:
    """The binary's --help text, which also proves that it starts (its libraries load)."""
    if not os.path.isfile(binary) or not os.access(binary, os.X_OK):
        why = "missing" if not os.path.exists(binary) else "not an executable file"
        raise SetupError(f"engine binary {binary} is {why}")
    try:
        answer = subprocess.run(
            [binary, "--help"],
            capture_output=True,
            text=True,
            errors="replace",
            timeout=HELP_TIMEOUT_S,
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise SetupError(
            f"engine binary {binary} did not answer --help within {HELP_TIMEOUT_S:g} s"
        ) from None
    except OSError as error:
        raise SetupError(f"engine binary {binary} cannot run ({error.strerror})") from None
    if answer.returncode != 0:
        last = (answer.stderr.strip().splitlines() or ["no output"])[-1]
        raise SetupError(f"engine binary {binary} does not run (exit {answer.returncode}: {last[:200]})")
    return answer.stdout


def engine_environment(engine: EngineFile) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith(FOREIGN_SETTINGS_PREFIX)}
    env["CUDA_VISIBLE_DEVICES"] = engine.cuda_visible_devices
    return env


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print(
            "usage: python -m pool_managerd.engine_exec /etc/pool-managerd/engines/POOL.yml", file=sys.stderr
        )
        return EXIT_SETUP
    path = args[0]
    pool = os.path.splitext(os.path.basename(path))[0]
    try:
        engine = load_engine_file(path)
        pool = engine.pool_id
        help_text = binary_help(engine.binary)
        key = key_path()
        model_fd = open_verified_model(engine)
    except (ConfigError, SetupError) as error:
        print(f"llorch-engine: pool {pool}: {error}", file=sys.stderr)
        return EXIT_SETUP
    os.set_inheritable(model_fd, True)
    command = adapter_for(engine.kind).argv(engine, f"/proc/self/fd/{model_fd}", key, help_text)
    print(
        f"llorch-engine: pool {pool}: starting {engine.kind} for model {engine.model_id!r} on {engine.url} "
        f"(CUDA_VISIBLE_DEVICES={engine.cuda_visible_devices!r})",
        file=sys.stderr,
        flush=True,
    )
    try:
        os.execve(engine.binary, command, engine_environment(engine))
    except OSError as error:  # the binary went away since --help ran
        print(f"llorch-engine: pool {pool}: cannot start {engine.binary} ({error.strerror})", file=sys.stderr)
    return EXIT_SETUP


if __name__ == "__main__":
    sys.exit(main())

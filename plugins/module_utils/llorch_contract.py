# Copyright: llorch-kit contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The rules every llorch process agrees on, in one place.

orchestratord, pool-managerd, the modules, the inventory plugin and the roles' checks all take their id
patterns, node statuses, the model manifest's format and the secret-file reader from here. The services
receive this file inside their packages (a link to it, as ``nvidia_smi.py`` travels), the modules as
module_utils, the roles through the collection's ``llorch_id`` and ``llorch_model_id`` tests. Standard
library only: it runs on managed nodes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import stat

# --- ids ------------------------------------------------------------------------------------------------

# (?!\n) because Python's `$` also matches before a final newline ("gpu-1\n" would pass and break the
# one-line-per-event log); JSON Schema's ECMA regexes read it the same way. `.` and `..` are refused:
# clients that normalise URL paths cannot address them.
ID_PATTERN = r"^(?!\.\.?(?!\n)$)[A-Za-z0-9._-]{1,128}(?!\n)$"
ID_RULE = "letters, digits, '.', '_' and '-', 1-128 characters, not '.' or '..'"
# Model ids may carry a publisher prefix as on model hubs ("org/name"); they never appear in a URL path.
MODEL_ID_PATTERN = r"^[A-Za-z0-9._:/-]{1,256}(?!\n)$"
MODEL_ID_RULE = "letters, digits, '.', '_', ':', '/' and '-', 1-256 characters"

_ID = re.compile(ID_PATTERN)
_MODEL_ID = re.compile(MODEL_ID_PATTERN)


def valid_id(value: object) -> bool:
    """True for a node or pool id that orchestratord accepts."""
    return isinstance(value, str) and _ID.search(value) is not None


# Names by which Ansible means the controller itself (its implicit localhost): a node registered under one of
# them would turn the registry inventory's host into the controller, or an SSH target of that name.
RESERVED_NODE_IDS = ("localhost", "127.0.0.1")
NODE_ID_RULE = ID_RULE + ", not " + " or ".join(repr(name) for name in RESERVED_NODE_IDS)


def valid_node_id(value: object) -> bool:
    """True for a node id orchestratord accepts: an id that is not one of Ansible's names for the controller
    (compared case-insensitively: host names are)."""
    return valid_id(value) and value.lower() not in RESERVED_NODE_IDS  # type: ignore[union-attr]


def valid_model_id(value: object) -> bool:
    """True for a model id that orchestratord accepts."""
    return isinstance(value, str) and _MODEL_ID.search(value) is not None


def shown(value: str, limit: int = 40) -> str:
    """A value for a message or a log line: quoted and escaped (no forged lines), cut short when long."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


# --- node statuses --------------------------------------------------------------------------------------

NODE_STATUSES = ("registering", "online", "draining", "offline")


# --- engines --------------------------------------------------------------------------------------------

# The engine kinds an agent can run and watch; each is an adapter in pool-managerd (launch, health, slots).
ENGINE_KINDS = ("llama.cpp",)
# What an agent reads off its engine, reported per pool in every heartbeat:
#   loading  the process answers but is still loading its model (llama-server: /health 503)
#   ready    healthy with its model loaded and at least one idle slot
#   busy     healthy with its model loaded and every slot processing
#   dead     not answering: not started, crashed, hung past the read timeout, killed
# Only ready and busy serve: a pool is ready (and placement may pick it) only in those two.
ENGINE_STATES = ("loading", "ready", "busy", "dead")
ENGINE_SERVING_STATES = ("ready", "busy")
# An engine's base URL as the agent reports it and placement answers it.
ENGINE_URL_PATTERN = r"^https?://[A-Za-z0-9.:\[\]_-]{1,300}(/[^\x00-\x20\x7f]{0,200})?(?!\n)$"
ENGINE_URL_RULE = "http:// or https://, a host[:port] and an optional path, no spaces or control characters"


# --- what one node may claim ---------------------------------------------------------------------------

# orchestratord's defaults for its max_pools_per_node and max_models_per_node settings (distinct model ids
# over all of a node's pools); an agent can hold itself to the same numbers before it reports. The models
# default is MAX_MANIFEST_ENTRIES (below): a node reports what its manifest lists, so every manifest this
# contract accepts fits, and an operator who lowers the setting must keep each node's manifest under it.
DEFAULT_MAX_POOLS_PER_NODE = 64
DEFAULT_MAX_MODELS_PER_NODE = 4096


# --- certificates ---------------------------------------------------------------------------------------
#
# Fewer whole days than this left on a certificate is a warning, wherever days left are shown: status.yml
# (the default of llorch_pki_warn_days) and the cluster page. 21 leaves three weekly windows to renew in.
CERTIFICATE_WARN_DAYS = 21


def days_left(not_after_s: float, now_s: float) -> int:
    """Whole days from now_s until not_after_s (both unix seconds), rounded down: 0 on the last day, negative
    once expired (the way llorch_pki counts them)."""
    return int((not_after_s - now_s) // 86400)


# --- secret files ---------------------------------------------------------------------------------------

MIN_TOKEN_LENGTH = 32
MAX_SECRET_FILE_BYTES = 4096


class SecretFileError(ValueError):
    """A secret file that cannot be used; the message names the file, never its contents."""


def open_owner_only(path: str, what: str, max_bytes: int | None = None) -> int:
    """A read-only descriptor of `path`, a regular file that only its owner can read; the caller closes it.

    Opened without following a link (the file may sit in a folder another user can write) and checked on
    the descriptor, so what was checked is what is read: hand it on as /proc/self/fd/N to a reader that
    takes only names (ssl's load_cert_chain). With max_bytes, a larger file is refused. Raises
    SecretFileError, whose message never holds content.
    """
    path = os.path.expanduser(str(path))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise SecretFileError(f"{what} {path} not found") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SecretFileError(f"{what} {path} is a symbolic link; name the file itself") from None
        raise SecretFileError(f"{what} {path} cannot be read: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise SecretFileError(f"{what} {path} is not a regular file")
        if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise SecretFileError(
                f"{what} {path} is readable by group or others (mode {stat.S_IMODE(info.st_mode):04o}): "
                f"run chmod 600 {path}"
            )
        if max_bytes is not None and info.st_size > max_bytes:
            raise SecretFileError(f"{what} {path} is larger than {max_bytes} bytes")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_owner_only(path: str, what: str, max_bytes: int) -> tuple[str, str]:
    """(the expanded path, the UTF-8 text) of open_owner_only's file, read up to max_bytes (more is refused).

    Raises SecretFileError, whose message never holds content.
    """
    path = os.path.expanduser(str(path))
    fd = open_owner_only(path, what)
    try:
        chunks, size = [], 0
        while size <= max_bytes:  # a file may come back in pieces; read until EOF or past the bound
            chunk = os.read(fd, max_bytes + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        raw = b"".join(chunks)
    except OSError as exc:
        raise SecretFileError(f"{what} {path} cannot be read: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(raw) > max_bytes:
        raise SecretFileError(f"{what} {path} is larger than {max_bytes} bytes")
    try:
        return path, raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        # Only where, never the bytes: they are part of the secret.
        raise SecretFileError(f"{what} {path} is not UTF-8 text (at byte {exc.start})") from None


def read_secret_file(path: str, what: str = "token_file", min_length: int = MIN_TOKEN_LENGTH) -> str:
    """The one-line secret in `path`, from a regular file that only its owner can read.

    Opened without following a link, checked on the open descriptor, read up to a small bound. Raises
    SecretFileError.
    """
    path, text = _read_owner_only(path, what, MAX_SECRET_FILE_BYTES)
    secret = text.strip()
    if not secret:
        raise SecretFileError(f"{what} {path} is empty")
    if any(char.isspace() for char in secret):
        raise SecretFileError(f"{what} {path} must hold one secret on one line")
    if len(secret) < min_length:
        raise SecretFileError(f"{what} {path}: the secret must be at least {min_length} characters")
    return secret


def read_secret_lines(path: str, what: str, max_bytes: int, max_lines: int) -> list[tuple[int, str]]:
    """The meaningful lines of a multi-line secret file (several keys), as (line number, text) pairs.

    The same checks as read_secret_file (no link, owner-only, bounded, UTF-8); blank lines and lines
    starting with '#' are left out, each kept line is stripped of surrounding whitespace. More than
    max_lines such lines is refused. Raises SecretFileError; what each line means is the caller's.
    """
    path, text = _read_owner_only(path, what, max_bytes)
    lines = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if len(lines) >= max_lines:
            raise SecretFileError(f"{what} {path} holds more than {max_lines} entries")
        lines.append((number, line))
    return lines


# --- the model manifest ---------------------------------------------------------------------------------
#
# <models_dir>/manifest.json: {model_id: {path, sha256, size_bytes, mtime_ns, staged_at, source}}, written
# by staging (model_stage), read by the agent. Every open is relative to the models folder's descriptor
# and follows no link: the folder may be writable by a less trusted user than the one staging as root.

MANIFEST_NAME = "manifest.json"
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
MAX_MANIFEST_ENTRIES = 4096
_SHA256 = re.compile(r"^[0-9a-f]{64}(?!\n)$")


def valid_sha256(value: object) -> bool:
    """True for a sha256 as the manifest records it: 64 lowercase hex digits."""
    return isinstance(value, str) and _SHA256.search(value) is not None


class ManifestError(ValueError):
    """A manifest that cannot be read or is not in the manifest's format."""


def check_manifest_entry(model_id: object, entry: object) -> dict:
    """The entry when it has the manifest's shape; ManifestError naming what is wrong otherwise."""
    if not valid_model_id(model_id):
        raise ManifestError(f"{shown(str(model_id))} is not a valid model id ({MODEL_ID_RULE})")
    if not isinstance(entry, dict):
        raise ManifestError(f"entry {model_id!r} must be an object")
    path, size = entry.get("path"), entry.get("size_bytes")
    if not isinstance(path, str) or not path or "\x00" in path:
        raise ManifestError(f"entry {model_id!r} has no 'path'")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ManifestError(f"entry {model_id!r} has no whole 'size_bytes'")
    sha256 = entry.get("sha256")
    if sha256 is not None and (not isinstance(sha256, str) or not _SHA256.search(sha256)):
        raise ManifestError(f"entry {model_id!r} has a 'sha256' that is not 64 lowercase hex digits")
    mtime_ns = entry.get("mtime_ns")
    if mtime_ns is not None and (isinstance(mtime_ns, bool) or not isinstance(mtime_ns, int)):
        raise ManifestError(f"entry {model_id!r} has an 'mtime_ns' that is not a whole number")
    return entry


def parse_manifest(text: str) -> tuple[dict, list[str]]:
    """(entries, problems): the entries in the manifest's format, and one line per entry left out.

    A manifest that is not a JSON object at all raises ManifestError; one bad entry costs only itself.
    """
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise ManifestError(f"not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ManifestError(f"the top level must be an object of model ids, found {type(raw).__name__}")
    if len(raw) > MAX_MANIFEST_ENTRIES:
        raise ManifestError(f"more than {MAX_MANIFEST_ENTRIES} entries")
    entries, problems = {}, []
    for model_id, entry in raw.items():
        try:
            entries[model_id] = check_manifest_entry(model_id, entry)
        except ManifestError as exc:
            problems.append(str(exc))
    return entries, problems


def dump_manifest(entries: dict) -> bytes:
    return (json.dumps(entries, indent=2, sort_keys=True) + "\n").encode("utf-8")


def open_regular_at(dir_fd: int, name: str, flags: int = os.O_RDONLY) -> int:
    """A descriptor for `name` inside the folder `dir_fd`, refusing links, non-regular and hard-linked files.

    OSError(ELOOP) for a symbolic link; ManifestError-free so staging can use it for any file it owns.
    """
    fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, f"{name} is not a regular file")
        if info.st_nlink != 1:
            raise OSError(errno.EMLINK, f"{name} has {info.st_nlink} hard links")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_or_create_regular_at(dir_fd: int, name: str, mode: int = 0o600) -> int:
    """A read-write descriptor for `name` inside `dir_fd`: the regular, single-link file already there, or a
    new one created exclusively (O_CREAT|O_EXCL never follows or reuses a link planted at the name).

    OSError(ELOOP) for a symbolic link, EINVAL for another kind of file, EMLINK for a hard-linked one.
    """
    for _attempt in range(3):
        try:
            return open_regular_at(dir_fd, name, os.O_RDWR)
        except FileNotFoundError:
            pass
        try:
            flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            return os.open(name, flags, mode, dir_fd=dir_fd)
        except FileExistsError:
            continue  # created by another process between the two opens: open that one
    raise OSError(errno.EAGAIN, f"{name} keeps appearing and disappearing")


def open_models_dir(path: str) -> int:
    """A descriptor of the models folder, the anchor of every open, rename and lock inside it.

    The folder itself is named by the operator and may be a link (e.g. to a data disk); what lies inside
    it is opened relative to this descriptor, so a link planted inside is never followed.
    """
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def read_manifest_at(dir_fd: int) -> tuple[dict, list[str]]:
    """(entries, problems) of the manifest in the folder `dir_fd`; ({}, []) when there is none."""
    try:
        fd = open_regular_at(dir_fd, MANIFEST_NAME)
    except FileNotFoundError:
        return {}, []
    except OSError as exc:
        raise ManifestError(f"{MANIFEST_NAME} cannot be opened safely ({exc.strerror or exc})") from None
    try:
        raw = os.read(fd, MAX_MANIFEST_BYTES + 1)
        while len(raw) <= MAX_MANIFEST_BYTES:
            more = os.read(fd, MAX_MANIFEST_BYTES + 1 - len(raw))
            if not more:
                break
            raw += more
    finally:
        os.close(fd)
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"not UTF-8 text (at byte {exc.start})") from None
    return parse_manifest(text)


def write_manifest_at(dir_fd: int, entries: dict, mode: int = 0o644) -> None:
    """Replace the manifest in the folder `dir_fd` atomically: a new file, fsynced, renamed over the old."""
    for model_id, entry in entries.items():
        check_manifest_entry(model_id, entry)
    tmp_name = f".{MANIFEST_NAME}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp_name, dir_fd=dir_fd)  # a leftover of a killed run; unlink never follows a link
    fd = os.open(
        tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dir_fd
    )
    try:
        data = dump_manifest(entries)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fchmod(fd, mode)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp_name, dir_fd=dir_fd)
        raise
    os.close(fd)
    os.rename(tmp_name, MANIFEST_NAME, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    os.fsync(dir_fd)


@contextlib.contextmanager
def manifest_lock(dir_fd: int):
    """Exclusive lock for a read-modify-write of the manifest, taken on the folder itself (no lock file
    that a link could stand in for)."""
    fcntl.flock(dir_fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(dir_fd, fcntl.LOCK_UN)

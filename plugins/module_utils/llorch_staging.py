# Copyright: llorch-kit contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The model staging engine behind the model_stage module: the read/hash/write pipeline, the redirect
follower with its origin and address rules, the bounds on what a source may send, and every file operation
in the models folder (relative to its descriptor, following no link). The module is a thin front."""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import hashlib
import http.client
import ipaddress
import os
import queue
import re
import socket
import stat
import threading
import time
import urllib.error
import urllib.parse

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.urls import Request
from ansible_collections.llorch.kit.plugins.module_utils.llorch_contract import (
    MANIFEST_NAME,
    MODEL_ID_RULE,
    ManifestError,
    manifest_lock,
    open_models_dir,
    open_or_create_regular_at,
    open_regular_at,
    read_manifest_at,
    shown,
    valid_model_id,
    valid_sha256,
    write_manifest_at,
)

PARTIAL_SUFFIX = ".partial"
CHUNK_BYTES = 4 * 1024 * 1024  # big reads keep per-chunk overhead (GIL hand-offs, syscalls) negligible
PIPELINE_DEPTH = 4  # buffers in flight between the reader, hasher and writer threads
WRITEBACK_BYTES = 64 * 1024 * 1024  # how often the writer starts writeback of what it wrote
CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
MAX_REDIRECTS = 10
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
DEFAULT_PORTS = {"http": 80, "https": 443}


class SourceTooLarge(Exception):
    """The source sent more bytes than it (or size_bytes) said the file has."""


def bounded_reader(read_into, limit: int):
    """`read_into` that raises SourceTooLarge once more than `limit` bytes arrived in all.

    Each read asks for at most one byte past the limit, so a source that never ends costs limit + 1 bytes.
    """
    remaining = [limit]

    def read(view) -> int:
        count = read_into(view[: remaining[0] + 1])
        remaining[0] -= count
        if remaining[0] < 0:
            raise SourceTooLarge()
        return count

    return read


class Deadline:
    """The overall deadline of a download: a watchdog shuts the connection when it passes, so a source
    that trickles one byte at a time (never idle long enough for the read timeout) still ends."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.ends = time.monotonic() + seconds if seconds > 0 else None
        self.passed = False
        self._timer: threading.Timer | None = None

    def remaining(self) -> float | None:
        return None if self.ends is None else self.ends - time.monotonic()

    def expired(self) -> bool:
        remaining = self.remaining()
        self.passed = self.passed or (remaining is not None and remaining <= 0)
        return self.passed

    @contextlib.contextmanager
    def watching(self, response):
        remaining = self.remaining()
        if remaining is None:
            yield
            return
        # A duplicate descriptor of the same socket: shutdown() acts on the connection, so the blocked read
        # in the other thread returns at once (plain or TLS).
        sock = socket.socket(fileno=os.dup(response.fileno()))

        def expire() -> None:
            self.passed = True
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

        self._timer = threading.Timer(max(remaining, 0), expire)
        self._timer.daemon = True
        self._timer.start()
        try:
            yield
        finally:
            self._timer.cancel()
            sock.close()


def link_local_addresses(host: str, port: int | None) -> list[str]:
    """The link-local addresses (169.254.0.0/16, fe80::/10: cloud metadata services live there) that
    `host` resolves to; [] when it resolves to none or not at all (the request then fails on its own)."""
    try:
        infos = socket.getaddrinfo(host, port or 80, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return []
    found = []
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if address.is_link_local and str(address) not in found:
            found.append(str(address))
    return found


def source_secrets(source: str | None) -> list[str]:
    """The parts of a source URL that may be credentials: its password and its query (a signed URL's
    signature). Registered as no_log values, they are masked wherever they would show, the echoed
    `invocation` included, while the rest of the URL stays readable."""
    if not source:
        return []
    try:
        parts = urllib.parse.urlsplit(source)
        password = parts.password
    except ValueError:
        return []
    return [value for value in (password, parts.query) if value]


class StagingModule(AnsibleModule):
    """AnsibleModule that masks a source URL's secrets from the start, in the node's log line of the
    invocation too (that line is written inside AnsibleModule's constructor)."""

    def _log_invocation(self) -> None:
        self.no_log_values.update(source_secrets(self.params.get("source")))
        super()._log_invocation()


class StageError(Exception):
    """A failure the user can act on; its text becomes the task's msg."""


def public_url(source: str) -> str:
    """The URL without user:password and without a query string (signed URLs carry tokens there)."""
    parts = urllib.parse.urlsplit(source)
    if not parts.scheme:
        return source
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    query = "?..." if parts.query else ""
    return f"{parts.scheme}://{host}{parts.path}{query}"


def url_origin(url: str) -> tuple:
    """(scheme, host, port) of a URL, the default port filled in; ValueError for a malformed port."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or DEFAULT_PORTS.get(scheme)


def userinfo(url: str) -> str:
    """The `user:password` part of a URL as written (still percent-encoded), or ''."""
    netloc = urllib.parse.urlsplit(url).netloc
    return netloc.rpartition("@")[0]


def with_userinfo(url: str, info: str) -> str:
    """The URL with its userinfo replaced by `info` ('' removes it)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{info}@{host}" if info else host))


def human_bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{count} B"
        value /= 1024
    return f"{count} B"


def utc_now() -> str:
    # timezone.utc rather than the 3.11+ alias: nodes may run an older Python than the controller.
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")  # noqa: UP017


# --- manifest -------------------------------------------------------------------------------------------
#
# Every file operation below is relative to the models folder's descriptor and follows no link: the folder
# may once have belonged to a less trusted user than root, who runs this module (see the contract).


def read_manifest_with_problems(dir_fd: int, models_dir: str) -> tuple[dict, list[str]]:
    """(valid entries, one line per entry left out); StageError when it cannot be read safely at all."""
    try:
        return read_manifest_at(dir_fd)
    except ManifestError as exc:
        path = os.path.join(models_dir, MANIFEST_NAME)
        raise StageError(f"manifest {path}: {exc}; fix or move it away") from None


def read_manifest(dir_fd: int, models_dir: str) -> dict:
    """The manifest's valid entries; StageError when it cannot be read safely or is not a JSON object."""
    return read_manifest_with_problems(dir_fd, models_dir)[0]


def update_manifest(dir_fd: int, models_dir: str, model_id: str, entry: dict | None) -> list[str]:
    """Set (or with entry=None remove) one model's entry, keeping every other task's entries.

    Returns one line per entry of the old manifest that was not in the manifest's format and so is not
    written again (the agent never reported it either): the caller warns, so nothing goes silently.
    """
    with manifest_lock(dir_fd):
        manifest, problems = read_manifest_with_problems(dir_fd, models_dir)
        if entry is None:
            manifest.pop(model_id, None)
        else:
            manifest[model_id] = entry
        write_manifest_at(dir_fd, manifest)
    path = os.path.join(models_dir, MANIFEST_NAME)
    return [f"manifest {path}: dropped an entry not in the manifest's format: {line}" for line in problems]


def is_plain_dest(dest: str) -> bool:
    """A model file's name: one component, not hidden, neither a partial file nor the manifest."""
    return (
        bool(dest)
        and "/" not in dest
        and "\x00" not in dest
        and not dest.startswith(".")
        and not (dest.endswith(PARTIAL_SUFFIX) or dest == MANIFEST_NAME)
    )


def regular_stat(dir_fd: int, name: str) -> os.stat_result | None:
    """stat of `name` in the folder when it is a regular, single-link file (a link is not followed)."""
    try:
        info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        return None
    return info


def is_staged(
    entry: dict | None, dir_fd: int, dest: str, path: str, sha256: str, size_bytes: int | None
) -> bool:
    """True when the manifest entry and the file's stat still agree; never reads the file."""
    if not isinstance(entry, dict):
        return False
    if entry.get("path") != path or str(entry.get("sha256", "")).lower() != sha256:
        return False
    if size_bytes is not None and entry.get("size_bytes") != size_bytes:
        return False
    info = regular_stat(dir_fd, dest)
    if info is None:
        return False
    return info.st_size == entry.get("size_bytes") and info.st_mtime_ns == entry.get("mtime_ns")


def manifest_entry(path: str, info: os.stat_result, sha256: str, source: str) -> dict:
    return {
        "path": path,
        "sha256": sha256,
        "size_bytes": info.st_size,
        "staged_at": utc_now(),
        "mtime_ns": info.st_mtime_ns,
        "source": public_url(source),
    }


# --- streaming: read, hash and write overlap ------------------------------------------------------------


def stream_into(read_into, fd: int, hasher) -> int:
    """Copy everything `read_into(buffer) -> n` yields into `fd`, hashing it on the way.

    The calling thread reads; one thread hashes and one writes, each on a different buffer, so a transfer
    costs about its slowest stage rather than the sum of the three. Bytes already read are hashed and
    written even when the read fails, so the partial file keeps them for a resume. Returns bytes written.
    """
    free_buffers: queue.Queue = queue.Queue()
    for _buffer in range(PIPELINE_DEPTH):
        free_buffers.put(bytearray(CHUNK_BYTES))
    to_hash: queue.Queue = queue.Queue()
    to_write: queue.Queue = queue.Queue()
    failures: list[BaseException] = []
    written = [0]

    def hash_worker() -> None:
        while (item := to_hash.get()) is not None:
            buffer, length = item
            if not failures:
                hasher.update(memoryview(buffer)[:length])
            to_write.put(item)
        to_write.put(None)

    def write_worker() -> None:
        flushed_to = start = os.lseek(fd, 0, os.SEEK_CUR)
        while (item := to_write.get()) is not None:
            buffer, length = item
            view = memoryview(buffer)[:length]
            try:
                while view and not failures:
                    count = os.write(fd, view)
                    view = view[count:]
                    written[0] += count
                if start + written[0] - flushed_to >= WRITEBACK_BYTES:
                    # Start writeback of what is written so far (async, like sync_file_range), so the final
                    # fsync waits for the last few MiB, not for the whole file.
                    os.posix_fadvise(fd, flushed_to, start + written[0] - flushed_to, os.POSIX_FADV_DONTNEED)
                    flushed_to = start + written[0]
            except OSError as exc:
                failures.append(exc)
            free_buffers.put(buffer)

    workers = [
        threading.Thread(target=hash_worker, daemon=True),
        threading.Thread(target=write_worker, daemon=True),
    ]
    for worker in workers:
        worker.start()
    read_error: BaseException | None = None
    try:
        while not failures:
            buffer = free_buffers.get()
            view = memoryview(buffer)
            filled = 0
            while filled < CHUNK_BYTES:
                count = read_into(view[filled:])
                if not count:
                    break
                filled += count
            if filled:
                to_hash.put((buffer, filled))
            if filled < CHUNK_BYTES:
                break
    except BaseException as exc:  # keep what arrived; the caller reports the failure
        read_error = exc
    finally:
        to_hash.put(None)
        for worker in workers:
            worker.join()
    if failures:
        raise failures[0]
    if read_error is not None:
        raise read_error
    return written[0]


def hash_existing(fd: int, length: int, hasher) -> None:
    os.lseek(fd, 0, os.SEEK_SET)
    remaining = length
    while remaining:
        block = os.read(fd, min(CHUNK_BYTES, remaining))
        if not block:
            raise StageError(
                f"partial file shrank while it was being read ({length - remaining} of {length})"
            )
        hasher.update(block)
        remaining -= len(block)


# --- the staging job ------------------------------------------------------------------------------------


class Stager:
    def __init__(self, module: AnsibleModule):
        self.module = module
        params = module.params
        self.model_id: str = params["id"]
        self.models_dir: str = os.path.abspath(params["models_dir"])
        self.source: str | None = params["source"]
        self.is_url = bool(self.source) and urllib.parse.urlsplit(self.source).scheme in ("http", "https")
        self.sha256: str = (params["sha256"] or "").lower()
        self.size_bytes: int | None = params["size_bytes"]
        self.dir_fd: int | None = None
        self.result: dict = {
            "changed": False,
            "manifest": os.path.join(self.models_dir, MANIFEST_NAME),
            "removed_partials": [],
        }
        if self.source:
            self.result["source"] = public_url(self.source)
        self.deadline = Deadline(module.params["total_timeout"])

    def close(self) -> None:
        if self.dir_fd is not None:
            os.close(self.dir_fd)
            self.dir_fd = None

    def in_dir(self, name: str) -> str:
        return os.path.join(self.models_dir, name)

    # -- validation

    def validate(self) -> None:
        params = self.module.params
        if not valid_model_id(self.model_id):
            # The registry's own rule: an id it would refuse in the manifest fails every heartbeat later.
            raise StageError(
                f"id {shown(self.model_id)} is not a model id the registry accepts: {MODEL_ID_RULE}"
            )
        try:
            self.dir_fd = open_models_dir(self.models_dir)
        except (FileNotFoundError, NotADirectoryError):
            # In check mode the directory may be one that an earlier task would have created.
            if not self.module.check_mode:
                raise StageError(
                    f"models_dir {self.models_dir} does not exist or is not a directory"
                ) from None
        if params["state"] == "absent":
            if params["dest"] is not None:
                self.check_dest(params["dest"])
            return
        if not self.source:
            raise StageError("source is required with state=present")
        if not valid_sha256(self.sha256):  # lowercased above: any case is accepted from the inventory
            raise StageError(
                f"sha256 for model {self.model_id} must be 64 hex digits, got {params['sha256']!r}"
            )
        if self.size_bytes is not None and self.size_bytes < 0:
            raise StageError(f"size_bytes for model {self.model_id} must not be negative")
        scheme = urllib.parse.urlsplit(self.source).scheme
        if self.is_url:
            try:
                url_origin(self.source)
            except ValueError as exc:
                raise StageError(
                    f"source {public_url(self.source)} for model {self.model_id} is not a valid URL ({exc})"
                ) from exc
        if not self.is_url and (scheme or not os.path.isabs(self.source)):
            raise StageError(
                f"source {public_url(self.source)} for model {self.model_id} must be an http(s):// URL "
                "or an absolute path on the node"
            )
        dest = params["dest"] or self.default_dest()
        self.check_dest(dest)
        self.dest = dest
        self.partial_name = dest + PARTIAL_SUFFIX
        self.path = self.in_dir(dest)
        self.partial_path = self.in_dir(self.partial_name)
        self.result["path"] = self.path

    def check_dest(self, dest: str) -> None:
        """One rule for every state: a plain name inside models_dir that no other staging file uses."""
        if not is_plain_dest(dest):
            raise StageError(
                f"dest {dest!r} for model {self.model_id} must be a plain file name inside models_dir "
                f"(no '/', not hidden, not ending in {PARTIAL_SUFFIX}, not {MANIFEST_NAME})"
            )

    def default_dest(self) -> str:
        if self.is_url:
            name = urllib.parse.unquote(urllib.parse.urlsplit(self.source).path.rsplit("/", 1)[-1])
        else:
            name = os.path.basename(self.source)
        if not name:
            raise StageError(f"cannot take a file name from source {public_url(self.source)}; set dest")
        return name

    def read_manifest(self) -> dict:
        return read_manifest(self.dir_fd, self.models_dir)

    def update_manifest(self, entry: dict | None) -> None:
        dropped = update_manifest(self.dir_fd, self.models_dir, self.model_id, entry)
        if dropped:
            self.result.setdefault("warnings", []).extend(dropped)

    def exists(self, name: str) -> bool:
        try:
            os.stat(name, dir_fd=self.dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return True

    # -- state=absent

    def remove(self) -> dict:
        if self.dir_fd is None:
            self.result.update(
                path="", msg=f"model {self.model_id} is not staged ({self.models_dir} does not exist)"
            )
            return self.result
        manifest = self.read_manifest()
        entry = manifest.get(self.model_id)
        names = []
        if isinstance(entry, dict) and isinstance(entry.get("path"), str):
            path = entry["path"]
            # Only ever delete inside models_dir, whatever a hand-edited manifest says.
            name = os.path.basename(path)
            if os.path.dirname(os.path.abspath(path)) == self.models_dir and is_plain_dest(name):
                names += [name, name + PARTIAL_SUFFIX]
            self.result["path"] = path
        if self.module.params["dest"]:
            name = self.module.params["dest"]
            names += [name, name + PARTIAL_SUFFIX]
            self.result.setdefault("path", self.in_dir(name))
        self.result.setdefault("path", "")
        existing = sorted({name for name in names if self.exists(name)})
        if entry is None and not existing:
            self.result["msg"] = f"model {self.model_id} is not staged"
            return self.result
        self.result["changed"] = True
        self.result["removed_partials"] = [self.in_dir(n) for n in existing if n.endswith(PARTIAL_SUFFIX)]
        paths = ", ".join(self.in_dir(name) for name in existing)
        if self.module.check_mode:
            self.result["msg"] = f"would remove model {self.model_id}: {paths or 'manifest entry'}"
            return self.result
        self.update_manifest(None)
        for name in existing:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=self.dir_fd)  # unlink removes a link itself, never its target
        os.fsync(self.dir_fd)
        self.result["msg"] = f"removed model {self.model_id}"
        return self.result

    # -- state=present

    def stage(self) -> dict:
        manifest = {} if self.dir_fd is None else self.read_manifest()
        self.result.update(
            sha256=self.sha256,
            size_bytes=self.size_bytes or 0,
            bytes_downloaded=0,
            resumed_from=0,
            seconds=0.0,
            mb_per_s=0.0,
        )
        for other_id, other in manifest.items():
            if other_id != self.model_id and isinstance(other, dict) and other.get("path") == self.path:
                raise StageError(
                    f"{self.path} already holds model {other_id}; give model {self.model_id} its own dest"
                )
        force = self.module.params["force"]
        if not force and self.already_staged(manifest):
            self.result["size_bytes"] = manifest[self.model_id]["size_bytes"]
            self.result["msg"] = f"model {self.model_id} is already staged at {self.path}"
            return self.result
        self.result["changed"] = True
        if self.module.check_mode:
            return self.plan()
        if self.size_bytes is not None:
            # Before any file is created; fetch() checks again once it knows what the partial file holds.
            self.check_free_space(self.size_bytes - min(self.partial_size(), self.size_bytes))
        self.remove_stale_partials()
        with self.locked_partial() as fd:
            # Another task may have finished this model while we waited for the partial file.
            manifest = self.read_manifest()
            if not force and self.already_staged(manifest):
                os.unlink(self.partial_name, dir_fd=self.dir_fd)
                self.result["changed"] = False
                self.result["size_bytes"] = manifest[self.model_id]["size_bytes"]
                self.result["msg"] = f"model {self.model_id} was staged by another task at {self.path}"
                return self.result
            if not force and self.adopt_existing_file():
                os.unlink(self.partial_name, dir_fd=self.dir_fd)
                return self.result
            if force:
                os.ftruncate(fd, 0)
            started = time.monotonic()
            self.fetch(fd)
            seconds = time.monotonic() - started
            os.fsync(fd)
            os.fchmod(fd, 0o644)
            staged = os.fstat(fd)
            # rename() replaces whatever is at the final name, a link included, and never follows it.
            os.rename(self.partial_name, self.dest, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
        os.fsync(self.dir_fd)
        self.update_manifest(manifest_entry(self.path, staged, self.sha256, self.source))
        downloaded = self.result["bytes_downloaded"]
        self.result.update(
            size_bytes=staged.st_size,
            seconds=round(seconds, 3),
            mb_per_s=round(downloaded / seconds / 1e6, 1) if seconds > 0 else 0.0,
        )
        verb = "downloaded" if self.is_url else "copied"
        resumed = f", resumed at byte {self.result['resumed_from']}" if self.result["resumed_from"] else ""
        self.result["msg"] = (
            f"{verb} {human_bytes(downloaded)} for model {self.model_id} in {seconds:.1f} s "
            f"({self.result['mb_per_s']} MB/s{resumed}); sha256 verified"
        )
        return self.result

    def already_staged(self, manifest: dict) -> bool:
        entry = manifest.get(self.model_id)
        return is_staged(entry, self.dir_fd, self.dest, self.path, self.sha256, self.size_bytes)

    def plan(self) -> dict:
        """Check mode: what a real run would fetch; reads nothing but stat results."""
        partial = self.partial_size()
        if self.module.params["force"]:
            partial = 0
        if self.size_bytes is not None and self.dir_fd is not None:
            self.check_free_space(self.size_bytes - min(partial, self.size_bytes))
        resume = f", resuming at byte {partial}" if partial and self.is_url else ""
        self.result["resumed_from"] = partial if self.is_url else 0
        self.result["msg"] = (
            f"would stage model {self.model_id} from {public_url(self.source)} to {self.path}{resume}"
        )
        return self.result

    def partial_size(self) -> int:
        if self.dir_fd is None:
            return 0
        info = regular_stat(self.dir_fd, self.partial_name)
        return info.st_size if info is not None else 0

    def check_free_space(self, needed: int) -> None:
        info = os.statvfs(self.dir_fd)
        available = info.f_bavail * info.f_frsize
        if needed > available:
            raise StageError(
                f"not enough free space in {self.models_dir} for model {self.model_id}: "
                f"need {needed} bytes ({human_bytes(needed)}), "
                f"{available} bytes ({human_bytes(available)}) available"
            )

    def remove_stale_partials(self) -> None:
        max_age_hours = self.module.params["partial_max_age_hours"]
        if not max_age_hours or max_age_hours <= 0:
            return
        cutoff = time.time() - max_age_hours * 3600
        for name in sorted(os.listdir(self.dir_fd)):
            if not name.endswith(PARTIAL_SUFFIX) or name == self.partial_name:
                continue
            info = regular_stat(self.dir_fd, name)
            if info is None or info.st_mtime >= cutoff:
                continue  # fresh, gone, or not a file staging made (a link is left alone)
            try:
                fd = open_regular_at(self.dir_fd, name)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a running download holds its lock: skip it
            except OSError:
                os.close(fd)
                continue
            try:
                os.unlink(name, dir_fd=self.dir_fd)
                self.result["removed_partials"].append(self.in_dir(name))
            finally:
                os.close(fd)

    @contextlib.contextmanager
    def locked_partial(self):
        """Open (or create) this model's partial file holding an exclusive lock on it.

        Never through a link planted at the name: that would make root write, chmod and rename whatever
        the link points to."""
        for _attempt in range(5):
            try:
                fd = open_or_create_regular_at(self.dir_fd, self.partial_name, 0o600)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise StageError(
                        f"{self.partial_path} is a symbolic link, not a partial file staging made; "
                        "remove it and run again"
                    ) from None
                if exc.errno in (errno.EINVAL, errno.EMLINK):
                    raise StageError(
                        f"{self.partial_path} is not a plain file staging made ({exc.strerror}); "
                        "remove it and run again"
                    ) from None
                raise
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EAGAIN, errno.EACCES):
                    raise StageError(
                        f"another task is staging into {self.partial_path} right now; "
                        "run again when it is done"
                    ) from None
                raise
            # The holder may have renamed the file between our open and our lock: then retry on the new one.
            current = regular_stat(self.dir_fd, self.partial_name)
            if current is not None and current.st_ino == os.fstat(fd).st_ino:
                break
            os.close(fd)
        else:
            raise StageError(f"could not lock {self.partial_path}")
        try:
            yield fd
        except BaseException:
            # An empty partial file is no progress worth keeping for a resume.
            if os.fstat(fd).st_size == 0:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.partial_name, dir_fd=self.dir_fd)
            raise
        finally:
            os.close(fd)

    def adopt_existing_file(self) -> bool:
        """A file already at the final name with the right content is recorded, not fetched again."""
        try:
            fd = open_regular_at(self.dir_fd, self.dest)
        except OSError:
            return False  # none, or a link or special file: the rename will replace it
        try:
            info = os.fstat(fd)
            if self.size_bytes is not None and info.st_size != self.size_bytes:
                return False
            hasher = hashlib.sha256()
            hash_existing(fd, info.st_size, hasher)
        finally:
            os.close(fd)
        if hasher.hexdigest() != self.sha256:
            return False
        self.update_manifest(manifest_entry(self.path, info, self.sha256, self.source))
        self.result["size_bytes"] = info.st_size
        self.result["msg"] = (
            f"recorded the existing file {self.path} for model {self.model_id} (sha256 verified)"
        )
        return True

    def fetch(self, fd: int) -> None:
        """Fill the partial file and verify it; on return it holds exactly the expected bytes."""
        existing = os.fstat(fd).st_size
        if not self.is_url or (self.size_bytes is not None and existing > self.size_bytes):
            # A local copy is fast, so it starts over rather than trusting a stale partial file.
            os.ftruncate(fd, 0)
            existing = 0
        if self.size_bytes is not None:
            self.check_free_space(self.size_bytes - existing)
        self.hasher = hashlib.sha256()
        if self.is_url:
            hash_existing(fd, existing, self.hasher)
            headers = {str(k): str(v) for k, v in (self.module.params["headers"] or {}).items()}
            if existing and existing == self.size_bytes:
                # A run that stopped after the last byte but before the rename: only the check is left.
                written, resumed_from = 0, existing
            else:
                written, resumed_from = self.download(fd, existing, headers)
        else:
            written, resumed_from = self.copy_local(fd), 0
        self.result["bytes_downloaded"] = written
        self.result["resumed_from"] = resumed_from
        digest = self.hasher.hexdigest()
        if digest != self.sha256:
            os.unlink(self.partial_name, dir_fd=self.dir_fd)
            raise StageError(
                f"sha256 mismatch for model {self.model_id} from {public_url(self.source)}: "
                f"expected {self.sha256}, got {digest}; the partial file was deleted"
            )

    def open_local_source(self) -> int:
        """The source file on the node, read-only. Inside models_dir (the role's controller copies land
        there) it is opened like every other file there: relative, no link followed."""
        if os.path.dirname(self.source) == self.models_dir:
            fd = open_regular_at(self.dir_fd, os.path.basename(self.source))
        else:
            fd = os.open(self.source, os.O_RDONLY | os.O_CLOEXEC)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(errno.EINVAL, "not a regular file")
        return fd

    def copy_local(self, fd: int) -> int:
        try:
            source_fd = self.open_local_source()
        except OSError as exc:
            raise StageError(
                f"cannot read source {self.source} for model {self.model_id}: {exc.strerror or exc}"
            ) from None
        try:
            size = os.fstat(source_fd).st_size
            if self.size_bytes is not None and size != self.size_bytes:
                raise StageError(f"source {self.source} has {size} bytes, size_bytes says {self.size_bytes}")
            self.check_free_space(size)
            os.lseek(fd, 0, os.SEEK_SET)
            return stream_into(lambda view: os.readv(source_fd, [view]), fd, self.hasher)
        finally:
            os.close(source_fd)

    def open_url(self, url: str, headers: dict):
        """One request, redirects not followed: the response, or the HTTPError for an error or redirect
        status (it carries status and headers too)."""
        params = self.module.params
        try:
            return Request().open(
                "GET",
                url,
                headers=headers,
                validate_certs=params["validate_certs"],
                timeout=self.request_timeout(url),
                # urllib would send every header, credentials included, to whatever host a redirect
                # names; open_following() follows them itself.
                follow_redirects="none",
                decompress=False,
            )
        except urllib.error.HTTPError as exc:
            return exc
        except Exception as exc:
            reason = getattr(exc, "reason", None) or exc
            raise StageError(
                f"cannot fetch model {self.model_id} from {self.describe(url)}: {reason}"
            ) from exc

    def request_timeout(self, url: str) -> float:
        """The read timeout, shortened to what is left of the overall deadline."""
        if self.deadline.expired():
            raise self.deadline_error(url, None)
        remaining = self.deadline.remaining()
        timeout = self.module.params["timeout"]
        return timeout if remaining is None else max(min(timeout, remaining), 0.1)

    def deadline_error(self, url: str, fd: int | None) -> StageError:
        kept = ""
        if fd is not None and os.fstat(fd).st_size:
            kept = f"; the partial file keeps {os.fstat(fd).st_size} bytes for the next run to resume"
        return StageError(
            f"fetching model {self.model_id} from {self.describe(url)} did not finish within total_timeout "
            f"{self.deadline.seconds:g} s{kept}"
        )

    def describe(self, url: str) -> str:
        """The source for a message, and where a redirect led, without credentials or query strings."""
        if url == self.source:
            return public_url(self.source)
        return f"{public_url(self.source)} (redirected to {public_url(url)})"

    def open_following(self, user_headers: dict, extra_headers: dict):
        """Request the source, following up to MAX_REDIRECTS redirects; returns (response or HTTPError, url).

        The user's headers and URL credentials go only to the source's own origin (scheme, host, port):
        once a redirect leaves it (a model hub sending the download on to a CDN with a signed URL), every
        later request carries neither. curl and requests drop only Authorization and Cookie there; every
        user header goes here, since `headers` is no_log and any of them may hold a secret (X-Api-Key...).
        A redirect from https to http is refused.
        `extra_headers` (Range) go to every hop.
        """
        url = self.source
        origin = url_origin(url)
        trusted = True
        redirects = 0
        while True:
            headers = dict(user_headers, **extra_headers) if trusted else dict(extra_headers)
            response = self.open_url(url, headers)
            if not isinstance(response, urllib.error.HTTPError) or response.code not in REDIRECT_STATUSES:
                return response, url
            location = response.headers.get("Location") if response.headers else None
            response.close()
            if redirects == MAX_REDIRECTS:
                raise StageError(
                    f"too many redirects (more than {MAX_REDIRECTS}) fetching model {self.model_id} from "
                    f"{self.describe(url)}"
                )
            redirects += 1
            if not location:
                raise StageError(
                    f"HTTP {response.code} without a Location fetching model {self.model_id} "
                    f"from {self.describe(url)}"
                )
            target = urllib.parse.urljoin(url, location.strip().replace(" ", "%20"))
            try:
                target_origin = url_origin(target)
            except ValueError:
                target_origin = None
            if target_origin is None or target_origin[0] not in ("http", "https"):
                raise StageError(
                    f"{self.describe(url)} redirected model {self.model_id} to {public_url(target)}, "
                    "which is not an http(s) URL"
                )
            if urllib.parse.urlsplit(url).scheme == "https" and target_origin[0] == "http":
                raise StageError(
                    f"refusing the redirect of {self.describe(url)} to {public_url(target)} for model "
                    f"{self.model_id}: it would downgrade https to plain http"
                )
            if not self.module.params["allow_link_local_redirects"]:
                link_local = link_local_addresses(target_origin[1].strip("[]"), target_origin[2])
                if link_local:
                    raise StageError(
                        f"refusing the redirect of {self.describe(url)} to {public_url(target)} for model "
                        f"{self.model_id}: it names the link-local address {', '.join(link_local)} (where "
                        "cloud metadata services answer); set allow_link_local_redirects to allow it"
                    )
            trusted = trusted and target_origin == origin
            url = with_userinfo(target, userinfo(self.source) if trusted else "")

    def download(self, fd: int, existing: int, headers: dict) -> tuple[int, int]:
        """Fetch the rest of the file after `existing` bytes; returns (bytes fetched, resumed_from)."""
        response, url = self.open_following(headers, {"Range": f"bytes={existing}-"} if existing else {})
        if isinstance(response, urllib.error.HTTPError):
            response.close()
            if response.code == 416 and existing:
                # The server will not resume at this offset (the file changed?): start from the beginning.
                os.ftruncate(fd, 0)
                self.hasher = hashlib.sha256()
                return self.download(fd, 0, headers)
            keep = " (the partial file stays for the next run)" if existing else ""
            raise StageError(
                f"HTTP {response.code} {response.reason} fetching model {self.model_id} from "
                f"{self.describe(url)}{keep}"
            )
        with response:
            status = response.status
            total = self.announced_total(response, status, existing, url)
            if status != 206 and existing:
                # The server ignored Range and sends the whole file: drop what the partial file held.
                os.ftruncate(fd, 0)
                self.hasher = hashlib.sha256()
                existing = 0
            if self.size_bytes is not None and total is not None and total != self.size_bytes:
                raise StageError(
                    f"{self.describe(url)} has {total} bytes, but size_bytes for model {self.model_id} "
                    f"says {self.size_bytes}"
                )
            if self.size_bytes is None and total is None:
                raise StageError(
                    f"{self.describe(url)} announced no length for model {self.model_id} and size_bytes is "
                    "not set: set size_bytes, so that a source that never ends cannot fill the disk"
                )
            if self.size_bytes is None:
                self.check_free_space(total - existing)
            expected = self.size_bytes if self.size_bytes is not None else total
            os.lseek(fd, existing, os.SEEK_SET)
            try:
                with self.deadline.watching(response):
                    reader = bounded_reader(response.readinto, expected - existing)
                    written = stream_into(reader, fd, self.hasher)
            except SourceTooLarge:
                os.unlink(self.partial_name, dir_fd=self.dir_fd)
                raise StageError(
                    f"{self.describe(url)} sent more than the {expected} bytes of model {self.model_id}; "
                    "stopped, and the partial file was deleted"
                ) from None
            except (OSError, ValueError, EOFError, http.client.HTTPException) as exc:
                if self.deadline.passed:
                    raise self.deadline_error(url, fd) from None
                raise StageError(
                    f"connection to {self.describe(url)} failed while fetching model {self.model_id} "
                    f"({exc!r}); the partial file keeps {os.fstat(fd).st_size} bytes "
                    "for the next run to resume"
                ) from exc
            if self.deadline.passed:
                raise self.deadline_error(url, fd)
            if existing + written != expected:
                raise StageError(
                    f"connection to {self.describe(url)} dropped after {existing + written} of {expected} "
                    f"bytes of model {self.model_id}; the partial file stays for the next run to resume"
                )
        return written, existing

    def announced_total(self, response, status: int, existing: int, url: str) -> int | None:
        """The full file size the server announced, from Content-Range (206) or Content-Length (200)."""
        if status == 206:
            match = CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
            if not match or int(match.group(1)) != existing:
                raise StageError(
                    f"{self.describe(url)} answered a resume at byte {existing} with Content-Range "
                    f"{response.headers.get('Content-Range')!r}; delete {self.partial_path} and run again"
                )
            return int(match.group(3)) if match.group(3) != "*" else None
        length = response.headers.get("Content-Length")
        return int(length) if length and length.isdigit() else None

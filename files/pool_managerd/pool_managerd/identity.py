"""The node's identity with the control plane: which secret the agent presents, and how it gets a better one.

Order at start (the first that applies):
  1. the stored node token (credential_dir/node-token), not yet expired: use it;
  2. the stored recovery token (credential_dir/recovery-token): join with it;
  3. join_token_file: join with it;
  4. token_file: the cluster's shared token, as before node identities (an admin credential: move nodes
     to join tokens).
A join answers a node token bound to this node_id and a single-use recovery token; both are written to
credential_dir (0600, replaced atomically) before they are used, so a crash never loses the only copy.

The join token file holds `sha256:<64 hex>::<secret>` (the pin of the cluster CA, k3s-style) or, for a
plain-http lab, the secret alone. Over https the pin must match a certificate of ca_file (during a CA
rotation it holds the old and the new CA) before the join secret leaves the node: a node pointed at an
impostor's CA never hands it a credential.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import ssl
import stat
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from .contract import SecretFileError, read_secret_file, read_secret_lines

log = logging.getLogger(__name__)

NODE_TOKEN = "node-token"
RECOVERY_TOKEN = "recovery-token"
MAX_CA_FILE_BYTES = 1024 * 1024
_PINNED = re.compile(r"^sha256:([0-9a-f]{64})::(\S+)$")
_PEM_CERTIFICATE = re.compile(
    r"-----BEGIN CERTIFICATE-----\s+([A-Za-z0-9+/=\s]+?)-----END CERTIFICATE-----", re.ASCII
)


class IdentityError(Exception):
    """A person must act (a pin that does not match, a join token file that cannot be read): one line."""


@dataclass(frozen=True)
class JoinSecret:
    secret: str
    pin: str | None  # hex sha256 of the CA certificate's DER, or None (plain http only)


def ca_pins(ca_file: str) -> list[str]:
    """sha256 (hex) of the DER of every certificate in ca_file, in file order: what `llorch_certificate`
    returns as a CA's `sha256`. A bundle holds two CAs while a rotation overlaps the old and the new one."""
    try:
        with open(ca_file, "rb") as handle:
            text = handle.read(MAX_CA_FILE_BYTES).decode("ascii", "replace")
    except OSError as error:
        raise IdentityError(f"ca_file {ca_file} cannot be read: {error.strerror}") from None
    pins = []
    for match in _PEM_CERTIFICATE.finditer(text):
        pem = f"-----BEGIN CERTIFICATE-----\n{match.group(1).strip()}\n-----END CERTIFICATE-----\n"
        try:
            der = ssl.PEM_cert_to_DER_cert(pem)
        except ValueError:
            raise IdentityError(f"ca_file {ca_file}: certificate {len(pins) + 1} is not valid PEM") from None
        pins.append(hashlib.sha256(der).hexdigest())
    if not pins:
        raise IdentityError(f"ca_file {ca_file} holds no PEM certificate")
    return pins


def read_join_secret(path: str) -> JoinSecret:
    try:
        text = read_secret_file(path, what="join_token_file")
    except SecretFileError as error:
        raise IdentityError(str(error)) from None
    pinned = _PINNED.match(text)
    if pinned:
        return JoinSecret(pinned.group(2), pinned.group(1))
    if text.startswith("sha256:"):
        raise IdentityError(
            f"join_token_file {path}: expected sha256:<64 lowercase hex>::<secret> or the secret alone"
        )
    return JoinSecret(text, None)


def check_pin(join: JoinSecret, control_url: str, ca_file: str | None, where: str) -> None:
    """Before a join secret goes out over https: the CA it trusts is the one the token names."""
    if not control_url.startswith("https://"):
        return
    if join.pin is None:
        raise IdentityError(
            f"{where}: the control plane is https but the join token carries no CA pin "
            "(expected sha256:<pin>::<secret>); the join secret was not sent"
        )
    if ca_file is None:
        raise IdentityError(f"{where}: set ca_file to the cluster CA so its pin can be checked")
    found = ca_pins(ca_file)
    if join.pin not in found:
        held = ", ".join(f"sha256:{pin[:12]}..." for pin in found)
        raise IdentityError(
            f"ca_file {ca_file} ({held}) does not hold the CA the join token pins "
            f"(sha256:{join.pin[:12]}...); the join secret was not sent"
        )


def _expiry(text: str) -> float | None:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class CredentialStore:
    """credential_dir: the node token (and its expiry) and the recovery token, each 0600, replaced
    atomically (a temporary file beside it, fsynced, renamed, the folder fsynced)."""

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)

    def _ensure_directory(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = os.lstat(self.directory)
        if not stat.S_ISDIR(info.st_mode):
            raise IdentityError(f"credential_dir {self.directory} is not a folder")
        if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise IdentityError(
                f"credential_dir {self.directory} is open to group or others "
                f"(mode {stat.S_IMODE(info.st_mode):04o}): run chmod 700 {self.directory}"
            )

    def _write(self, name: str, text: str) -> None:
        self._ensure_directory()
        temporary = self.directory / f".{name}.tmp"
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()  # what a crash mid-write left; never followed if it is a link
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, text.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, self.directory / name)
        directory_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory_fd)
        finally:
            os.close(directory_fd)

    def save_node_token(self, token: str, expires_at: str) -> None:
        self._write(NODE_TOKEN, f"{token}\n{expires_at}\n")

    def save_recovery_token(self, token: str) -> None:
        self._write(RECOVERY_TOKEN, f"{token}\n")

    def node_token(self, now: float) -> str | None:
        """The stored node token while it has not expired; None when absent, expired or unreadable."""
        path = self.directory / NODE_TOKEN
        if not path.exists():
            return None
        try:
            lines = [line for _number, line in read_secret_lines(str(path), "node token", 4096, 2)]
        except SecretFileError as error:
            log.warning("%s; joining again", error)
            return None
        expires_at = _expiry(lines[1]) if len(lines) == 2 else None
        if expires_at is None:
            log.warning("node token %s has no readable expiry; joining again", path)
            return None
        if expires_at <= now:
            log.info("the stored node token expired at %s; joining again", lines[1])
            return None
        return lines[0]

    def recovery_token(self) -> str | None:
        path = self.directory / RECOVERY_TOKEN
        if not path.exists():
            return None
        try:
            return read_secret_file(str(path), what="recovery token")
        except SecretFileError as error:
            log.warning("%s; not used", error)
            return None

    def forget_node_token(self) -> None:
        """A node token the control plane refused (revoked, or unknown to it): never presented again."""
        with contextlib.suppress(FileNotFoundError):
            (self.directory / NODE_TOKEN).unlink()

    def forget_recovery_token(self) -> None:
        """A recovery token the control plane refused (spent, expired, revoked): never tried again."""
        with contextlib.suppress(FileNotFoundError):
            (self.directory / RECOVERY_TOKEN).unlink()


@dataclass
class JoinCandidate:
    """A secret that can buy a node token: the stored recovery token, or the join token file's."""

    what: str  # for log lines: "the recovery token", "join_token_file /etc/..."
    secret: JoinSecret
    recovery: bool = False


def join_candidates(store: CredentialStore, join_token_file: str | None) -> list[JoinCandidate]:
    candidates = []
    recovery = store.recovery_token()
    if recovery is not None:
        # The node's own, made by the daemon this agent talks to: no pin (none was handed out with it); the
        # channel is the one ca_file already verifies.
        candidates.append(JoinCandidate("the recovery token", JoinSecret(recovery, None), recovery=True))
    if join_token_file is None:
        return candidates
    if not os.path.lexists(join_token_file):
        # Deleted once the node joined (the role does so): a node back after its token expired goes on with
        # its recovery token, and without one the caller says that nothing is left to join with.
        log.info("join_token_file %s is gone (deleted after the join); not used", join_token_file)
        return candidates
    try:
        secret = read_join_secret(join_token_file)
    except IdentityError as error:
        if not candidates:
            raise
        # A broken join token must not keep a working recovery token from being tried.
        log.warning("%s; trying the recovery token alone", error)
        return candidates
    candidates.append(JoinCandidate(f"join_token_file {join_token_file}", secret))
    return candidates


def now() -> float:
    return time.time()

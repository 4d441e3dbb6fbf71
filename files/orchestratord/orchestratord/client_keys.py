"""The client API keys (/etc/llorch/client-keys): who may call /v1/*, each key known by a name.

One key per line as `<name> <key>` (one space or tab between); blank lines and `#` comments are left
out. The name (an id by the contract's rule) is what logs and the queue's fairness see; the key itself is
kept only as its SHA-256 digest and looked up by digest, so neither its content nor its length leaks
through timing. The cluster token is not a client key: a file holding it is refused.
"""

from __future__ import annotations

import hashlib

from .config_file import ConfigError
from .contract import SecretFileError, read_secret_lines, valid_id

MAX_CLIENT_KEYS_BYTES = 1024 * 1024
MAX_CLIENT_KEYS = 10_000
MIN_CLIENT_KEY_LENGTH = 32


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "replace")).digest()


class ClientKeys:
    """Key digest -> client name. Empty when no file is configured: then every /v1 call is refused."""

    def __init__(self, by_digest: dict[bytes, str] | None = None) -> None:
        self.by_digest = by_digest or {}

    def __len__(self) -> int:
        return len(self.by_digest)

    def name_of(self, authorization: str | None) -> str | None:
        """The client's name for an `Authorization: Bearer <key>` header, or None."""
        if not authorization or not self.by_digest:
            return None
        scheme, _space, credentials = authorization.partition(" ")
        if scheme.lower() != "bearer":
            return None
        # A dict lookup by digest: the time taken does not depend on how much of a key matched.
        return self.by_digest.get(digest(credentials.strip()))


def load_client_keys(path: str | None, cluster_token: str) -> ClientKeys:
    """Read and check the whole file; any fault is one ConfigError naming the line, never its content."""
    if path is None:
        return ClientKeys()
    try:
        lines = read_secret_lines(path, "client_keys_file", MAX_CLIENT_KEYS_BYTES, MAX_CLIENT_KEYS)
    except SecretFileError as exc:
        raise ConfigError(str(exc)) from None
    token_digest = digest(cluster_token)
    by_digest: dict[bytes, str] = {}
    names: set[str] = set()
    for number, line in lines:
        where = f"client_keys_file {path} line {number}"
        parts = line.split()
        if len(parts) != 2:
            raise ConfigError(f"{where}: expected `<name> <key>` separated by one space or tab")
        name, key = parts
        if not valid_id(name):
            raise ConfigError(f"{where}: the name must be letters, digits, '.', '_' or '-' (1-128)")
        if len(key) < MIN_CLIENT_KEY_LENGTH:
            raise ConfigError(f"{where}: the key must be at least {MIN_CLIENT_KEY_LENGTH} characters")
        key_digest = digest(key)
        if name in names:
            raise ConfigError(f"{where}: the name {name!r} is already used by an earlier line")
        if key_digest in by_digest:
            raise ConfigError(f"{where}: the same key as client {by_digest[key_digest]!r}")
        if key_digest == token_digest:
            raise ConfigError(f"{where}: the key of {name!r} is the cluster token; give clients their own")
        names.add(name)
        by_digest[key_digest] = name
    return ClientKeys(by_digest)

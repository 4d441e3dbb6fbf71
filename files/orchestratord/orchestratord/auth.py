"""Bearer-token check for /v2/*: digests compared in constant time, so neither content nor length leaks."""

from __future__ import annotations

import hashlib
import hmac


class BearerAuth:
    def __init__(self, token: str) -> None:
        self._digest = hashlib.sha256(token.encode()).digest()

    def allows(self, authorization: str | None) -> bool:
        if not authorization:
            return False
        scheme, _space, credentials = authorization.partition(" ")
        if scheme.lower() != "bearer":  # auth schemes are case-insensitive (RFC 9110)
            return False
        offered = hashlib.sha256(credentials.strip().encode("utf-8", "replace")).digest()
        return hmac.compare_digest(offered, self._digest)

"""Bearer-token check for /v2/*: digests compared in constant time, so neither content nor length leaks."""

from __future__ import annotations

import hashlib
import hmac


class BearerAuth:
    def __init__(self, token: str) -> None:
        self._digest = hashlib.sha256(token.encode()).digest()

    def allows(self, authorization: str | None) -> bool:
        if not authorization or not authorization.startswith("Bearer "):
            return False
        offered = hashlib.sha256(authorization[7:].strip().encode("utf-8", "replace")).digest()
        return hmac.compare_digest(offered, self._digest)

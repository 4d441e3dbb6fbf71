"""The built-in admin credential: the token_file token, kept only as its digest (credentials.py looks every
/v2 secret up by digest, so neither content nor length leaks through timing)."""

from __future__ import annotations

import hmac

from .credentials import bearer_digest, digest_of


class BearerAuth:
    def __init__(self, token: str) -> None:
        self.digest = digest_of(token)

    def allows(self, authorization: str | None) -> bool:
        """Whether the header carries the token_file token itself (the built-in `cluster-admin`)."""
        offered = bearer_digest(authorization)
        return offered is not None and hmac.compare_digest(offered, self.digest)

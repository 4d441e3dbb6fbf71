"""The credential book: every /v2 credential by the digest of its secret, in memory, written through to the
store (its `credentials` table) before any change is answered.

A request's secret is looked up by its SHA-256 digest (a dict lookup: time independent of how much of
a secret matched, as with client keys); secrets are shown once, when made, and never stored or logged.
The token_file token is the built-in admin, `cluster-admin`: it lives only in memory (its file is its
store), cannot be listed or revoked here, and keeps today's agents and playbooks working.

Node credentials are named `node/<node_id>` (the current one) and `node/<node_id>/old` (the one it
replaced at the last renewal, valid until its own expiry, so an answer lost on the way costs nothing);
a node's recovery credential is `recovery/<node_id>`. Names made through the API follow the id rule,
which has no '/', so they never collide with these.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from .access import ISSUABLE_SCOPES, describe
from .contract import NODE_ID_RULE, valid_id, valid_node_id
from .store import CredentialRow, CredentialSpent, Store
from .wire import JoinAnswer, NodeCredential

log = logging.getLogger(__name__)

BUILTIN_ADMIN = "cluster-admin"
# The prefix says what a leaked string is (as GitHub's ghp_ does); the daemon never trusts it.
SECRET_PREFIX = {
    "reader": "llr_",
    "operator": "llo_",
    "admin": "lla_",
    "node": "lln_",
    "join": "llj_",
    "recovery": "llv_",
}
JOIN_DEFAULT_TTL_S = 3600
JOIN_MAX_TTL_S = 7 * 86400
JOIN_MAX_USES = 10_000
MAX_TTL_S = 10 * 365 * 86400
# Admins make credentials, nodes join: both bounded, so a script in a loop cannot grow the daemon for ever.
MAX_CREDENTIALS = 100_000


def digest_of(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "replace")).digest()


def bearer_digest(authorization: str | None) -> bytes | None:
    """The digest of the secret in `Authorization: Bearer <secret>`, or None without one."""
    if not authorization:
        return None
    scheme, _space, secret = authorization.partition(" ")
    if scheme.lower() != "bearer":  # auth schemes are case-insensitive (RFC 9110)
        return None
    return digest_of(secret.strip())


def rfc3339(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class CredentialError(Exception):
    """A refused credential operation: the routes answer it with its status and code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass(slots=True)
class Credential:
    name: str
    scope: str
    node_id: str | None
    digest: bytes
    expires_at: int | None  # unix seconds, wall clock; None: never
    uses_left: int | None  # None: unlimited
    created_at: int
    # The last heartbeat it authenticated on this replica (wall clock), kept in memory only: how a rotation
    # knows that the agent has switched to its new token before the previous one is revoked.
    last_used_at: float | None = field(default=None, compare=False)

    def described(self) -> str:
        return describe(self.name, self.scope, self.node_id)

    def row(self) -> CredentialRow:
        return CredentialRow(
            self.name, self.scope, self.node_id, self.digest, self.expires_at, self.uses_left, self.created_at
        )

    def unusable(self, now: float) -> str | None:
        """Why the credential is refused now (401), or None."""
        if self.expires_at is not None and now >= self.expires_at:
            return f"credential {self.name!r} expired at {rfc3339(self.expires_at)}"
        if self.uses_left is not None and self.uses_left <= 0:
            return f"credential {self.name!r} is used up"
        return None


def node_credential_name(node_id: str) -> str:
    return f"node/{node_id}"


def _names_of_node(node_id: str) -> list[str]:
    return [f"node/{node_id}", f"node/{node_id}/old", f"recovery/{node_id}"]


class CredentialBook:
    def __init__(
        self,
        store: Store,
        node_ttl_s: int = 86400,
        recovery_ttl_s: int = 365 * 86400,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.node_ttl_s = node_ttl_s
        self.recovery_ttl_s = recovery_ttl_s
        self.wall_clock = wall_clock
        self.by_digest: dict[bytes, Credential] = {}
        self.by_name: dict[str, Credential] = {}
        # Changes one at a time: a single-use token must not be spent twice by two joins in flight.
        self.writing = asyncio.Lock()
        self._renewing: set[str] = set()  # nodes whose renewal is being written
        # Nodes an admin asked to rotate (POST /v2/nodes/{id}/credential/rotate): renewed at their next
        # heartbeat whatever their token's age. In memory: a replica that restarts forgets the request and
        # the rotation's wait times out; running it again asks again.
        self._due_now: set[str] = set()

    # --- loading and lookup

    def add_builtin_admin(self, digest: bytes) -> None:
        self._remember(Credential(BUILTIN_ADMIN, "admin", None, digest, None, None, 0))

    async def load(self) -> None:
        rows = await self.store.load_credentials()
        now = self.wall_clock()
        kept = 0
        for row in rows:
            credential = Credential(
                row.name, row.scope, row.node_id, row.digest, row.expires_at, row.uses_left, row.created_at
            )
            if row.digest in self.by_digest or row.name == BUILTIN_ADMIN:
                log.error("stored credential %r skipped: its secret is the token_file token's", row.name)
                continue
            self._remember(credential)
            kept += credential.unusable(now) is None
        log.info("loaded %d credential(s), %d usable now", len(rows), kept)

    def apply_stored(self, name: str, row: CredentialRow | None) -> None:
        """Take in a credential as the database holds it now (None: revoked or gone), as another replica
        wrote it: issued, revoked, a join's use spent, a node's token renewed. The caller holds `writing`."""
        if name == BUILTIN_ADMIN:
            return
        before = self.by_name.get(name)
        if row is None:
            if before is not None:
                self._forget(name)
                log.info("credential %s gone (through another replica)", before.described())
            return
        if row.digest in self.by_digest and self.by_digest[row.digest].name == BUILTIN_ADMIN:
            return
        fresh = Credential(
            row.name, row.scope, row.node_id, row.digest, row.expires_at, row.uses_left, row.created_at
        )
        if before == fresh:
            return
        self._forget(name)
        self._remember(fresh)

    def _remember(self, credential: Credential) -> None:
        self.by_digest[credential.digest] = credential
        self.by_name[credential.name] = credential

    def _forget(self, name: str) -> None:
        credential = self.by_name.pop(name, None)
        if credential is not None:
            self.by_digest.pop(credential.digest, None)

    def find(self, authorization: str | None) -> Credential | None:
        digest = bearer_digest(authorization)
        return None if digest is None else self.by_digest.get(digest)

    def has_node_credential(self, node_id: str) -> bool:
        return f"node/{node_id}" in self.by_name or f"node/{node_id}/old" in self.by_name

    def listing(self) -> list[Credential]:
        return sorted((c for c in self.by_name.values() if c.name != BUILTIN_ADMIN), key=lambda c: c.name)

    # --- changes, each written before memory changes

    async def _write(self, delete: list[str], put: list[Credential], spend: Credential | None = None) -> None:
        """The change, in the store first. `spend`: one use of that credential is taken in the database
        itself (replicas share it); memory takes the count the database answers."""
        try:
            left = await self.store.write_credentials(
                delete,
                [credential.row() for credential in put],
                None if spend is None else (spend.name, spend.digest),
            )
        except CredentialSpent:
            assert spend is not None
            raise CredentialError(
                401, "UNAUTHORIZED", f"credential {spend.name!r} is used up (spent through another replica)"
            ) from None
        if spend is not None and spend.name not in {credential.name for credential in put}:
            self._forget(spend.name)
            self._remember(replace(spend, uses_left=left))
        for name in delete:
            self._forget(name)
        for credential in put:
            self._forget(credential.name)
            self._remember(credential)

    def _new(
        self, name: str, scope: str, node_id: str | None, ttl_s: int | None, uses: int | None
    ) -> tuple[Credential, str]:
        secret = SECRET_PREFIX[scope] + secrets.token_urlsafe(32)
        now = int(self.wall_clock())
        expires_at = None if ttl_s is None else now + ttl_s
        return Credential(name, scope, node_id, digest_of(secret), expires_at, uses, now), secret

    def _check_room(self, more: int) -> None:
        if len(self.by_name) + more > MAX_CREDENTIALS:
            raise CredentialError(
                409, "TOO_MANY_CREDENTIALS", f"the daemon holds {MAX_CREDENTIALS} credentials; revoke some"
            )

    async def issue(
        self, name: str, scope: str, ttl_s: int | None, uses: int | None, node_id: str | None, by: Credential
    ) -> tuple[Credential, str]:
        """A new credential made by an admin; its secret is returned once and kept nowhere."""
        if not valid_id(name) or name == BUILTIN_ADMIN:
            raise CredentialError(
                400,
                "INVALID_PARAMS",
                f"name must follow the id rule and not be {BUILTIN_ADMIN!r} - at `name`",
            )
        if scope not in ISSUABLE_SCOPES:
            raise CredentialError(400, "INVALID_PARAMS", f"scope must be one of {', '.join(ISSUABLE_SCOPES)}")
        if scope == "join":
            ttl_s = JOIN_DEFAULT_TTL_S if ttl_s is None else ttl_s
            uses = 1 if uses is None else uses
            if ttl_s > JOIN_MAX_TTL_S:
                raise CredentialError(
                    400, "INVALID_PARAMS", f"a join credential lives at most {JOIN_MAX_TTL_S} s - at `ttl_s`"
                )
            if node_id is not None and not valid_node_id(node_id):
                raise CredentialError(400, "INVALID_PARAMS", f"node_id: {NODE_ID_RULE} - at `node_id`")
        elif uses is not None or node_id is not None:
            field = "uses" if uses is not None else "node_id"
            raise CredentialError(
                400, "INVALID_PARAMS", f"only a join credential takes {field} - at `{field}`"
            )
        async with self.writing:
            if name in self.by_name:
                raise CredentialError(409, "CREDENTIAL_EXISTS", f"a credential named {name!r} exists already")
            self._check_room(1)
            credential, secret = self._new(name, scope, node_id, ttl_s, uses)
            await self._write([], [credential])
        log.info("credential %s issued by %s", credential.described(), by.described())
        return credential, secret

    async def revoke(self, name: str, by: Credential) -> None:
        """Effective at once: the next request with its secret finds nothing."""
        async with self.writing:
            credential = self.by_name.get(name)
            if credential is None or name == BUILTIN_ADMIN:
                raise CredentialError(404, "CREDENTIAL_NOT_FOUND", f"no credential named {name!r}")
            await self._write([name], [])
        log.info("credential %s revoked by %s", credential.described(), by.described())

    async def join(self, presented: Credential, node_id: str) -> JoinAnswer:
        """A join or recovery secret buys the node's own credential and a recovery secret, in one write
        that also spends one use of the join secret (or the recovery secret itself)."""
        if not valid_node_id(node_id):
            raise CredentialError(400, "INVALID_PARAMS", f"node_id {node_id!r} is refused: {NODE_ID_RULE}")
        async with self.writing:
            # Looked at again under the lock: another join may have spent a use (the book then holds a new
            # record under the same name and digest) or the last one, or it was revoked meanwhile.
            current = self.by_name.get(presented.name)
            if current is None or current.digest != presented.digest:
                raise CredentialError(401, "UNAUTHORIZED", f"credential {presented.name!r} is gone")
            presented = current
            reason = presented.unusable(self.wall_clock())
            if reason is not None:
                raise CredentialError(401, "UNAUTHORIZED", reason)
            general = presented.scope == "join" and presented.node_id is None
            if general and self.has_node_credential(node_id):
                raise CredentialError(
                    403,
                    "NODE_ID_TAKEN",
                    f"node {node_id} has a credential already: a general join credential cannot take its id; "
                    "delete the node first, or join it with a join credential bound to it or its recovery "
                    "credential",
                )
            self._check_room(3)
            node_credential, node_token = self._new(
                node_credential_name(node_id), "node", node_id, self.node_ttl_s, None
            )
            recovery, recovery_token = self._new(
                f"recovery/{node_id}", "recovery", node_id, self.recovery_ttl_s, 1
            )
            # One use of the join secret is spent in the database, so two replicas cannot both spend its
            # last one; a recovery secret (one use) is spent the same way, then replaced by the new one
            # under the same name, all in the same write.
            await self._write([f"node/{node_id}/old"], [node_credential, recovery], spend=presented)
            self._due_now.discard(node_id)  # a rotation asked before is served by these fresh credentials
        log.info("node %s joined with %s", node_id, presented.described())
        assert node_credential.expires_at is not None
        return JoinAnswer(
            node_id=node_id,
            credential_name=node_credential.name,
            node_token=node_token,
            expires_at=rfc3339(node_credential.expires_at),
            recovery_token=recovery_token,
        )

    def renewal_due(self, credential: Credential, now: float) -> bool:
        """Less than half of the node's current credential's life left: the heartbeat answer brings a new
        one. Never for `node/<id>/old`: an agent still using that one lost the answer that renewed it (or
        is not the agent); renewing again would drop the token the real agent holds. It goes on with the
        old one until that expires, then rejoins with its recovery secret."""
        expires_at = credential.expires_at
        return (
            expires_at is not None
            and credential.scope == "node"
            and (
                2 * (expires_at - now) < expires_at - credential.created_at
                or credential.node_id in self._due_now
            )
            and credential.name == f"node/{credential.node_id}"
            and credential.node_id not in self._renewing
        )

    async def renew(self, presented: Credential) -> NodeCredential | None:
        """A new node token for the node of `presented` (its current one), written before it is handed
        out. The presented one becomes `node/<id>/old` and stays valid until its own expiry; the previous
        old one is dropped."""
        node_id = presented.node_id
        assert node_id is not None
        self._renewing.add(node_id)
        try:
            async with self.writing:
                if self.by_name.get(presented.name) is not presented:
                    return None  # revoked or replaced meanwhile
                fresh, token = self._new(
                    node_credential_name(node_id), "node", node_id, self.node_ttl_s, None
                )
                kept = replace(presented, name=f"node/{node_id}/old")
                await self._write([f"node/{node_id}", f"node/{node_id}/old"], [fresh, kept])
                self._due_now.discard(node_id)
        finally:
            self._renewing.discard(node_id)
        log.info("node %s: its credential renewed, valid until %s", node_id, rfc3339(fresh.expires_at or 0))
        return NodeCredential(node_token=token, expires_at=rfc3339(fresh.expires_at or 0))

    async def rotate(self, node_id: str, by: Credential) -> tuple[Credential, str]:
        """An admin's rotation of one node: its node token is renewed at its next heartbeat (the answer
        carries the new one; the current one becomes `node/<id>/old`, which the rotation revokes once the
        agent has heartbeated with the new one), and its recovery secret is replaced now; the new recovery
        secret is returned once, for the caller to hand to the node (the playbook writes it to the node's
        credential_dir)."""
        async with self.writing:
            current = self.by_name.get(node_credential_name(node_id))
            if current is None:
                raise CredentialError(
                    404, "CREDENTIAL_NOT_FOUND", f"node {node_id} has no node credential to rotate"
                )
            recovery, secret = self._new(f"recovery/{node_id}", "recovery", node_id, self.recovery_ttl_s, 1)
            await self._write([recovery.name], [recovery])
            self._due_now.add(node_id)
        log.info(
            "node %s: credential rotation asked by %s (renewed at its next heartbeat, recovery replaced)",
            node_id,
            by.described(),
        )
        return recovery, secret

    async def forget_node(self, node_id: str) -> None:
        """The node's own and recovery credentials, gone with the node an operator deleted."""
        async with self.writing:
            names = [name for name in _names_of_node(node_id) if name in self.by_name]
            if names:
                await self._write(names, [])
            self._due_now.discard(node_id)

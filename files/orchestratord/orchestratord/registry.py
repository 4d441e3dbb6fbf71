"""The cluster state in memory: nodes, their liveness, and what reaches the database and the index.

Liveness is decided in one place, `Registry.status_of`, from the daemon's own monotonic clock at the
moment each heartbeat arrived; the agent's timestamp is kept for display only. The registry owns its
store: registrations, drains and deletions are written before they change memory, heartbeats are
written back in batches by `flush`. Placement (placement.py) and the read views (views.py) work on the
state kept here.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import msgspec

from . import schemas
from .access import Forbidden, identity_refusal
from .credentials import Credential, CredentialBook
from .limits import Limits
from .placement import PlacementIndex, Placer
from .routing import RoutingTable
from .store import HeartbeatRow, Store, StoredNode

log = logging.getLogger(__name__)


def rfc3339(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def utc_now() -> str:
    return rfc3339(time.time())


def _served_model(pool: schemas.PoolStatus) -> str | None:
    return None if pool.engine is None else pool.engine.model_id


def _same_models(pools: list[schemas.PoolStatus], before: list[schemas.PoolStatus]) -> bool:
    """Whether the pools, their staged models and their engines' models are those of `before` (only loads
    and engine states moved: the usual heartbeat)."""
    return len(pools) == len(before) and all(
        new.pool_id == old.pool_id
        and new.models_available == old.models_available
        and _served_model(new) == _served_model(old)
        for new, old in zip(pools, before, strict=True)
    )


def _move_holder(holders_by_model: dict[str, set[str]], node_id: str, old: set[str], new: set[str]) -> None:
    """Update a model -> nodes map for one node whose models went from `old` to `new`."""
    for model in old - new:
        holders = holders_by_model.get(model)
        if holders is not None:
            holders.discard(node_id)
            if not holders:
                del holders_by_model[model]
    for model in new - old:
        holders_by_model.setdefault(model, set()).add(node_id)


def _pool_ids(registration: schemas.Registration) -> frozenset[str]:
    return frozenset(pool.pool_id for pool in registration.pools)


def generation_of(stored_registration: bytes) -> str:
    """The registration's generation: a digest of the bytes the store holds, so every replica and every
    restart names the same record the same way."""
    return hashlib.sha256(stored_registration).hexdigest()[:16]


class NodeNotFound(KeyError):
    pass


@dataclass(slots=True)
class NodeState:
    node_id: str
    registration: schemas.Registration
    registered_at: str
    pool_ids: frozenset[str]  # the registered pools: a heartbeat may report only these
    generation: str = ""  # of the stored registration (generation_of): heartbeat answers carry it
    drain: bool = False
    pools: list[schemas.PoolStatus] | None = None  # the last heartbeat's readings
    applied_pools: list[schemas.PoolStatus] | None = None  # the readings the index holds
    last_heartbeat_epoch: float | None = None  # wall clock, for display and the database only
    last_contact: float = 0.0  # daemon monotonic time of the registration or the last heartbeat
    heard: bool = False  # a heartbeat arrived since the registration
    models: list[str] = field(default_factory=list)  # staged on the node (its pools' models_available)
    served: list[str] = field(default_factory=list)  # what its engines are set up to serve, in any state
    reported_status: str = "registering"  # the status last logged


class Registry:
    def __init__(
        self,
        store: Store,
        node_timeout_ms: int,
        heartbeat_interval_ms: int,
        limits: Limits,
        clock: Callable[[], float] = time.monotonic,
        node_credential_ttl_s: int = 86400,
        node_recovery_ttl_s: int = 365 * 86400,
    ) -> None:
        self.store = store
        # Who may do what (access.py) is looked up here, per request, by the digest of the secret.
        self.credentials = CredentialBook(store, node_credential_ttl_s, node_recovery_ttl_s)
        self.limits = limits
        self.node_timeout_s = node_timeout_ms / 1000
        self.node_timeout_ms = node_timeout_ms
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.clock = clock
        self.nodes: dict[str, NodeState] = {}
        # Nodes not yet known to be offline, oldest contact first: the sweep reads only the front.
        self.by_contact: OrderedDict[str, NodeState] = OrderedDict()
        self.index = PlacementIndex()
        self.model_nodes: dict[str, set[str]] = {}  # model -> nodes that last reported it staged
        self.served_nodes: dict[str, set[str]] = {}  # model -> nodes with an engine set up for it
        self.placer = Placer(self.index, self.nodes, self.model_nodes, self.is_live, self.served_nodes)
        # The gateway's table, kept from the same readings as the index (both through _index_node).
        self.routes = RoutingTable(self.is_live, clock)
        self.dirty: dict[str, NodeState] = {}  # heartbeats not yet written back
        self.heartbeat_writeback_passes = 0  # flushes begun, with or without heartbeats to write
        # Registrations, drains and deletions one at a time, each checking the state it changes only once
        # it holds the lock, so that two of them never interleave around their database write. They are
        # rare; heartbeats never take it.
        self.writing = asyncio.Lock()
        # Nodes whose new readings the index and the model lists have not taken in yet. Heartbeats only
        # record readings; every read settles first, so several heartbeats of one node between two
        # decisions cost one index update.
        self.unsettled: set[str] = set()
        self._pool_decoder = msgspec.json.Decoder(list[schemas.PoolStatus])
        self._registration_decoder = msgspec.json.Decoder(schemas.Registration)
        # Set (to the monotonic time silence was last accounted) while liveness is paused: this replica
        # cannot read the heartbeats other replicas write, so the silence it sees is not the nodes'
        # (replication.py).
        self.liveness_paused_at: float | None = None

    # --- liveness: the one rule

    def is_live(self, node: NodeState, now: float) -> bool:
        return now - node.last_contact <= self.node_timeout_s

    def status_of(self, node: NodeState, now: float) -> str:
        if not self.is_live(node, now):
            return "offline"
        if not node.heard:
            return "registering"
        if node.drain or (node.pools and all(pool.draining for pool in node.pools)):
            return "draining"
        return "online"

    # --- the database: loaded once, written through, heartbeats written back in batches

    async def open(self) -> None:
        await self.store.open()
        await self.load()

    async def close(self) -> None:
        await self.flush()  # the last heartbeats reach the disk on a clean stop
        await self.store.close()

    async def ready(self) -> bool:
        return await self.store.ping()

    async def load(self) -> None:
        await self.credentials.load()
        stored = await self.store.load_all()
        now, wall_now = self.clock(), time.time()
        restored = [node for row in stored if (node := self._restore(row, now, wall_now)) is not None]
        # The sweep reads the contact order from its front, so it must start with the longest silent.
        for node in sorted(restored, key=lambda node: node.last_contact):
            self.by_contact[node.node_id] = node
        skipped = len(stored) - len(restored)
        log.info(
            "loaded %d node(s) from %s%s",
            len(restored),
            self.store.description,
            f", skipped {skipped} it cannot read" if skipped else "",
        )

    def _restore(self, row: StoredNode, now: float, wall_now: float) -> NodeState | None:
        """The node a stored record describes, or None (logged) when this version cannot read it.

        A record written under looser rules (an older version, a hand edit) must not stop the daemon
        from starting: the node is left out, its agent's next heartbeat gets 404 and registers it again,
        and that registration replaces the record.
        """
        try:
            registration = schemas.check_registration(self._registration_decoder.decode(row.registration))
            heard_at = datetime.fromisoformat(row.registered_at).timestamp()
        except (msgspec.DecodeError, ValueError, TypeError) as exc:
            log.error(
                "stored node %r skipped: its record does not read under this version (%s); it comes back "
                "when its agent registers again",
                row.node_id,
                exc,
            )
            return None
        node = NodeState(
            node_id=row.node_id,
            registration=registration,
            registered_at=row.registered_at,
            pool_ids=_pool_ids(registration),
            generation=generation_of(row.registration),
            drain=row.drain,
        )
        if row.pools is not None and row.last_heartbeat_at is not None:
            try:
                pools = self._pool_decoder.decode(row.pools)
                heartbeat_epoch = datetime.fromisoformat(row.last_heartbeat_at).timestamp()
            except (msgspec.DecodeError, ValueError, TypeError) as exc:
                log.warning(
                    "stored node %r: its last readings do not read under this version (%s); "
                    "restored without them until its next heartbeat",
                    row.node_id,
                    exc,
                )
            else:
                node.heard = True
                node.last_heartbeat_epoch = heard_at = heartbeat_epoch
                self._apply_pools(node, pools)
        self.nodes[node.node_id] = node
        # The silence before the restart counts: a node heard just before it keeps the rest of its timeout
        # while its agent re-sends, one silent for longer is offline at once. Monotonic time does not
        # survive a restart, so the age comes from a clock: the database's where it has one for every
        # replica (PostgreSQL), else this host's wall clock (never negative, should it step back).
        silent_s = wall_now - heard_at if row.silent_s is None else row.silent_s
        node.last_contact = now - max(0.0, silent_s)
        node.reported_status = self.status_of(node, now)
        return node

    async def flush(self) -> None:
        """Write the heartbeats since the last flush in one transaction; on failure they go with the next."""
        # Counted as the pass takes its batch, before any write: /metrics shows the write-back running even
        # while a slow or locked database holds it up.
        self.heartbeat_writeback_passes += 1
        dirty, self.dirty = self.dirty, {}
        rows = [
            HeartbeatRow(node.node_id, rfc3339(node.last_heartbeat_epoch), msgspec.json.encode(node.pools))
            for node in dirty.values()
            if node.last_heartbeat_epoch is not None and self.nodes.get(node.node_id) is node
        ]
        if not rows:
            return
        try:
            await self.store.write_heartbeats(rows)
        except BaseException:
            # A node that falls silent now must still reach the disk: its latest readings go next time.
            for row in rows:
                node = self.nodes.get(row.node_id)
                if node is not None:
                    self.dirty.setdefault(row.node_id, node)
            raise

    # --- writes

    async def register(self, body: schemas.Registration, by: Credential) -> schemas.RegisterAnswer:
        async with self.writing:
            return await self._register(body, by)

    async def _register(self, body: schemas.Registration, by: Credential) -> schemas.RegisterAnswer:
        node_id = body.node_id
        registered_at = utc_now()
        node = self.nodes.get(node_id)
        if node is None:
            self.limits.check_new_node(len(self.nodes))
        elif by.scope == "node":
            # A node's own credential registers its node again (a restart, new pools) but cannot move it:
            # a stolen one must not point the node's work at another address or machine.
            before = node.registration
            for what, old, new in (
                ("address", before.address, body.address),
                ("machine_id", before.machine_id, body.machine_id),
            ):
                if old != new:
                    raise Forbidden(identity_refusal(by.name, node_id, what, old, new))
        stored = msgspec.json.encode(body)
        contact_before = None if node is None else node.last_contact
        # The record below forgets the node's readings. One still waiting for the write-back would be taken
        # by a write-back during the await and land after the record, under the new registration: drop it
        # now, in the same step the record is queued (the database thread keeps the order).
        pending = self.dirty.pop(node_id, None)
        try:
            await self.store.upsert_node(node_id, stored, registered_at)
        except BaseException:
            if pending is not None:
                self.dirty.setdefault(node_id, pending)  # nothing changed: its readings still go out
            raise
        now = self.clock()
        if node is None:
            node = NodeState(
                node_id=node_id, registration=body, registered_at=registered_at, pool_ids=_pool_ids(body)
            )
            self.nodes[node_id] = node
            log.info(
                "node %s registered from %s with %d pool(s) by %s",
                node_id,
                body.address,
                len(body.pools),
                by.described(),
            )
        else:
            node.registration = body
            node.registered_at = registered_at
            node.pool_ids = _pool_ids(body)
            log.info("node %s registered again from %s by %s", node_id, body.address, by.described())
        node.generation = generation_of(stored)
        # A heartbeat that came in during the write is newer than the registration: its readings stay, in
        # memory as on disk, where its write-back (queued after the record) puts them. Otherwise the node
        # starts over as registering, like its record.
        if contact_before is None or node.last_contact == contact_before:
            self.dirty.pop(node_id, None)
            self.unsettled.discard(node_id)
            node.heard = False
            node.last_heartbeat_epoch = None
            node.last_contact = now
            self.by_contact[node_id] = node
            self.by_contact.move_to_end(node_id)
            self._apply_pools(node, None)
        node.reported_status = self.status_of(node, now)
        return schemas.RegisterAnswer(
            node_id=node_id,
            status=node.reported_status,
            heartbeat_interval_ms=self.heartbeat_interval_ms,
            node_timeout_ms=self.node_timeout_ms,
            generation=node.generation,
        )

    def heartbeat(self, node_id: str, body: schemas.Heartbeat) -> schemas.HeartbeatAnswer:
        node = self.nodes.get(node_id)
        if node is None:
            raise NodeNotFound(node_id)
        self.limits.check_heartbeat(node.pool_ids, body)
        now = self.clock()
        # An offline node has left the index; its first heartbeat back must re-enter it even unchanged.
        came_back = not self.is_live(node, now)
        if came_back and node.heard:
            log.info("node %s heard from again after %d ms", node_id, (now - node.last_contact) * 1000)
        node.last_contact = now
        node.last_heartbeat_epoch = time.time()
        self.by_contact[node_id] = node  # back in, if the sweep took it out when it went offline
        self.by_contact.move_to_end(node_id)
        if came_back or not node.heard or body.pools != node.pools:
            node.heard = True
            node.pools = body.pools
            self.unsettled.add(node_id)
            self._note_status(node, now)  # only new readings can change the status
        self.dirty[node_id] = node
        routes = self.routes
        if routes.set_aside:
            routes.heard(node_id)  # pools set aside after failures take work again
        if routes.waiting and node_id in self.unsettled:
            self.settle()  # capacity this heartbeat brings goes to the waiting requests now
        return schemas.HeartbeatAnswer(
            next_heartbeat_ms=self.heartbeat_interval_ms, drain=node.drain, generation=node.generation
        )

    async def set_drain(self, node_id: str, drain: bool, by: Credential) -> NodeState:
        async with self.writing:
            node = self.get(node_id)
            if node.drain != drain:
                await self.store.update_drain(node_id, drain)
                node.drain = drain
                self.settle()  # heartbeats may have come in during the write: index their readings
                self._index_node(node)
                log.info("node %s %s by %s", node_id, "drained" if drain else "undrained", by.described())
                node.reported_status = self.status_of(node, self.clock())
            return node

    async def delete(self, node_id: str, by: Credential) -> None:
        """The node's record; when someone other than the node itself deletes it, its credentials too (a
        node deregistering at its stop keeps them, to register again at its start)."""
        async with self.writing:
            try:
                node = self.get(node_id)
            except NodeNotFound:
                # Joined but never registered: deleting the node still takes back its credentials.
                if by.scope == "node" or not self.credentials.has_node_credential(node_id):
                    raise
                node = None
            if node is not None:
                await self._delete_record(node, by)
        if by.scope != "node":
            await self.credentials.forget_node(node_id)

    async def _delete_record(self, node: NodeState, by: Credential) -> None:
        node_id = node.node_id
        await self.store.delete_node(node_id)
        self._forget_node(node)
        if by.scope == "node":
            log.info("node %s deregistered by %s", node_id, by.described())
        else:
            log.info("node %s deleted by %s", node_id, by.described())

    def _forget_node(self, node: NodeState) -> None:
        node_id = node.node_id
        del self.nodes[node_id]
        self.by_contact.pop(node_id, None)
        self._apply_pools(node, None)
        self.dirty.pop(node_id, None)
        self.unsettled.discard(node_id)

    # --- what other replicas committed (replication.py calls these, holding `writing`)

    def apply_stored(self, node_id: str, row: StoredNode | None) -> None:
        """Take in a node record as the database holds it now: new, registered again, drained or
        undrained, or deleted (None). A record already in memory as it is changes nothing, so a replica
        reading back its own writes is a no-op."""
        node = self.nodes.get(node_id)
        if row is None:
            if node is not None:
                self._forget_node(node)
                log.info("node %s deleted (through another replica)", node_id)
            return
        # The registration time too: an agent registering again with the same body starts its node
        # over as registering, here as on the replica it registered with.
        if (
            node is None
            or node.generation != generation_of(row.registration)
            or node.registered_at != row.registered_at
        ):
            if node is not None:
                self._forget_node(node)
            fresh = self._restore(row, self.clock(), time.time())
            if fresh is None:
                return
            self.by_contact[node_id] = fresh
            self.by_contact.move_to_end(node_id)
            if fresh.pools is None:
                self._index_node(fresh)
            log.info(
                "node %s registered %sfrom %s (through another replica)",
                node_id,
                "" if node is None else "again ",
                fresh.registration.address,
            )
            return
        if node.drain != row.drain:
            node.drain = row.drain
            self.settle()
            self._index_node(node)
            log.info("node %s %s (through another replica)", node_id, "drained" if row.drain else "undrained")
            node.reported_status = self.status_of(node, self.clock())

    def apply_remote_heartbeat(self, node_id: str, pools: bytes, last_heartbeat_at: str) -> None:
        """A heartbeat another replica took, learnt from its batch row: the node is heard NOW on this
        replica's own monotonic clock (no wall clock is compared), with the readings of that row."""
        node = self.nodes.get(node_id)
        if node is None:
            return
        try:
            readings = self._pool_decoder.decode(pools)
            heartbeat_epoch = datetime.fromisoformat(last_heartbeat_at).timestamp()
        except (msgspec.DecodeError, ValueError, TypeError) as exc:
            log.warning("node %s: a heartbeat row another replica wrote does not read (%s)", node_id, exc)
            return
        now = self.clock()
        came_back = not self.is_live(node, now)
        if came_back and node.heard:
            log.info("node %s heard from again (through another replica)", node_id)
        node.last_contact = now
        node.last_heartbeat_epoch = heartbeat_epoch
        self.by_contact[node_id] = node
        self.by_contact.move_to_end(node_id)
        if came_back or not node.heard or readings != node.pools:
            node.heard = True
            node.pools = readings
            self.unsettled.add(node_id)
            self._note_status(node, now)

    def resort_contacts(self) -> None:
        """Contact order again, after many records were taken in at once (a full reload)."""
        ordered = sorted(self.by_contact.values(), key=lambda node: node.last_contact)
        self.by_contact = OrderedDict((node.node_id, node) for node in ordered)

    def pause_liveness(self) -> None:
        """No silence counts from now until resume_liveness: the replica cannot read the heartbeats the
        other replicas take, so a node silent here may well be heard there."""
        if self.liveness_paused_at is None:
            self.liveness_paused_at = self.clock()

    def resume_liveness(self) -> None:
        if self.liveness_paused_at is not None:
            self._hold_silence(self.clock())
            self.liveness_paused_at = None

    def _hold_silence(self, now: float) -> None:
        """Move every live node's last contact forward by the paused time (never past now): silence
        resumes counting where it stood. Keeps the contact order (the shift is monotonic)."""
        assert self.liveness_paused_at is not None
        paused_s = now - self.liveness_paused_at
        for node in self.by_contact.values():
            node.last_contact = min(now, node.last_contact + paused_s)
        self.liveness_paused_at = now

    # --- bringing the index and the model lists up to the latest readings

    def settle(self) -> None:
        """Bring the index and the model lists up to the latest readings of every node."""
        if not self.unsettled:
            return
        pending, self.unsettled = self.unsettled, set()
        for node_id in pending:
            node = self.nodes.get(node_id)
            if node is not None:
                self._apply_pools(node, node.pools)

    def _apply_pools(self, node: NodeState, pools: list[schemas.PoolStatus] | None) -> None:
        applied, node.applied_pools = node.applied_pools, pools
        node.pools = pools
        if pools and applied and _same_models(pools, applied):
            self._index_node(node)  # the usual heartbeat: loads moved, the models stayed
            return
        old_models, old_served = set(node.models), set(node.served)
        node.models = sorted({model for pool in pools or () for model in pool.models_available})
        node.served = sorted({pool.engine.model_id for pool in pools or () if pool.engine is not None})
        _move_holder(self.model_nodes, node.node_id, old_models, set(node.models))
        _move_holder(self.served_nodes, node.node_id, old_served, set(node.served))
        self._index_node(node)

    def _index_node(self, node: NodeState) -> None:
        self.index.update_node(node)
        self.routes.update_node(node)

    # --- reads

    def get(self, node_id: str) -> NodeState:
        self.settle()
        node = self.nodes.get(node_id)
        if node is None:
            raise NodeNotFound(node_id)
        return node

    def place(self, request: schemas.PlacementRequest) -> schemas.Placement:
        self.settle()
        return self.placer.place(request, self.clock())

    # --- housekeeping

    def _note_status(self, node: NodeState, now: float) -> None:
        status = self.status_of(node, now)
        if status != node.reported_status:
            log.info("node %s %s", node.node_id, status)
            node.reported_status = status

    def sweep(self) -> None:
        """Mark nodes whose silence passed node_timeout_ms: log them and drop them from the index.

        Looks only at the front of the contact order, so a sweep costs the nodes that just went
        offline, not the size of the cluster.
        """
        now = self.clock()
        if self.liveness_paused_at is not None:
            self._hold_silence(now)
            return
        while self.by_contact:
            node = next(iter(self.by_contact.values()))
            if self.is_live(node, now):
                break
            del self.by_contact[node.node_id]
            log.warning("node %s offline: no heartbeat for %d ms", node.node_id, self.node_timeout_ms)
            self.index.drop_node(node.node_id)
            self.routes.drop_node(node.node_id)
            node.reported_status = "offline"

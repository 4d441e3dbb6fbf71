"""The cluster state in memory: nodes, their status, the model catalog and placement.

Liveness is decided in one place, `Registry.status_of`, from the daemon's own monotonic clock at the
moment each heartbeat arrived; the agent's timestamp is kept for display only. Placement reads an index
kept up to date by heartbeats (pools that can take work, by model, ordered by load and by id), so a
decision looks at the best few candidates instead of scanning every node.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from heapq import heapify, heappop, heappush

import msgspec
from sortedcontainers import SortedList

from . import schemas
from .limits import Limits
from .store import HeartbeatRow, SqliteStore, StoredNode

log = logging.getLogger(__name__)

ANY_MODEL = ""  # index key for "no model asked"; model ids are never empty
RANDOM_TRIES = 16

PoolKey = tuple[str, str]  # (node_id, pool_id): the tie-break order everywhere
LoadKey = tuple[int, int, str, str]  # (-slots_free, -vram_free, node_id, pool_id): least loaded first


def rfc3339(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def utc_now() -> str:
    return rfc3339(time.time())


def _same_models(pools: list[schemas.PoolStatus], before: list[schemas.PoolStatus]) -> bool:
    return len(pools) == len(before) and all(
        new.pool_id == old.pool_id and new.models_available == old.models_available
        for new, old in zip(pools, before, strict=True)
    )


def _pool_ids(registration: schemas.Registration) -> frozenset[str]:
    return frozenset(pool.pool_id for pool in registration.pools)


class NodeNotFound(KeyError):
    pass


class NoPlacement(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(slots=True)
class NodeState:
    node_id: str
    registration: schemas.Registration
    registered_at: str
    pool_ids: frozenset[str]  # the registered pools: a heartbeat may report only these
    drain: bool = False
    pools: list[schemas.PoolStatus] | None = None  # the last heartbeat's readings
    applied_pools: list[schemas.PoolStatus] | None = None  # the readings the index holds
    last_heartbeat_epoch: float | None = None  # wall clock, for display and the database only
    last_contact: float = 0.0  # daemon monotonic time of the registration or the last heartbeat
    heard: bool = False  # a heartbeat arrived since the registration
    models: list[str] = field(default_factory=list)
    reported_status: str = "registering"  # the status last logged


class PlacementIndex:
    """Pools that can take work now (liveness aside, which is checked at decision time), by model.

    by_load: per model a heap in least-loaded order. A load change pushes the new key and leaves the old
    one behind (skipped as stale when met, swept out when the heap grows past twice its members), so a
    heartbeat costs a few C-level pushes instead of sorted-list removals.
    by_id: per model the exact members in (node_id, pool_id) order, for round-robin and random; it
    changes only when a pool starts or stops taking work, not when its load moves.
    """

    def __init__(self) -> None:
        self.by_load: dict[str, list[LoadKey]] = {}
        self.by_id: dict[str, SortedList] = {}
        self.entries: dict[PoolKey, tuple[LoadKey, frozenset[str]]] = {}
        self.by_node: dict[str, set[PoolKey]] = {}

    def set_pool(self, key: PoolKey, load: LoadKey | None, models: frozenset[str]) -> None:
        old = self.entries.get(key)
        if old is not None:
            if load is not None and old[1] == models:
                if old[0] == load:
                    return
                self.entries[key] = (load, models)  # only the load moved: membership stays
                self._push(load, models)
                return
            self._remove(key, old[1])
        if load is None:
            return
        self.entries[key] = (load, models)
        self.by_node.setdefault(key[0], set()).add(key)
        for model in (ANY_MODEL, *models):
            self.by_id.setdefault(model, SortedList()).add(key)
            self.by_load.setdefault(model, [])
        self._push(load, models)

    def _push(self, load: LoadKey, models: frozenset[str]) -> None:
        for model in (ANY_MODEL, *models):
            heap = self.by_load[model]
            heappush(heap, load)
            if len(heap) > 2 * len(self.by_id[model]) + 64:
                self.by_load[model] = heap = [self.entries[key][0] for key in self.by_id[model]]
                heapify(heap)

    def is_current(self, model: str, load: LoadKey) -> bool:
        entry = self.entries.get((load[2], load[3]))
        return entry is not None and entry[0] == load and (model == ANY_MODEL or model in entry[1])

    def _remove(self, key: PoolKey, models: frozenset[str]) -> None:
        del self.entries[key]
        node_keys = self.by_node.get(key[0])
        if node_keys is not None:
            node_keys.discard(key)
            if not node_keys:
                del self.by_node[key[0]]
        for model in (ANY_MODEL, *models):
            members = self.by_id[model]
            members.remove(key)
            if not members:
                del self.by_load[model], self.by_id[model]

    def drop_node(self, node_id: str) -> None:
        for key in list(self.by_node.get(node_id, ())):
            self._remove(key, self.entries[key][1])


class Registry:
    def __init__(
        self,
        store: SqliteStore,
        node_timeout_ms: int,
        heartbeat_interval_ms: int,
        limits: Limits,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.limits = limits
        self.node_timeout_s = node_timeout_ms / 1000
        self.node_timeout_ms = node_timeout_ms
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.clock = clock
        self.nodes: dict[str, NodeState] = {}
        # Nodes not yet known to be offline, oldest contact first: the sweep reads only the front.
        self.by_contact: OrderedDict[str, NodeState] = OrderedDict()
        self.index = PlacementIndex()
        self.model_nodes: dict[str, set[str]] = {}  # model -> nodes that last reported it
        self.dirty: dict[str, NodeState] = {}  # heartbeats not yet written back
        # Registrations, drains and deletions one at a time, each checking the state it changes only once
        # it holds the lock, so that two of them never interleave around their database write. They are
        # rare; heartbeats never take it.
        self.writing = asyncio.Lock()
        # Nodes whose new readings the index and the model lists have not taken in yet. Heartbeats only
        # record readings; every read settles first, so several heartbeats of one node between two
        # decisions cost one index update.
        self.unsettled: set[str] = set()
        self.round_robin_after: dict[str, PoolKey] = {}
        self._model_sets: dict[tuple[str, ...], frozenset[str]] = {}
        self.random = random.Random()
        self._pool_decoder = msgspec.json.Decoder(list[schemas.PoolStatus])
        self._registration_decoder = msgspec.json.Decoder(schemas.Registration)

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

    # --- loading and writing back

    async def load(self) -> None:
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
            self.store.db_path,
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
        # survive a restart, so the age comes from the wall clock (never negative, should it step back).
        node.last_contact = now - max(0.0, wall_now - heard_at)
        node.reported_status = self.status_of(node, now)
        return node

    def take_dirty(self) -> list[HeartbeatRow]:
        dirty, self.dirty = self.dirty, {}
        return [
            HeartbeatRow(node.node_id, rfc3339(node.last_heartbeat_epoch), msgspec.json.encode(node.pools))
            for node in dirty.values()
            if node.last_heartbeat_epoch is not None and self.nodes.get(node.node_id) is node
        ]

    def keep_dirty(self, rows: list[HeartbeatRow]) -> None:
        """A write-back failed: these nodes' readings go out with the next one (their latest by then)."""
        for row in rows:
            node = self.nodes.get(row.node_id)
            if node is not None:
                self.dirty.setdefault(row.node_id, node)

    # --- writes

    async def register(self, body: schemas.Registration) -> schemas.RegisterAnswer:
        async with self.writing:
            return await self._register(body)

    async def _register(self, body: schemas.Registration) -> schemas.RegisterAnswer:
        node_id = body.node_id
        registered_at = utc_now()
        node = self.nodes.get(node_id)
        if node is None:
            self.limits.check_new_node(len(self.nodes))
        contact_before = None if node is None else node.last_contact
        # The record below forgets the node's readings. One still waiting for the write-back would be taken
        # by a write-back during the await and land after the record, under the new registration: drop it
        # now, in the same step the record is queued (the database thread keeps the order).
        pending = self.dirty.pop(node_id, None)
        try:
            await self.store.upsert_node(node_id, msgspec.json.encode(body), registered_at)
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
            log.info("node %s registered from %s with %d pool(s)", node_id, body.address, len(body.pools))
        else:
            node.registration = body
            node.registered_at = registered_at
            node.pool_ids = _pool_ids(body)
            log.info("node %s registered again from %s", node_id, body.address)
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
        return schemas.HeartbeatAnswer(next_heartbeat_ms=self.heartbeat_interval_ms, drain=node.drain)

    async def set_drain(self, node_id: str, drain: bool) -> schemas.Node:
        async with self.writing:
            node = self.get(node_id)
            if node.drain != drain:
                await self.store.update_drain(node_id, drain)
                node.drain = drain
                self.settle()  # heartbeats may have come in during the write: index their readings
                self._reindex(node)
                log.info("node %s %s by an operator", node_id, "drained" if drain else "undrained")
                node.reported_status = self.status_of(node, self.clock())
            return self.view(node, self.clock())

    async def delete(self, node_id: str) -> None:
        async with self.writing:
            node = self.get(node_id)
            await self.store.delete_node(node_id)
            del self.nodes[node_id]
            self.by_contact.pop(node_id, None)
            self._apply_pools(node, None)
            self.dirty.pop(node_id, None)
            self.unsettled.discard(node_id)
            log.info("node %s deregistered", node_id)

    # --- the index

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
            self._reindex(node)  # the usual heartbeat: loads moved, the models stayed
            return
        old_models = set(node.models)
        models = sorted({model for pool in pools or () for model in pool.models_available})
        node.models = models
        new_models = set(models)
        for model in old_models - new_models:
            holders = self.model_nodes.get(model)
            if holders is not None:
                holders.discard(node.node_id)
                if not holders:
                    del self.model_nodes[model]
        for model in new_models - old_models:
            self.model_nodes.setdefault(model, set()).add(node.node_id)
        self._reindex(node)

    def _model_set(self, models: list[str]) -> frozenset[str]:
        # Interned: most pools report one of a few model lists, and equal sets compare fastest when identical.
        key = tuple(models)
        found = self._model_sets.get(key)
        if found is None:
            if len(self._model_sets) > 4096:
                self._model_sets.clear()
            found = self._model_sets[key] = frozenset(models)
        return found

    def _reindex(self, node: NodeState) -> None:
        reported = {pool.pool_id for pool in node.pools or ()}
        for key in list(self.index.by_node.get(node.node_id, ())):
            if key[1] not in reported:
                self.index.set_pool(key, None, frozenset())
        for pool in node.pools or ():
            takes_work = not node.drain and pool.ready and not pool.draining and pool.slots_free > 0
            load = (
                (-pool.slots_free, -pool.vram_free_bytes, node.node_id, pool.pool_id) if takes_work else None
            )
            self.index.set_pool((node.node_id, pool.pool_id), load, self._model_set(pool.models_available))

    # --- reads

    def get(self, node_id: str) -> NodeState:
        self.settle()
        node = self.nodes.get(node_id)
        if node is None:
            raise NodeNotFound(node_id)
        return node

    def view(self, node: NodeState, now: float) -> schemas.Node:
        readings = {pool.pool_id: pool for pool in node.pools or ()}
        pools = []
        for spec in node.registration.pools:
            reading = readings.pop(spec.pool_id, None)
            pools.append(self._pool_view(spec.pool_id, spec.gpus, spec.slots_total, reading))
        for reading in readings.values():  # pools the agent reports beyond its registration
            pools.append(self._pool_view(reading.pool_id, [], reading.slots_total, reading))
        reg = node.registration
        return schemas.Node(
            node_id=node.node_id,
            machine_id=reg.machine_id,
            address=reg.address,
            version=reg.version,
            status=self.status_of(node, now),
            drain=node.drain,
            registered_at=node.registered_at,
            last_heartbeat_at=None
            if node.last_heartbeat_epoch is None
            else rfc3339(node.last_heartbeat_epoch),
            capabilities=reg.capabilities,
            pools=pools,
            models=node.models,
        )

    @staticmethod
    def _pool_view(
        pool_id: str, gpus: list[int], slots_total: int, reading: schemas.PoolStatus | None
    ) -> schemas.PoolView:
        if reading is None:
            return schemas.PoolView(pool_id, gpus, False, False, slots_total, 0, 0, 0, None, [])
        return schemas.PoolView(
            pool_id=pool_id,
            gpus=gpus,
            ready=reading.ready,
            draining=reading.draining,
            slots_total=reading.slots_total,
            slots_free=reading.slots_free,
            vram_total_bytes=reading.vram_total_bytes,
            vram_free_bytes=reading.vram_free_bytes,
            engine=reading.engine,
            models_available=sorted(set(reading.models_available)),
        )

    def list_nodes(self, status: str | None = None) -> schemas.NodeList:
        self.settle()
        now = self.clock()
        views = [self.view(self.nodes[node_id], now) for node_id in sorted(self.nodes)]
        if status is not None:
            views = [view for view in views if view.status == status]
        return schemas.NodeList(nodes=views, count=len(views))

    def count_by_status(self) -> dict[str, int]:
        now = self.clock()
        counts = dict.fromkeys(("registering", "online", "draining", "offline"), 0)
        for node in self.nodes.values():
            counts[self.status_of(node, now)] += 1
        return counts

    def pools_ready(self) -> int:
        self.settle()
        now = self.clock()
        return sum(
            1
            for key in self.index.entries
            if (node := self.nodes.get(key[0])) is not None and self.is_live(node, now)
        )

    def availability(self) -> schemas.Availability:
        self.settle()
        now = self.clock()
        nodes: dict[str, schemas.AvailabilityNode] = {}
        holders: dict[str, int] = {}
        for node_id in sorted(self.nodes):
            node = self.nodes[node_id]
            online = self.status_of(node, now) == "online"
            pools = [
                schemas.AvailabilityPool(
                    pool_id=pool.pool_id,
                    ready=pool.ready and not pool.draining,
                    models=sorted(set(pool.models_available)),
                )
                for pool in node.pools or ()
            ]
            nodes[node_id] = schemas.AvailabilityNode(
                node_id=node_id,
                address=node.registration.address,
                online=online,
                models=node.models,
                pools=pools,
            )
            if online:
                # Counted per node: a model in two pools of one node is still on one node.
                for model in node.models:
                    holders[model] = holders.get(model, 0) + 1
        return schemas.Availability(
            nodes=nodes,
            total_models=len(holders),
            replicated_models=sorted(model for model, count in holders.items() if count >= 2),
            single_node_models=sorted(model for model, count in holders.items() if count == 1),
        )

    def catalog_models(self) -> schemas.CatalogModels:
        self.settle()
        now = self.clock()
        by_model: dict[str, schemas.CatalogModel] = {}
        for node_id in sorted(self.nodes):
            node = self.nodes[node_id]
            if self.status_of(node, now) != "online":
                continue
            for model in node.models:
                entry = by_model.setdefault(model, schemas.CatalogModel(model, [], 0, 0, 0))
                entry.nodes.append(node_id)
                entry.replicas += 1
            for pool in node.pools or ():
                if not pool.ready or pool.draining:
                    continue
                for model in set(pool.models_available):
                    entry = by_model[model]
                    entry.pools_ready += 1
                    entry.slots_free += pool.slots_free
        return schemas.CatalogModels(models=[by_model[model] for model in sorted(by_model)])

    # --- placement

    def place(self, request: schemas.PlacementRequest) -> schemas.Placement:
        self.settle()
        now = self.clock()
        model = request.model_id or ANY_MODEL
        vram_needed = request.vram_bytes or 0
        strategy = request.strategy
        if strategy == "least-loaded":
            pick = self._least_loaded(model, vram_needed, now)
        elif strategy == "round-robin":
            pick = self._round_robin(model, vram_needed, now)
        else:
            pick = self._random(model, vram_needed, now)
        if pick is None:
            raise self._why_not(request, now)
        node = self.nodes[pick[0]]
        return schemas.Placement(
            node_id=pick[0], pool_id=pick[1], address=node.registration.address, strategy=strategy
        )

    def _fits(self, key: PoolKey, vram_needed: int, now: float, stale: list[str]) -> bool:
        node = self.nodes[key[0]]
        if not self.is_live(node, now):
            stale.append(key[0])
            return False
        return -self.index.entries[key][0][1] >= vram_needed

    def _evict(self, stale: list[str]) -> None:
        # Offline nodes leave the index when a decision meets them; their next heartbeat brings them back.
        for node_id in set(stale):
            self.index.drop_node(node_id)

    def _least_loaded(self, model: str, vram_needed: int, now: float) -> PoolKey | None:
        heap = self.index.by_load.get(model)
        if not heap:
            return None
        too_small: list[LoadKey] = []  # fitting candidates come after these; they go back afterwards
        pick = None
        while heap:
            load = heap[0]
            if not self.index.is_current(model, load):
                heappop(heap)
                continue
            node = self.nodes[load[2]]
            if not self.is_live(node, now):
                # Offline nodes leave the index when a decision meets them; a heartbeat brings them back.
                self.index.drop_node(node.node_id)
                continue
            if -load[1] >= vram_needed:
                pick = (load[2], load[3])
                break
            too_small.append(heappop(heap))
        for load in too_small:
            heappush(heap, load)
        return pick

    def _round_robin(self, model: str, vram_needed: int, now: float) -> PoolKey | None:
        ordered = self.index.by_id.get(model)
        if not ordered:
            return None
        start = 0
        after = self.round_robin_after.get(model)
        if after is not None:
            start = ordered.bisect_right(after)
        stale: list[str] = []
        pick = None
        count = len(ordered)
        for offset in range(count):
            key = ordered[(start + offset) % count]
            if self._fits(key, vram_needed, now, stale):
                pick = key
                break
        self._evict(stale)
        if pick is not None:
            self.round_robin_after[model] = pick
        return pick

    def _random(self, model: str, vram_needed: int, now: float) -> PoolKey | None:
        ordered = self.index.by_id.get(model)
        if not ordered:
            return None
        stale: list[str] = []
        for _ in range(RANDOM_TRIES):
            key = ordered[self.random.randrange(len(ordered))]
            if self._fits(key, vram_needed, now, stale):
                self._evict(stale)
                return key
        # Few candidates fit: choose among all that do.
        fitting = [key for key in ordered if self._fits(key, vram_needed, now, stale)]
        self._evict(stale)
        return self.random.choice(fitting) if fitting else None

    def _why_not(self, request: schemas.PlacementRequest, now: float) -> NoPlacement:
        if request.model_id is not None:
            holders = self.model_nodes.get(request.model_id, ())
            if not any(self.is_live(self.nodes[node_id], now) for node_id in holders):
                return NoPlacement("MODEL_NOT_AVAILABLE", f"no online node holds model {request.model_id!r}")
            return NoPlacement(
                "NO_CAPACITY", f"no ready pool with free slots and enough VRAM holds {request.model_id!r}"
            )
        return NoPlacement("NO_CAPACITY", "no ready pool with free slots and enough VRAM")

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
        while self.by_contact:
            node = next(iter(self.by_contact.values()))
            if self.is_live(node, now):
                break
            del self.by_contact[node.node_id]
            log.warning("node %s offline: no heartbeat for %d ms", node.node_id, self.node_timeout_ms)
            self.index.drop_node(node.node_id)
            node.reported_status = "offline"

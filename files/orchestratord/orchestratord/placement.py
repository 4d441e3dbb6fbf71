"""Placement: the index of pools that can take work, and the strategies that pick from it.

A pool takes work for a model only while its engine serves that model and says so itself: the pool is
ready (GPUs healthy), its engine's state is `ready` (healthy, model loaded, a slot idle) and it has a free
slot. A pool whose engine is loading, busy or dead, or that has no engine, holds its staged models but
serves none of them. The answer carries the engine's URL: where the request goes.

The index is kept up to date by the registry as readings settle (pools that can take work, by the model
their engine serves, ordered by load and by id), so a decision looks at the best few candidates instead
of scanning every node. Liveness is not in the index: it is checked when a decision meets a candidate,
and an offline node met that way leaves the index until its next heartbeat brings it back.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from heapq import heapify, heappop, heappush
from typing import TYPE_CHECKING

from sortedcontainers import SortedList

from . import schemas

if TYPE_CHECKING:
    from .registry import NodeState

ANY_MODEL = ""  # index key for "no model asked"; model ids are never empty
RANDOM_TRIES = 16
MODEL_SETS_KEPT = 4096
# The one engine state that takes new work: `busy` has no idle slot, `loading` and `dead` do not answer.
ENGINE_TAKES_WORK = "ready"

NO_MODELS: frozenset[str] = frozenset()

PoolKey = tuple[str, str]  # (node_id, pool_id): the tie-break order everywhere
LoadKey = tuple[int, int, str, str]  # (-slots_free, -vram_free, node_id, pool_id): least loaded first


class NoPlacement(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class PlacementIndex:
    """Pools that can take work now (liveness aside, which is checked at decision time), by model.

    A pool's models are those its engine serves (one today; the index keeps a set per pool so that an
    engine kind serving several models can follow without changing it). A load change costs the same
    whatever number of models the pool holds: it records the pool's new load in `entries` and appends
    the pool to one change log. The per-model heaps catch up only when that model is asked for
    (`heap_for`): they take in the log's changes since they last looked (pushing the new loads of the
    pools that hold the model), or are rebuilt from the model's members when more pools changed since
    than it has members. A load change thus costs one append, not a push per model; the pushes that
    remain are those of the models actually placed.

    by_load: per model a heap in least-loaded order, current up to the log position in `synced`. Old keys
    stay behind (skipped as stale when met, swept out when the heap grows past twice its members).
    by_id: per model the exact members in (node_id, pool_id) order, for round-robin and random; it
    changes only when a pool starts or stops taking work, not when its load moves.
    """

    def __init__(self) -> None:
        self.by_load: dict[str, list[LoadKey]] = {}
        self.by_id: dict[str, SortedList] = {}
        self.entries: dict[PoolKey, tuple[LoadKey, frozenset[str]]] = {}
        self.by_node: dict[str, set[PoolKey]] = {}
        self._model_sets: dict[tuple[str, ...], frozenset[str]] = {}
        # The change log: the pools whose load changed or that entered, in order. changes[i] is position
        # changes_base + i; synced[model] is the position up to which by_load[model] has taken them in.
        self.changes: list[PoolKey] = []
        self.changes_base = 0
        self.synced: dict[str, int] = {}

    def update_node(self, node: NodeState) -> None:
        """Take in a node's latest readings and drain flag; touches only the pools whose entry changed."""
        reported = {pool.pool_id for pool in node.pools or ()}
        for key in list(self.by_node.get(node.node_id, ())):
            if key[1] not in reported:
                self.set_pool(key, None, frozenset())
        for pool in node.pools or ():
            engine = pool.engine
            takes_work = (
                not node.drain
                and pool.ready
                and not pool.draining
                and pool.slots_free > 0
                and engine is not None
                and engine.state == ENGINE_TAKES_WORK
            )
            key = (node.node_id, pool.pool_id)
            if takes_work:
                load = (-pool.slots_free, -pool.vram_free_bytes, node.node_id, pool.pool_id)
                self.set_pool(key, load, self._model_set((engine.model_id,)))
            else:
                self.set_pool(key, None, NO_MODELS)

    def _model_set(self, models: tuple[str, ...]) -> frozenset[str]:
        # Interned: most pools report one of a few model lists, and equal sets compare fastest when identical.
        found = self._model_sets.get(models)
        if found is None:
            if len(self._model_sets) > MODEL_SETS_KEPT:
                self._model_sets.clear()
            found = self._model_sets[models] = frozenset(models)
        return found

    def set_pool(self, key: PoolKey, load: LoadKey | None, models: frozenset[str]) -> None:
        old = self.entries.get(key)
        if old is not None:
            if load is not None and old[1] == models:
                if old[0] == load:
                    return
                self.entries[key] = (load, models)  # only the load moved: membership stays
                self._log_change(key)
                return
            self._remove(key, old[1])
        if load is None:
            return
        self.entries[key] = (load, models)
        self.by_node.setdefault(key[0], set()).add(key)
        position = self.changes_base + len(self.changes)
        for model in (ANY_MODEL, *models):
            members = self.by_id.get(model)
            if members is None:
                # A new model's heap starts empty, current up to here: the change logged below fills it.
                members = self.by_id[model] = SortedList()
                self.by_load[model] = []
                self.synced[model] = position
            members.add(key)
        self._log_change(key)

    def _log_change(self, key: PoolKey) -> None:
        changes = self.changes
        changes.append(key)
        # A heap more changes behind than the index has pools is rebuilt rather than caught up (heap_for),
        # so older changes are never read again: drop them once they are as many as the pools, which keeps
        # the log within twice the pool count at an amortised O(1) per change.
        kept = len(self.entries) + 1024
        if len(changes) > 2 * kept:
            dropped = len(changes) - kept
            del changes[:dropped]
            self.changes_base += dropped

    def heap_for(self, model: str) -> list[LoadKey] | None:
        """The model's heap, brought up to the latest loads of its pools; None when no pool holds it."""
        heap = self.by_load.get(model)
        if heap is None:
            return None
        members = self.by_id[model]
        end = self.changes_base + len(self.changes)
        start = self.synced[model]
        if start == end:
            return heap
        if start < self.changes_base or end - start > len(members):
            heap = None  # cheaper (or only possible) to start over from the members
        else:
            entries = self.entries
            for key in self.changes[start - self.changes_base :]:
                entry = entries.get(key)
                if entry is not None and (model == ANY_MODEL or model in entry[1]):
                    heappush(heap, entry[0])
        if heap is None or len(heap) > 2 * len(members) + 64:
            heap = [self.entries[key][0] for key in members]
            heapify(heap)
            self.by_load[model] = heap
        self.synced[model] = end
        return heap

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
                del self.by_load[model], self.by_id[model], self.synced[model]

    def drop_node(self, node_id: str) -> None:
        for key in list(self.by_node.get(node_id, ())):
            self._remove(key, self.entries[key][1])


class Placer:
    """The strategies over the index. `nodes`, `model_nodes` (model -> nodes that stage it) and
    `served_nodes` (model -> nodes with an engine configured for it, in any state) are the registry's own
    dicts, read live."""

    def __init__(
        self,
        index: PlacementIndex,
        nodes: dict[str, NodeState],
        model_nodes: dict[str, set[str]],
        is_live: Callable[[NodeState, float], bool],
        served_nodes: dict[str, set[str]] | None = None,
    ) -> None:
        self.index = index
        self.nodes = nodes
        self.model_nodes = model_nodes
        self.served_nodes = {} if served_nodes is None else served_nodes
        self.is_live = is_live
        self.round_robin_after: dict[str, PoolKey] = {}
        self.random = random.Random()

    def place(self, request: schemas.PlacementRequest, now: float) -> schemas.Placement:
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
        engine = engine_of(node, pick[1])
        return schemas.Placement(
            node_id=pick[0],
            pool_id=pick[1],
            address=node.registration.address,
            strategy=strategy,
            engine_url=engine.url,
            engine_kind=engine.kind,
            model_id=engine.model_id,
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
        heap = self.index.heap_for(model)
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
        for _attempt in range(RANDOM_TRIES):
            key = ordered[self.random.randrange(len(ordered))]
            if self._fits(key, vram_needed, now, stale):
                self._evict(stale)
                return key
        # Few candidates fit: choose among all that do.
        fitting = [key for key in ordered if self._fits(key, vram_needed, now, stale)]
        self._evict(stale)
        return self.random.choice(fitting) if fitting else None

    def _why_not(self, request: schemas.PlacementRequest, now: float) -> NoPlacement:
        # MODEL_NOT_AVAILABLE: no engine on an online node is set up to serve the model, so waiting will
        # not help. NO_CAPACITY: one is, but none of them takes work now (busy, loading, dead for a moment,
        # drained, or short of VRAM): a retry later may succeed.
        model = request.model_id
        if model is not None:
            if not self._any_live(self.served_nodes.get(model, ()), now):
                staged = sum(1 for node_id in self.model_nodes.get(model, ()) if self._live_id(node_id, now))
                if staged:
                    return NoPlacement(
                        "MODEL_NOT_AVAILABLE",
                        f"model {model!r} is staged on {staged} online node(s) but no engine serves it",
                    )
                return NoPlacement("MODEL_NOT_AVAILABLE", f"no online node holds model {model!r}")
            return NoPlacement(
                "NO_CAPACITY",
                f"no engine serving {model!r} is ready with a free slot and enough VRAM "
                "(busy, loading, dead or drained)",
            )
        return NoPlacement("NO_CAPACITY", "no engine is ready with a free slot and enough VRAM")

    def _live_id(self, node_id: str, now: float) -> bool:
        node = self.nodes.get(node_id)
        return node is not None and self.is_live(node, now)

    def _any_live(self, node_ids, now: float) -> bool:
        return any(self._live_id(node_id, now) for node_id in node_ids)


def engine_of(node: NodeState, pool_id: str) -> schemas.EngineStatus:
    """The engine of a pool the index holds (so it has one): read from the readings the index took in."""
    for pool in node.pools or ():
        if pool.pool_id == pool_id and pool.engine is not None:
            return pool.engine
    raise LookupError(f"pool {node.node_id}/{pool_id} is indexed without an engine")

"""The gateway's routing table: which pools serve each model now, how many requests the daemon itself
has in flight on each, and the bounded queue of requests waiting for a slot.

Kept by the registry next to the placement index (`update_node`/`drop_node` on both), from the same
readings; `PlacementIndex` answers /v2/placement from the agents' reported loads, this table answers the
gateway from the daemon's own count of requests in flight. That count is exact only while the gateway is
the engines' only client; they are keyed, so it is, and the docs say so.

A pool is routable for model M while its node is live and not drained, the pool is ready and not
draining, its engine serves M in state `ready` or `busy` (a busy engine may have slots this daemon freed
since the heartbeat), and it is not set aside after repeated failures. Capacity is `slots_total` plus the
engine backlog (requests the engine queues itself, so that a freed slot starts the next one with no round
trip through the daemon; `gateway_engine_backlog`, default 1); free places are capacity - in_flight.
Pick: most free places; ties in (node_id, pool_id) order, rotated.

The queue per model is served round-robin across client keys: one key flooding it cannot starve another.
Everything here runs on the event loop, with no awaits, so two requests never take the same last slot.

The table also knows which requests are on each node's engines now (`EngineCall`): when the registry's
sweep finds a node offline (`drop_node`), those are cut off at once rather than left to the gateway's
first-byte and idle timeouts, which a partition (bytes held, nothing reset) would otherwise run out.
"""

from __future__ import annotations

import asyncio
from bisect import bisect_left, insort
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .contract import ENGINE_SERVING_STATES

if TYPE_CHECKING:
    from .registry import NodeState

PoolKey = tuple[str, str]  # (node_id, pool_id)


@dataclass(slots=True, eq=False)
class RoutePool:
    key: PoolKey
    node: NodeState
    model: str
    url: str  # the engine's base URL, without a trailing slash
    slots_total: int

    @property
    def label(self) -> str:
        return f"{self.key[0]}/{self.key[1]}"


def _route_key(pool: RoutePool) -> PoolKey:
    return pool.key


class EngineCall:
    """One request on a node's engine, which the table cancels when the node goes offline."""

    __slots__ = ("lost", "task")

    def __init__(self, task: asyncio.Task) -> None:
        self.task = task
        self.lost = False  # set (and the task cancelled) when the node went offline under it


class QueueRefused(Exception):
    """The model's queue is full; `over_share` when the client already holds its fair share of it."""

    def __init__(self, over_share: bool) -> None:
        super().__init__("over share" if over_share else "queue full")
        self.over_share = over_share


class ModelQueue:
    __slots__ = ("by_client", "length")

    def __init__(self) -> None:
        # Client name -> its waiters, oldest first; the dict's order is the round-robin order.
        self.by_client: OrderedDict[str, deque[asyncio.Future]] = OrderedDict()
        self.length = 0


class RoutingTable:
    def __init__(
        self,
        is_live: Callable[[NodeState, float], bool],
        clock: Callable[[], float],
        queue_max: int = 256,
        set_aside_after: int = 3,
        engine_backlog: int = 0,
    ) -> None:
        self.is_live = is_live
        self.clock = clock
        self.queue_max = queue_max
        self.set_aside_after = set_aside_after
        self.engine_backlog = engine_backlog
        self.pools: dict[PoolKey, RoutePool] = {}  # routable by their readings
        self.by_model: dict[str, list[RoutePool]] = {}  # in (node_id, pool_id) order
        self.by_node: dict[str, list[PoolKey]] = {}
        self.in_flight: dict[PoolKey, int] = {}  # outlives a pool's routability: drained pools finish
        self.failures: dict[PoolKey, int] = {}  # consecutive failures
        self.set_aside: dict[str, set[PoolKey]] = {}  # node id -> its pools set aside until it beats
        self.rotation: dict[str, int] = {}
        self.queues: dict[str, ModelQueue] = {}
        self.waiting = 0  # over every model's queue
        self.set_aside_total = 0
        self.calls: dict[str, set[EngineCall]] = {}  # node id -> the requests on its engines now

    # --- kept by the registry

    def update_node(self, node: NodeState) -> None:
        """Take in a node's readings and drain flag; cheap when nothing that matters to routing moved."""
        fresh: dict[PoolKey, RoutePool] = {}
        if not node.drain:
            for pool in node.pools or ():
                engine = pool.engine
                if (
                    engine is not None
                    and engine.state in ENGINE_SERVING_STATES
                    and pool.ready
                    and not pool.draining
                    and pool.slots_total > 0
                ):
                    key = (node.node_id, pool.pool_id)
                    fresh[key] = RoutePool(
                        key, node, engine.model_id, engine.url.rstrip("/"), pool.slots_total
                    )
        old_keys = self.by_node.get(node.node_id, ())
        if len(old_keys) == len(fresh) and all(
            (old := self.pools.get(key)) is not None
            and (new := fresh.get(key)) is not None
            and (old.model, old.url, old.slots_total, old.node)
            == (new.model, new.url, new.slots_total, new.node)
            for key in old_keys
        ):
            return  # the usual heartbeat: loads moved, routing did not
        touched = set()
        for key in old_keys:
            touched.add(self._leave(self.pools.pop(key)))
        for key, pool in fresh.items():
            self.pools[key] = pool
            self._join(pool)
            touched.add(pool.model)
        if fresh:
            self.by_node[node.node_id] = list(fresh)
        else:
            self.by_node.pop(node.node_id, None)
        for model in touched:
            self.dispatch(model)  # new capacity takes waiters at once

    def drop_node(self, node_id: str) -> None:
        """The node went offline (the registry's sweep): its pools leave the table and the requests on
        its engines are cut off; the gateway retries or ends each by its commit point."""
        for key in self.by_node.pop(node_id, ()):
            self._leave(self.pools.pop(key))
        for call in self.calls.pop(node_id, ()):
            call.lost = True
            call.task.cancel()

    def calling(self, node_id: str, task: asyncio.Task) -> EngineCall:
        """`task` sends a request to an engine of `node_id` now; `call_ended` when it is done."""
        call = EngineCall(task)
        calls = self.calls.get(node_id)
        if calls is None:
            calls = self.calls[node_id] = set()
        calls.add(call)
        return call

    def call_ended(self, node_id: str, call: EngineCall) -> None:
        calls = self.calls.get(node_id)
        if calls is not None:
            calls.discard(call)
            if not calls:
                del self.calls[node_id]

    # by_model's lists are kept in order by bisection, one pool at a time: rebuilding a model's list from
    # every pool on each change made 10,000 nodes coming online take 11.5 s of the event loop
    # (bench/replicas.py).

    def _join(self, pool: RoutePool) -> None:
        insort(self.by_model.setdefault(pool.model, []), pool, key=_route_key)

    def _leave(self, pool: RoutePool) -> str:
        """Take `pool` out of its model's list; its model, for the caller's dispatch."""
        members = self.by_model.get(pool.model, [])
        at = bisect_left(members, pool.key, key=_route_key)
        if at < len(members) and members[at].key == pool.key:
            del members[at]
        if not members:
            self.by_model.pop(pool.model, None)
        return pool.model

    def heard(self, node_id: str) -> None:
        """The node's heartbeat: its pools set aside take work again."""
        keys = self.set_aside.pop(node_id, None)
        if keys:
            for key in keys:
                self.failures.pop(key, None)
            for model in {pool.model for key in keys if (pool := self.pools.get(key)) is not None}:
                self.dispatch(model)

    # --- decisions

    def pick(self, model: str, now: float, exclude: PoolKey | None = None) -> RoutePool | None:
        """The pool with the most free places, taking one; None when none has a free place."""
        pools = self.by_model.get(model)
        if not pools:
            return None
        count = len(pools)
        start = self.rotation.get(model, 0) % count
        in_flight, set_aside, is_live = self.in_flight, self.set_aside, self.is_live
        backlog = self.engine_backlog
        best, best_free = None, 0
        for offset in range(count):
            pool = pools[(start + offset) % count]
            free = pool.slots_total + backlog - in_flight.get(pool.key, 0)
            if (
                free > best_free
                and pool.key != exclude
                and is_live(pool.node, now)
                and not (set_aside and pool.key in set_aside.get(pool.key[0], ()))
            ):
                best, best_free = pool, free
        if best is not None:
            self.rotation[model] = start + 1
            in_flight[best.key] = in_flight.get(best.key, 0) + 1
        return best

    def routable(self, model: str, now: float) -> bool:
        """Whether some pool could take the model's requests, free slot or not (else: no capacity)."""
        return any(
            self.is_live(pool.node, now) and pool.key not in self.set_aside.get(pool.key[0], ())
            for pool in self.by_model.get(model, ())
        )

    def release(self, pool: RoutePool) -> None:
        """A request on the pool ended: its slot goes to the model's next waiter, if any."""
        self._release(pool.key)
        if self.waiting:
            self.dispatch(pool.model)

    def _release(self, key: PoolKey) -> None:
        left = self.in_flight[key] - 1
        if left:
            self.in_flight[key] = left
        else:
            del self.in_flight[key]

    def succeeded(self, pool: RoutePool) -> None:
        if self.failures:
            self.failures.pop(pool.key, None)

    def failed(self, pool: RoutePool) -> bool:
        """Count a failure; True when this one set the pool aside until its node's next heartbeat."""
        count = self.failures.get(pool.key, 0) + 1
        self.failures[pool.key] = count
        if count >= self.set_aside_after:
            aside = self.set_aside.setdefault(pool.key[0], set())
            if pool.key not in aside:
                aside.add(pool.key)
                self.set_aside_total += 1
                return True
        return False

    # --- the admission queue

    def enqueue(self, model: str, client: str) -> asyncio.Future:
        """A place in the model's queue; raises QueueRefused when it is full."""
        queue = self.queues.get(model)
        if queue is None:
            queue = self.queues[model] = ModelQueue()
        waiters = queue.by_client.get(client)
        if queue.length >= self.queue_max:
            keys_waiting = len(queue.by_client) + (waiters is None)
            raise QueueRefused(waiters is not None and len(waiters) >= self.queue_max / keys_waiting)
        if waiters is None:
            waiters = queue.by_client[client] = deque()
        future = asyncio.get_running_loop().create_future()
        waiters.append(future)
        queue.length += 1
        self.waiting += 1
        return future

    def leave(self, model: str, client: str, future: asyncio.Future) -> None:
        """A waiter that gave up (timeout, client gone): out of the queue, or its slot back if it got one."""
        if future.done() and not future.cancelled():
            self.release(future.result())
            return
        future.cancel()
        queue = self.queues.get(model)
        waiters = None if queue is None else queue.by_client.get(client)
        if waiters is None:
            return
        try:
            waiters.remove(future)
        except ValueError:
            return
        queue.length -= 1
        self.waiting -= 1
        if not waiters:
            del queue.by_client[client]
        if not queue.length:
            del self.queues[model]

    def dispatch(self, model: str) -> None:
        """Give free slots to the model's waiters, one client key after another."""
        queue = self.queues.get(model)
        if queue is None:
            return
        now = self.clock()
        while queue.length:
            pool = self.pick(model, now)
            if pool is None:
                break
            future = self._next_waiter(queue)
            if future is None:  # only waiters that already gave up were left
                self._release(pool.key)
                break
            future.set_result(pool)
        if not queue.length:
            del self.queues[model]

    def _next_waiter(self, queue: ModelQueue) -> asyncio.Future | None:
        while queue.length:
            client, waiters = next(iter(queue.by_client.items()))
            future = waiters.popleft()
            queue.length -= 1
            self.waiting -= 1
            if waiters:
                queue.by_client.move_to_end(client)
            else:
                del queue.by_client[client]
            # A waiter cancelled a moment ago is still queued until its task runs `leave`: skip it.
            if not future.done():
                return future
        return None

    def queue_length(self, model: str) -> int:
        queue = self.queues.get(model)
        return 0 if queue is None else queue.length

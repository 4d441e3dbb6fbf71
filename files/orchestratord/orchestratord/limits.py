"""What one node may claim and how many nodes the registry takes: the bounds that keep a broken or
hostile agent from growing the daemon's memory and its per-heartbeat work without end.

The wire structs already cap each list (pools, models per pool); these are the operator's tighter,
configurable limits, checked against the node's own registration where that matters.
"""

from __future__ import annotations

from .config import Settings
from .wire import Heartbeat, PoolStatus, Registration, ValidationProblem


class ClusterFull(Exception):
    """A new node would pass max_nodes; nodes already registered may always register again."""


class Limits:
    def __init__(self, settings: Settings) -> None:
        self.max_nodes = settings.max_nodes
        self.max_pools_per_node = settings.max_pools_per_node
        self.max_models_per_node = settings.max_models_per_node

    def check_new_node(self, node_count: int) -> None:
        if node_count >= self.max_nodes:
            raise ClusterFull(
                f"the registry already holds max_nodes ({self.max_nodes}) nodes; "
                f"remove a node or raise max_nodes"
            )

    def _check_pool_count(self, count: int) -> None:
        if count > self.max_pools_per_node:
            raise ValidationProblem(
                "$.pools", f"{count} pools, more than max_pools_per_node ({self.max_pools_per_node})"
            )

    def check_registration(self, body: Registration) -> None:
        self._check_pool_count(len(body.pools))

    def check_heartbeat(self, registered_pools: frozenset[str], body: Heartbeat) -> None:
        """Only pools the node registered, and no more distinct models than the limit.

        A pool the node never registered is refused: its slots and VRAM were never declared, and such a
        ghost pool with a million slots won every placement.
        """
        pools = body.pools
        self._check_pool_count(len(pools))
        for number, pool in enumerate(pools):
            if pool.pool_id not in registered_pools:
                raise ValidationProblem(
                    f"$.pools[{number}].pool_id",
                    f"pool {pool.pool_id!r} is not in the node's registration; register it first",
                )
        # The usual heartbeat is far below the limit: count entries first, distinct ids only when needed.
        if sum(len(pool.models_available) for pool in pools) > self.max_models_per_node:
            self._check_distinct_models(pools)

    def _check_distinct_models(self, pools: list[PoolStatus]) -> None:
        seen: set[str] = set()
        for number, pool in enumerate(pools):
            seen.update(pool.models_available)
            if len(seen) > self.max_models_per_node:
                raise ValidationProblem(
                    f"$.pools[{number}].models_available",
                    f"more than max_models_per_node ({self.max_models_per_node}) distinct models on the node",
                )

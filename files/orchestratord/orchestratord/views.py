"""What the read routes answer: nodes, availability and the model catalog, built from the registry's
settled state. Read-only: nothing here changes a node or the index."""

from __future__ import annotations

from . import schemas
from .contract import ENGINE_SERVING_STATES, NODE_STATUSES
from .registry import NodeState, Registry, rfc3339


def node_view(registry: Registry, node: NodeState, now: float) -> schemas.Node:
    readings = {pool.pool_id: pool for pool in node.pools or ()}
    pools = []
    for spec in node.registration.pools:
        reading = readings.pop(spec.pool_id, None)
        pools.append(_pool_view(spec.pool_id, spec.gpus, spec.slots_total, reading))
    for reading in readings.values():  # readings stored by a version that allowed unregistered pools
        pools.append(_pool_view(reading.pool_id, [], reading.slots_total, reading))
    reg = node.registration
    return schemas.Node(
        node_id=node.node_id,
        machine_id=reg.machine_id,
        address=reg.address,
        version=reg.version,
        status=registry.status_of(node, now),
        drain=node.drain,
        registered_at=node.registered_at,
        last_heartbeat_at=None if node.last_heartbeat_epoch is None else rfc3339(node.last_heartbeat_epoch),
        capabilities=reg.capabilities,
        pools=pools,
        models=node.models,
        served=node.served,
    )


def serves_now(pool: schemas.PoolStatus) -> bool:
    """Whether the pool's engine serves its model now: healthy (ready or busy), in a ready, undrained pool.

    Busy counts: it serves, only not one more request this instant (placement's stricter rule)."""
    engine = pool.engine
    return engine is not None and engine.state in ENGINE_SERVING_STATES and pool.ready and not pool.draining


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


def list_nodes(registry: Registry, status: str | None = None) -> schemas.NodeList:
    registry.settle()
    now = registry.clock()
    views = [node_view(registry, registry.nodes[node_id], now) for node_id in sorted(registry.nodes)]
    if status is not None:
        views = [view for view in views if view.status == status]
    return schemas.NodeList(nodes=views, count=len(views))


def count_by_status(registry: Registry) -> dict[str, int]:
    now = registry.clock()
    counts = dict.fromkeys(NODE_STATUSES, 0)
    for node in registry.nodes.values():
        counts[registry.status_of(node, now)] += 1
    return counts


def pools_ready(registry: Registry) -> int:
    registry.settle()
    now = registry.clock()
    return sum(
        1
        for key in registry.index.entries
        if (node := registry.nodes.get(key[0])) is not None and registry.is_live(node, now)
    )


def availability(registry: Registry) -> schemas.Availability:
    registry.settle()
    now = registry.clock()
    nodes: dict[str, schemas.AvailabilityNode] = {}
    holders: dict[str, int] = {}
    for node_id in sorted(registry.nodes):
        node = registry.nodes[node_id]
        online = registry.status_of(node, now) == "online"
        pools = [
            schemas.AvailabilityPool(
                pool_id=pool.pool_id,
                ready=pool.ready and not pool.draining,
                models=sorted(set(pool.models_available)),
                engine=pool.engine,
            )
            for pool in node.pools or ()
        ]
        nodes[node_id] = schemas.AvailabilityNode(
            node_id=node_id,
            address=node.registration.address,
            online=online,
            models=node.models,
            served=node.served,
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


def catalog_models(registry: Registry) -> schemas.CatalogModels:
    registry.settle()
    now = registry.clock()
    by_model: dict[str, schemas.CatalogModel] = {}
    for node_id in sorted(registry.nodes):
        node = registry.nodes[node_id]
        if registry.status_of(node, now) != "online":
            continue
        for model in node.models:
            entry = by_model.setdefault(model, schemas.CatalogModel(model, [], 0, 0, 0, []))
            entry.nodes.append(node_id)
            entry.replicas += 1
        for pool in sorted(node.pools or (), key=lambda pool: pool.pool_id):
            engine = pool.engine
            if engine is None:
                continue
            # An engine whose model is not staged (it should be; the role checks) is still listed.
            entry = by_model.setdefault(
                engine.model_id, schemas.CatalogModel(engine.model_id, [], 0, 0, 0, [])
            )
            serving = serves_now(pool)
            entry.engines.append(
                schemas.CatalogEngine(node_id, pool.pool_id, engine.kind, engine.state, engine.url, serving)
            )
            if serving:
                entry.served = True
                entry.pools_ready += 1
                entry.slots_free += pool.slots_free
    return schemas.CatalogModels(models=[by_model[model] for model in sorted(by_model)])

"""The gateway's routing table keeps each model's pools in (node, pool) order by bisection, one pool at a
time (routing.py). Against the obvious rebuild from every pool, over many random joins, moves and drops."""

from __future__ import annotations

import random
import sys
from types import SimpleNamespace

from support import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "files" / "orchestratord"))
from orchestratord.routing import RoutingTable

MODELS = ("org/a", "org/b", "org/c")


def node(node_id: str, models: list[str], drain: bool = False) -> SimpleNamespace:
    """What update_node reads of a registry NodeState: its id, drain flag and pools' last readings."""
    pools = [
        SimpleNamespace(
            pool_id=f"p{index}",
            ready=True,
            draining=False,
            slots_total=2,
            engine=SimpleNamespace(state="ready", model_id=model, url=f"http://{node_id}:{8000 + index}/"),
        )
        for index, model in enumerate(models)
    ]
    return SimpleNamespace(node_id=node_id, drain=drain, pools=pools)


def rebuilt(table: RoutingTable) -> dict[str, list[tuple[str, str]]]:
    expected: dict[str, list[tuple[str, str]]] = {}
    for pool in table.pools.values():
        expected.setdefault(pool.model, []).append(pool.key)
    return {model: sorted(keys) for model, keys in expected.items()}


def test_each_models_pools_stay_in_order_through_joins_moves_drains_and_drops():
    table = RoutingTable(is_live=lambda node_id: True, clock=lambda: 0.0)
    rng = random.Random(15)
    ids = [f"gpu-{n}" for n in range(60)]
    for step in range(3000):
        node_id = rng.choice(ids)
        action = rng.random()
        if action < 0.15:
            table.drop_node(node_id)
        else:
            models = [rng.choice(MODELS) for _ in range(rng.randint(0, 3))]
            table.update_node(node(node_id, models, drain=action > 0.9))
        held = {model: [pool.key for pool in pools] for model, pools in table.by_model.items()}
        assert held == rebuilt(table), f"step {step}"
        assert all(held.values()), "a model without pools keeps no empty list"
    assert table.by_model, "the walk ends with pools in the table"

"""The placement index against a brute-force reference: seeded random readings, drains, pools leaving,
nodes going offline and coming back, and placements for every strategy, model and VRAM filter in between.

In process, on the daemon's own index and placer (no HTTP): thousands of steps run in a few seconds, so
the lazy per-model heaps meet every path (caught up from the change log, rebuilt after long silences,
rebuilt after the log dropped what they had not read, swept when they grow) against answers computed from
scratch.
"""

from __future__ import annotations

import random
import sys

import pytest
from support import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "files" / "orchestratord"))

from orchestratord import schemas
from orchestratord.placement import NoPlacement, PlacementIndex, Placer
from orchestratord.registry import NodeState

GiB = 1024**3
NODE_COUNT = 40
POOLS_PER_NODE = 2
COMMON_MODELS = ["llama", "qwen", "mistral"]
RARE_MODELS = [f"rare-{n}" for n in range(6)]  # each on a few pools, asked for seldom
HEAVY_MODELS = [f"org/heavy-{n}" for n in range(300)]  # a few pools hold all of these
VRAM_NEEDS = (None, 0, 20 * GiB, 60 * GiB, 79 * GiB)
STRATEGIES = ("least-loaded", "round-robin", "random")
ENGINE_STATES = ("ready",) * 12 + ("busy", "loading", "dead")  # drawn from: mostly ready


def registration(node_id: str) -> schemas.Registration:
    return schemas.Registration(
        node_id=node_id,
        address=f"http://{node_id}.lab:8080",
        pools=[schemas.PoolSpec(pool_id=f"pool-{p}", gpus=[p], slots_total=8) for p in range(POOLS_PER_NODE)],
        capabilities=schemas.Capabilities(gpus=[], cpu_cores=8, ram_total_bytes=64 * GiB),
    )


class Cluster:
    """The index and placer under test, the readings they were given, and the reference's answers."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.index = PlacementIndex()
        self.nodes: dict[str, NodeState] = {}
        self.offline: set[str] = set()
        self.placer = Placer(self.index, self.nodes, {}, lambda node, now: node.node_id not in self.offline)
        self.reference_after: dict[str, tuple[str, str]] = {}  # the reference's own round-robin cursor
        for n in range(NODE_COUNT):
            node_id = f"gpu-{n:02d}"
            reg = registration(node_id)
            self.nodes[node_id] = NodeState(
                node_id=node_id, registration=reg, registered_at="", pool_ids=frozenset()
            )
            self.heartbeat(node_id)

    def models_for(self, node_id: str) -> list[str]:
        rng = self.rng
        models = rng.sample(COMMON_MODELS, rng.randint(0, len(COMMON_MODELS)))
        if rng.random() < 0.15:
            models += rng.sample(RARE_MODELS, rng.randint(1, 2))
        if node_id < "gpu-04":  # the heavy nodes: usually their long list, sometimes a change to it
            models += HEAVY_MODELS if rng.random() < 0.9 else rng.sample(HEAVY_MODELS, 150)
        return models

    def engine(self, node_id: str, pool_id: str, models: list[str]) -> schemas.EngineStatus | None:
        """Mostly an engine serving one of the staged models, in a state that is mostly ready."""
        rng = self.rng
        if not models or rng.random() < 0.05:
            return None
        return schemas.EngineStatus(
            kind="llama.cpp",
            state=rng.choice(ENGINE_STATES),
            model_id=rng.choice(models),
            url=f"http://{node_id}.lab:{8100 + int(pool_id[-1])}",
        )

    def reading(self, node_id: str, pool_id: str, models: list[str], engine=None) -> schemas.PoolStatus:
        rng = self.rng
        return schemas.PoolStatus(
            pool_id=pool_id,
            ready=rng.random() < 0.92,
            draining=rng.random() < 0.05,
            slots_total=8,
            slots_free=rng.choice((0, 1, 1, 2, 3, 8)),  # few values: ties on slots are common
            vram_total_bytes=80 * GiB,
            vram_free_bytes=rng.choice((10, 20, 40, 60, 79)) * GiB,
            engine=engine,
            models_available=models,
        )

    def heartbeat(self, node_id: str, loads_only: bool = False) -> None:
        """New readings for a node, which also brings it back online, as a heartbeat does."""
        node = self.nodes[node_id]
        pool_ids = [f"pool-{p}" for p in range(POOLS_PER_NODE)]
        if node.pools is not None and self.rng.random() < 0.1:
            pool_ids = pool_ids[:1]  # a pool missing from a heartbeat leaves the index
        pools = []
        for pool_id in pool_ids:
            before = {pool.pool_id: pool for pool in node.pools or ()}.get(pool_id)
            if loads_only and before:  # the same models and engine model; loads and the state move
                models = before.models_available
                engine = before.engine
                if engine is not None:
                    engine = schemas.EngineStatus(
                        kind=engine.kind,
                        state=self.rng.choice(ENGINE_STATES),
                        model_id=engine.model_id,
                        url=engine.url,
                    )
            else:
                models = self.models_for(node_id)
                engine = self.engine(node_id, pool_id, models)
            pools.append(self.reading(node_id, pool_id, models, engine))
        node.pools = pools
        self.offline.discard(node_id)
        self.index.update_node(node)

    def step(self) -> None:
        rng = self.rng
        node_id = rng.choice(list(self.nodes))
        roll = rng.random()
        if roll < 0.70:
            self.heartbeat(node_id, loads_only=rng.random() < 0.8)
        elif roll < 0.78:
            self.nodes[node_id].drain = not self.nodes[node_id].drain
            self.index.update_node(self.nodes[node_id])
        elif roll < 0.86:
            self.offline.add(node_id)  # silent: the index learns it only when a decision meets the node
        elif roll < 0.90:
            self.offline.add(node_id)
            self.index.drop_node(node_id)  # the sweep found it
        else:
            self.heartbeat(node_id)

    def candidates(self, model: str | None, vram_needed: int) -> list[tuple[tuple[int, int], str, str]]:
        """Every pool that may take the request now, from the readings alone: (load, node_id, pool_id)."""
        found = []
        for node_id, node in self.nodes.items():
            if node_id in self.offline or node.drain:
                continue
            for pool in node.pools or ():
                if not pool.ready or pool.draining or pool.slots_free <= 0:
                    continue
                if pool.engine is None or pool.engine.state != "ready":
                    continue
                if model is not None and model != pool.engine.model_id:
                    continue
                if pool.vram_free_bytes < vram_needed:
                    continue
                found.append(((-pool.slots_free, -pool.vram_free_bytes), node_id, pool.pool_id))
        return found

    def check_placement(self, model: str | None, vram_bytes: int | None, strategy: str) -> None:
        request = schemas.PlacementRequest(model_id=model, vram_bytes=vram_bytes, strategy=strategy)
        try:
            answer = self.placer.place(request, 0.0)
            got = (answer.node_id, answer.pool_id)
            engine = {pool.pool_id: pool.engine for pool in self.nodes[got[0]].pools}[got[1]]
            assert (answer.engine_url, answer.model_id) == (engine.url, engine.model_id)
        except NoPlacement:
            got = None
        fitting = self.candidates(model, vram_bytes or 0)
        keys = sorted((node_id, pool_id) for _load, node_id, pool_id in fitting)
        label = f"{strategy} model={model!r} vram_bytes={vram_bytes}"
        if strategy == "least-loaded":
            expected = min(fitting)[1:] if fitting else None
            assert got == expected, label
        elif strategy == "round-robin":
            cursor_key = model or ""
            after = self.reference_after.get(cursor_key)
            expected = next((key for key in keys if after is None or key > after), keys[0] if keys else None)
            if expected is not None:
                self.reference_after[cursor_key] = expected
            assert got == expected, label
        else:
            assert (got is None) == (not keys), label
            assert got is None or got in keys, label

    def check_bounds(self) -> None:
        """The log and the heaps stay proportional to the pools, however long the run."""
        pools = len(self.index.entries)
        assert len(self.index.changes) <= 2 * (pools + 1024)
        for model, heap in self.index.by_load.items():
            members = len(self.index.by_id[model])
            assert len(heap) <= 3 * members + 64, model


def ask(cluster: Cluster) -> None:
    rng = cluster.rng
    roll = rng.random()
    if roll < 0.5:
        model = rng.choice(COMMON_MODELS)
    elif roll < 0.65:
        model = None
    elif roll < 0.8:
        model = rng.choice(HEAVY_MODELS)
    elif roll < 0.97:
        model = rng.choice(RARE_MODELS)
    else:
        model = "nobody-has-this"
    cluster.check_placement(model, rng.choice(VRAM_NEEDS), rng.choice(STRATEGIES))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_index_answers_like_a_brute_force_reference(seed):
    cluster = Cluster(seed)
    for round_number in range(300):
        # Bursts of changes between questions: the heaps of models not asked for fall behind, some past
        # what the change log keeps, and must still answer as if they had followed every change.
        for _ in range(cluster.rng.choice((1, 5, 40, 400 if round_number % 5 == 0 else 20))):
            cluster.step()
        for _ in range(cluster.rng.randint(1, 30)):
            ask(cluster)
        cluster.check_bounds()
    assert cluster.index.changes_base > 0, "the run never reached the change log's trimming"


def test_a_heap_the_change_log_moved_past_is_rebuilt_and_answers_right():
    cluster = Cluster(7)
    for model in (*COMMON_MODELS, *RARE_MODELS):
        cluster.check_placement(model, None, "least-loaded")  # every heap current at this log position
    behind = dict(cluster.index.synced)
    for _ in range(3 * (len(cluster.index.entries) + 1024)):
        cluster.heartbeat(cluster.rng.choice(list(cluster.nodes)), loads_only=True)
    # A model whose last pool left and came back starts a new heap; the others fell behind the log.
    left_behind = [model for model, synced in cluster.index.synced.items() if behind.get(model) == synced]
    assert left_behind and all(behind[model] < cluster.index.changes_base for model in left_behind)
    for model in (*COMMON_MODELS, *RARE_MODELS, None):
        for vram_bytes in VRAM_NEEDS:
            cluster.check_placement(model, vram_bytes, "least-loaded")

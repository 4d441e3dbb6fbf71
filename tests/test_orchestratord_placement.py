"""Placement: filters, strategies and the (node_id, pool_id) tie-break."""

from __future__ import annotations

import random
from collections import Counter

from support import sample_registration
from support_daemon import GiB, beat_pools, engine_url, online_node, place, pool_reading, serving


def ready_pool(pool_id: str, model: str = "llama", node_id: str = "gpu-1", **overrides):
    """A reading of a pool of `node_id` whose engine serves `model` and is ready."""
    return pool_reading(pool_id, [model], **{"engine": serving(node_id, pool_id, model), **overrides})


def pick(daemon, **request) -> tuple[str, str]:
    answer = place(daemon, **request)
    assert answer.status == 200, answer.text
    return answer.body["node_id"], answer.body["pool_id"]


def test_placement_answers_the_chosen_engines_url(daemon):
    online_node(daemon, "gpu-1", ["llama"], serve="llama")
    answer = place(daemon, model_id="llama")
    assert answer.body == {
        "node_id": "gpu-1",
        "pool_id": "pool-0",
        "address": "http://gpu-1.lab:8080",
        "strategy": "least-loaded",
        "engine_url": "http://gpu-1.lab:8100",
        "engine_kind": "llama.cpp",
        "model_id": "llama",
    }


def test_each_pool_answers_its_own_engine_url(daemon):
    daemon.api("POST", "/v2/nodes/register", sample_registration("gpu-1", pools=2))
    beat_pools(daemon, "gpu-1", [ready_pool("pool-0", "llama"), ready_pool("pool-1", "qwen")])
    for model, pool_id in (("llama", "pool-0"), ("qwen", "pool-1")):
        answer = place(daemon, model_id=model)
        assert answer.status == 200, answer.text
        assert (answer.body["pool_id"], answer.body["engine_url"]) == (pool_id, engine_url("gpu-1", pool_id))
        assert answer.body["model_id"] == model
    # Without a model asked, the answer says which model the chosen engine serves.
    assert place(daemon).body["model_id"] in {"llama", "qwen"}


def test_only_ready_engines_of_the_model_are_candidates(daemon):
    """Busy, loading and dead engines serving the model, an engine serving another model, and a pool with
    no engine that stages the model are never picked, by any strategy."""
    daemon.api("POST", "/v2/nodes/register", sample_registration("gpu-1", pools=6))
    busy = ready_pool("pool-0", engine=serving("gpu-1", "pool-0", "llama", "busy"), slots_free=0)
    # Out of rule (busy with a free slot) yet still refused: only `ready` takes new work.
    busy_but_free = ready_pool("pool-1", engine=serving("gpu-1", "pool-1", "llama", "busy"))
    loading = ready_pool("pool-2", ready=False, engine=serving("gpu-1", "pool-2", "llama", "loading"))
    dead = ready_pool("pool-3", ready=False, engine=serving("gpu-1", "pool-3", "llama", "dead"))
    staged_only = pool_reading("pool-4", ["llama"], engine=None)
    other_model = ready_pool("pool-5", "qwen", slots_free=4)
    beat_pools(daemon, "gpu-1", [busy, busy_but_free, loading, dead, staged_only, other_model])
    for strategy in ("least-loaded", "round-robin", "random"):
        answer = place(daemon, model_id="llama", strategy=strategy)
        assert answer.status == 503, answer.text
        assert answer.body["code"] == "NO_CAPACITY"
        assert "busy, loading, dead or drained" in answer.body["message"]
    # A ready pool whose GPUs are unhealthy (pool not ready) is not a candidate either.
    unhealthy = ready_pool("pool-3", ready=False)
    beat_pools(daemon, "gpu-1", [busy, busy_but_free, loading, unhealthy, staged_only, other_model])
    assert place(daemon, model_id="llama").status == 503
    # Once the dead engine comes back ready, it is the one answer.
    back = ready_pool("pool-3", slots_free=2)
    beat_pools(daemon, "gpu-1", [busy, busy_but_free, loading, back, staged_only, other_model])
    for strategy in ("least-loaded", "round-robin", "random"):
        answer = place(daemon, model_id="llama", strategy=strategy)
        assert (answer.body["pool_id"], answer.body["engine_url"]) == (
            "pool-3",
            engine_url("gpu-1", "pool-3"),
        )


def test_staged_but_not_served_is_model_not_available(daemon):
    online_node(daemon, "gpu-1", ["llama", "qwen"], serve="qwen")
    online_node(daemon, "gpu-2", ["llama"])  # no engine at all
    answer = place(daemon, model_id="llama")
    assert answer.status == 503
    assert answer.body == {
        "code": "MODEL_NOT_AVAILABLE",
        "message": "model 'llama' is staged on 2 online node(s) but no engine serves it",
    }
    assert place(daemon, model_id="qwen").body["node_id"] == "gpu-1"


def test_a_pool_without_an_engine_takes_no_work_even_without_a_model_asked(daemon):
    online_node(daemon, "gpu-1", ["llama"])
    answer = place(daemon)
    assert answer.status == 503
    assert answer.body["code"] == "NO_CAPACITY"


def test_placement_by_model(daemon):
    online_node(daemon, "gpu-1", ["llama"], serve="llama")
    online_node(daemon, "gpu-2", ["qwen"], serve="qwen")
    assert pick(daemon, model_id="qwen") == ("gpu-2", "pool-0")
    assert pick(daemon, model_id="llama") == ("gpu-1", "pool-0")


def test_unknown_model_is_model_not_available(daemon):
    online_node(daemon, "gpu-1", ["llama"], serve="llama")
    answer = place(daemon, model_id="mixtral")
    assert answer.status == 503
    assert answer.body["code"] == "MODEL_NOT_AVAILABLE"
    assert "mixtral" in answer.body["message"]


def test_placement_by_vram(daemon):
    online_node(daemon, "gpu-small", ["llama"], serve="llama", vram_free_bytes=10 * GiB)
    online_node(daemon, "gpu-big", ["llama"], serve="llama", vram_free_bytes=60 * GiB)
    assert pick(daemon, model_id="llama", vram_bytes=20 * GiB) == ("gpu-big", "pool-0")
    assert pick(daemon, model_id="llama", vram_bytes=60 * GiB) == ("gpu-big", "pool-0")
    too_much = place(daemon, model_id="llama", vram_bytes=61 * GiB)
    assert too_much.status == 503
    assert too_much.body["code"] == "NO_CAPACITY"


def test_least_loaded_prefers_free_slots_then_free_vram(daemon):
    daemon.api("POST", "/v2/nodes/register", sample_registration("gpu-1", pools=3))
    beat_pools(
        daemon,
        "gpu-1",
        [
            ready_pool("pool-0", slots_free=1, vram_free_bytes=70 * GiB),
            ready_pool("pool-1", slots_free=3, vram_free_bytes=20 * GiB),
            ready_pool("pool-2", slots_free=3, vram_free_bytes=30 * GiB),
        ],
    )
    assert pick(daemon, model_id="llama") == ("gpu-1", "pool-2")
    # A heartbeat that changes the load moves the answer: the index follows heartbeats.
    beat_pools(
        daemon,
        "gpu-1",
        [
            ready_pool("pool-0", slots_free=4, vram_free_bytes=70 * GiB),
            ready_pool("pool-1", slots_free=3, vram_free_bytes=20 * GiB),
            ready_pool("pool-2", slots_free=0, vram_free_bytes=30 * GiB),
        ],
    )
    assert pick(daemon, model_id="llama") == ("gpu-1", "pool-0")


def test_ties_break_on_node_then_pool_whatever_the_arrival_order(daemon):
    for node_id in ["gpu-c", "gpu-a", "gpu-b"]:
        online_node(daemon, node_id, ["llama"], serve="llama", pools=2)
    answers = {pick(daemon, model_id="llama") for _ in range(10)}
    assert answers == {("gpu-a", "pool-0")}
    assert pick(daemon) == ("gpu-a", "pool-0")


def test_same_state_gives_the_same_answer_after_a_restart(daemon):
    for node_id in ["gpu-2", "gpu-1"]:
        online_node(daemon, node_id, ["llama"], serve="llama", pools=2)
    before = pick(daemon, model_id="llama")
    daemon.restart()
    after = pick(daemon, model_id="llama")
    assert before == after == ("gpu-1", "pool-0")


def test_round_robin_spreads_over_every_candidate(daemon):
    for node_id in ["gpu-1", "gpu-2", "gpu-3"]:
        online_node(daemon, node_id, ["llama"], serve="llama", pools=2)
    online_node(daemon, "gpu-other", ["qwen"], serve="qwen")
    picks = [pick(daemon, model_id="llama", strategy="round-robin") for _ in range(12)]
    counts = Counter(picks)
    assert len(counts) == 6
    assert set(counts.values()) == {2}
    # In (node_id, pool_id) order, wrapping around.
    assert picks[:6] == sorted(picks[:6])
    assert picks[6:] == picks[:6]


def test_random_picks_only_candidates(daemon):
    online_node(daemon, "gpu-1", ["llama"], serve="llama", pools=2)
    online_node(daemon, "gpu-2", ["llama"], serve="llama", ready=False)
    online_node(daemon, "gpu-3", ["qwen"], serve="qwen")
    picks = {pick(daemon, model_id="llama", strategy="random") for _ in range(30)}
    assert picks <= {("gpu-1", "pool-0"), ("gpu-1", "pool-1")}
    assert len(picks) == 2  # 30 fair coin flips all landing on one side: 2**-29


def test_operator_drained_node_is_skipped(daemon):
    online_node(daemon, "gpu-1", ["llama"], serve="llama")
    online_node(daemon, "gpu-2", ["llama"], serve="llama")
    daemon.api("POST", "/v2/nodes/gpu-1/drain", {"drain": True})
    for strategy in ("least-loaded", "round-robin", "random"):
        for _ in range(4):
            assert pick(daemon, model_id="llama", strategy=strategy) == ("gpu-2", "pool-0")
    daemon.api("POST", "/v2/nodes/gpu-1/drain", {"drain": False})
    assert pick(daemon, model_id="llama") == ("gpu-1", "pool-0")


def test_draining_not_ready_and_full_pools_are_skipped(daemon):
    daemon.api("POST", "/v2/nodes/register", sample_registration("gpu-1", pools=4))
    beat_pools(
        daemon,
        "gpu-1",
        [
            ready_pool("pool-0", draining=True),
            ready_pool("pool-1", ready=False),
            ready_pool("pool-2", slots_free=0),
            ready_pool("pool-3", slots_free=1),
        ],
    )
    for strategy in ("least-loaded", "round-robin", "random"):
        assert pick(daemon, model_id="llama", strategy=strategy) == ("gpu-1", "pool-3")
    beat_pools(daemon, "gpu-1", [ready_pool("pool-3", slots_free=0)])
    answer = place(daemon, model_id="llama")
    assert answer.status == 503
    assert answer.body["code"] == "NO_CAPACITY"


def test_registering_node_gets_no_work(daemon):
    daemon.api("POST", "/v2/nodes/register", sample_registration("gpu-1"))
    answer = place(daemon)
    assert answer.status == 503
    assert answer.body["code"] == "NO_CAPACITY"


def test_deleted_node_gets_no_work(daemon):
    online_node(daemon, "gpu-1", ["llama"], serve="llama")
    daemon.api("DELETE", "/v2/nodes/gpu-1")
    assert place(daemon, model_id="llama").body["code"] == "MODEL_NOT_AVAILABLE"


def expected_least_loaded(readings: dict[str, list[dict]], model: str | None, vram: int):
    """The contract's rule, computed by brute force over every pool."""
    candidates = [
        (-pool["slots_free"], -pool["vram_free_bytes"], node_id, pool["pool_id"])
        for node_id, pools in readings.items()
        for pool in pools
        if pool["ready"]
        and not pool["draining"]
        and pool["slots_free"] > 0
        and pool["vram_free_bytes"] >= vram
        and pool["engine"] is not None
        and pool["engine"]["state"] == "ready"
        and (model is None or pool["engine"]["model_id"] == model)
    ]
    return min(candidates)[2:] if candidates else None


def test_least_loaded_matches_brute_force_as_loads_change(daemon):
    """Many heartbeats that move loads, models, engine states and readiness; every answer equals the
    brute-force pick, and every answer carries the picked pool's engine URL."""
    rng = random.Random(7)
    models = ["llama", "qwen", "mistral"]
    node_ids = [f"gpu-{n}" for n in range(5)]
    for node_id in node_ids:
        daemon.api("POST", "/v2/nodes/register", sample_registration(node_id, pools=2))
    readings: dict[str, list[dict]] = {}
    for _ in range(25):
        for node_id in rng.sample(node_ids, 3):
            readings[node_id] = [
                pool_reading(
                    f"pool-{p}",
                    rng.sample(models, rng.randint(0, 2)),
                    slots_free=rng.randint(0, 2),
                    slots_total=2,
                    vram_free_bytes=rng.choice([10, 20, 30]) * GiB,
                    ready=rng.random() > 0.2,
                    engine=None
                    if rng.random() < 0.15
                    else serving(
                        node_id,
                        f"pool-{p}",
                        rng.choice(models),
                        rng.choice(["ready", "ready", "ready", "busy", "loading", "dead"]),
                    ),
                )
                for p in range(2)
            ]
            beat_pools(daemon, node_id, readings[node_id])
        for model in [None, *models]:
            vram = rng.choice([0, 15 * GiB, 25 * GiB])
            request = {"vram_bytes": vram} if model is None else {"model_id": model, "vram_bytes": vram}
            answer = place(daemon, **request)
            expected = expected_least_loaded(readings, model, vram)
            if expected is None:
                assert answer.status == 503, answer.text
            else:
                assert (answer.body["node_id"], answer.body["pool_id"]) == expected, (model, vram)
                assert answer.body["engine_url"] == engine_url(*expected)

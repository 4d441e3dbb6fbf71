"""The llorch_registry inventory plugin through `ansible-inventory`, against a real orchestratord."""

from __future__ import annotations

import json

import pytest
from support import engine_status, free_port, wait_until
from support_registry import (
    add_node,
    ansible_env,
    group_hosts,
    inventory_file,
    inventory_list,
    node_record,
    plain,
    run,
    send_heartbeat,
)

STATUS_GROUPS = ["llorch_draining", "llorch_offline", "llorch_online", "llorch_registering"]


@pytest.fixture
def slow_daemon(daemon_factory):
    """A daemon whose nodes stay online for the whole test, however slow the machine."""
    return daemon_factory(node_timeout_ms=120_000)


def test_nodes_become_hosts_in_status_and_model_groups_with_lean_vars(slow_daemon, tmp_path):
    add_node(slow_daemon, "gpu-a", ["meta-llama/Llama-3.1-8B", "qwen2.5:7b"])
    add_node(slow_daemon, "gpu-b", ["meta-llama/Llama-3.1-8B"])
    add_node(slow_daemon, "gpu-c", heartbeat=False)
    add_node(slow_daemon, "gpu-d", ["drained-only-model"])
    assert slow_daemon.api("POST", "/v2/nodes/gpu-d/drain", {"drain": True}).status == 200
    env = ansible_env(slow_daemon, tmp_path)
    source = inventory_file(tmp_path, set_ansible_host=True)

    listing = inventory_list(env, source)

    assert group_hosts(listing, "llorch_nodes") == ["gpu-a", "gpu-b", "gpu-c", "gpu-d"]
    assert group_hosts(listing, "llorch_online") == ["gpu-a", "gpu-b"]
    assert group_hosts(listing, "llorch_registering") == ["gpu-c"]
    assert group_hosts(listing, "llorch_draining") == ["gpu-d"]
    assert group_hosts(listing, "llorch_offline") == []
    assert "llorch_offline" in listing["all"]["children"]  # defined even when empty
    # Model groups hold online nodes only, named with every character outside [A-Za-z0-9_] made _.
    assert group_hosts(listing, "llorch_model_meta_llama_Llama_3_1_8B") == ["gpu-a", "gpu-b"]
    assert group_hosts(listing, "llorch_model_qwen2_5_7b") == ["gpu-a"]
    assert "llorch_model_drained_only_model" not in listing

    gpu_a = listing["_meta"]["hostvars"]["gpu-a"]
    assert gpu_a == {
        "ansible_host": "gpu-a.lab",
        "llorch_node_id": "gpu-a",
        "llorch_status": "online",
        "llorch_address": "http://gpu-a.lab:8080",
        "llorch_models": ["meta-llama/Llama-3.1-8B", "qwen2.5:7b"],
        "llorch_served": [],
        "llorch_engines": [],
        "llorch_pools": ["pool-0", "pool-1"],
        "llorch_gpus": 2,
        "llorch_last_heartbeat_at": node_record(slow_daemon, "gpu-a")["last_heartbeat_at"],
    }
    assert listing["_meta"]["hostvars"]["gpu-c"]["llorch_last_heartbeat_at"] is None

    graph = run(["ansible-inventory", "-i", str(source), "--graph", "llorch_online"], env)
    assert graph.returncode == 0, graph.stderr
    assert graph.stdout.split() == ["@llorch_online:", "|--gpu-a", "|--gpu-b"]


def test_the_controllers_reader_file_is_all_the_inventory_needs(slow_daemon, tmp_path):
    """Least privilege: the reader credential role orchestratord issues reads the nodes; no admin token."""
    add_node(slow_daemon, "gpu-a", ["m1"])
    issued = slow_daemon.api("POST", "/v2/credentials", {"name": "ansible-reader-inv", "scope": "reader"})
    assert issued.status == 201, issued.text
    reader = tmp_path / "reader.token"
    reader.write_text(issued.body["secret"] + "\n")
    reader.chmod(0o600)
    env = ansible_env(slow_daemon, tmp_path)
    del env["LLORCH_API_TOKEN"]

    listing = inventory_list(env, inventory_file(tmp_path, token_file=str(reader)))

    assert group_hosts(listing, "llorch_online") == ["gpu-a"]
    # The reader may read, nothing more: the same secret cannot drain the node it just listed.
    refused = slow_daemon.api("POST", "/v2/nodes/gpu-a/drain", {"drain": True}, token=issued.body["secret"])
    assert refused.status == 403, refused.text


def test_engines_give_serving_groups_a_down_group_and_lean_vars(slow_daemon, tmp_path):
    llama = "meta-llama/Llama-3.1-8B"
    url_a0, url_a1 = "http://10.89.0.11:8101", "http://10.89.0.11:8102"
    add_node(
        slow_daemon,
        "gpu-a",
        [llama, "qwen2.5:7b"],
        engines=[engine_status(llama, url_a0, version="b6000"), engine_status("qwen2.5:7b", url_a1, "busy")],
    )
    # gpu-b stages llama but its engine is loading it; its second pool has no engine.
    add_node(
        slow_daemon, "gpu-b", [llama], engines=[engine_status(llama, "http://10.89.0.12:8101", "loading")]
    )
    # gpu-c serves llama on one pool; the other pool's engine died.
    add_node(
        slow_daemon,
        "gpu-c",
        [llama],
        engines=[
            engine_status(llama, "http://10.89.0.13:8101"),
            engine_status(llama, "http://10.89.0.13:8102", "dead"),
        ],
    )
    add_node(slow_daemon, "gpu-d", [llama], engines=[engine_status(llama, "http://10.89.0.14:8101", "dead")])
    assert slow_daemon.api("POST", "/v2/nodes/gpu-d/drain", {"drain": True}).status == 200
    add_node(slow_daemon, "gpu-e", heartbeat=False)

    listing = inventory_list(ansible_env(slow_daemon, tmp_path), inventory_file(tmp_path))

    # Serving groups: online nodes whose engine serves the model now (ready or busy), not mere staging.
    assert group_hosts(listing, "llorch_model_meta_llama_Llama_3_1_8B") == ["gpu-a", "gpu-b", "gpu-c"]
    assert group_hosts(listing, "llorch_serving_meta_llama_Llama_3_1_8B") == ["gpu-a", "gpu-c"]
    assert group_hosts(listing, "llorch_serving_qwen2_5_7b") == ["gpu-a"]
    # Down: online or draining nodes with an engine loading or dead (gpu-d is drained, its engine dead).
    assert group_hosts(listing, "llorch_engine_down") == ["gpu-b", "gpu-c", "gpu-d"]

    hostvars = listing["_meta"]["hostvars"]
    assert hostvars["gpu-a"]["llorch_served"] == [llama, "qwen2.5:7b"]
    assert hostvars["gpu-a"]["llorch_engines"] == [
        {"pool_id": "pool-0", "kind": "llama.cpp", "state": "ready", "model_id": llama, "url": url_a0},
        {"pool_id": "pool-1", "kind": "llama.cpp", "state": "busy", "model_id": "qwen2.5:7b", "url": url_a1},
    ]
    assert hostvars["gpu-b"]["llorch_served"] == []
    assert [engine["state"] for engine in hostvars["gpu-b"]["llorch_engines"]] == ["loading"]
    assert hostvars["gpu-e"]["llorch_engines"] == [] and hostvars["gpu-e"]["llorch_served"] == []


def test_engine_down_is_defined_when_every_engine_serves(slow_daemon, tmp_path):
    add_node(slow_daemon, "gpu-a", ["m1"], engines=[engine_status("m1"), engine_status("m1", "http://a:1")])
    listing = inventory_list(ansible_env(slow_daemon, tmp_path), inventory_file(tmp_path))
    assert "llorch_engine_down" in listing["all"]["children"]
    assert group_hosts(listing, "llorch_engine_down") == []
    assert group_hosts(listing, "llorch_serving_m1") == ["gpu-a"]


def test_ansible_host_is_not_taken_from_the_registry_by_default(slow_daemon, tmp_path):
    # Anyone with the shared API token can re-register a node with another address; by default that
    # address must not become where Ansible connects (with become) to.
    add_node(slow_daemon, "gpu-a", ["m1"])
    add_node(slow_daemon, "gpu-b", heartbeat=False)

    listing = inventory_list(ansible_env(slow_daemon, tmp_path), inventory_file(tmp_path))

    hostvars = listing["_meta"]["hostvars"]
    assert sorted(hostvars) == ["gpu-a", "gpu-b"]
    for node_id, variables in hostvars.items():
        assert "ansible_host" not in variables, (node_id, variables)
        assert variables["llorch_address"] == f"http://{node_id}.lab:8080"  # still there, as data


def test_a_static_ansible_host_survives_a_registry_source_listed_after_it(slow_daemon, tmp_path):
    # The README's layered use: `-i static -i registry`, the registry last. gpu-a registered (or was
    # re-registered by someone holding the token) with the address gpu-a.lab.
    add_node(slow_daemon, "gpu-a", ["m1"])
    static = tmp_path / "static.yml"
    static.write_text(
        "all:\n  children:\n    gpu_nodes:\n      hosts:\n"
        "        gpu-a: {ansible_host: 10.0.0.11, ansible_user: ops}\n"
    )
    env = ansible_env(slow_daemon, tmp_path)

    def layered(registry_source) -> dict:
        done = run(["ansible-inventory", "-i", str(static), "-i", str(registry_source), "--list"], env)
        assert done.returncode == 0 and "Unable to parse" not in done.stderr, done.stderr
        return plain(json.loads(done.stdout))

    listing = layered(inventory_file(tmp_path))
    gpu_a = listing["_meta"]["hostvars"]["gpu-a"]
    assert gpu_a["ansible_host"] == "10.0.0.11" and gpu_a["ansible_user"] == "ops", gpu_a
    assert gpu_a["llorch_status"] == "online"  # the registry's variables and groups still merge in
    assert group_hosts(listing, "llorch_model_m1") == ["gpu-a"]

    # Asked for explicitly, the registry's address wins, being the later source.
    opted_in = layered(inventory_file(tmp_path, "opted-in", set_ansible_host=True))
    assert opted_in["_meta"]["hostvars"]["gpu-a"]["ansible_host"] == "gpu-a.lab"


def test_model_groups_follow_heartbeats_and_statuses_filters(slow_daemon, tmp_path):
    gpu_a = add_node(slow_daemon, "gpu-a", ["model-one"])
    add_node(slow_daemon, "gpu-b", ["model-one"])
    env = ansible_env(slow_daemon, tmp_path)
    source = inventory_file(tmp_path)
    assert group_hosts(inventory_list(env, source), "llorch_model_model_one") == ["gpu-a", "gpu-b"]

    # gpu-a's agent now reports a different model: the groups follow at the next read.
    send_heartbeat(slow_daemon, gpu_a, ["model-two"])
    listing = inventory_list(env, source)
    assert group_hosts(listing, "llorch_model_model_one") == ["gpu-b"]
    assert group_hosts(listing, "llorch_model_model_two") == ["gpu-a"]

    assert slow_daemon.api("POST", "/v2/nodes/gpu-b/drain", {"drain": True}).status == 200
    only_draining = inventory_list(env, inventory_file(tmp_path, "draining", statuses=["draining"]))
    assert group_hosts(only_draining, "llorch_nodes") == ["gpu-b"]
    assert group_hosts(only_draining, "llorch_online") == []
    assert set(only_draining["_meta"]["hostvars"]) == {"gpu-b"}


def test_offline_nodes_leave_the_model_groups(daemon_factory, tmp_path):
    daemon = daemon_factory(node_timeout_ms=300)
    add_node(daemon, "gpu-gone", ["model-one"])
    wait_until(lambda: node_record(daemon, "gpu-gone")["status"] == "offline", what="gpu-gone offline")

    listing = inventory_list(ansible_env(daemon, tmp_path), inventory_file(tmp_path))

    assert group_hosts(listing, "llorch_offline") == ["gpu-gone"]
    assert listing["_meta"]["hostvars"]["gpu-gone"]["llorch_models"] == ["model-one"]
    assert "llorch_model_model_one" not in listing


def test_constructable_compose_groups_and_keyed_groups(slow_daemon, tmp_path):
    add_node(slow_daemon, "gpu-a", ["m1", "m2"])
    add_node(slow_daemon, "gpu-b", ["m1"])
    env = ansible_env(slow_daemon, tmp_path)
    source = inventory_file(
        tmp_path,
        compose={"gpu_count": "llorch_gpus * 10", "ansible_port": "2222"},
        groups={"multi_model": "llorch_models | length > 1"},
        keyed_groups=[
            {"key": "llorch_status", "prefix": "state"},
            {"key": "gpu_count | string", "prefix": "gpus"},
        ],
    )

    listing = inventory_list(env, source)

    assert listing["_meta"]["hostvars"]["gpu-a"]["gpu_count"] == 20
    assert listing["_meta"]["hostvars"]["gpu-a"]["ansible_port"] == 2222
    assert group_hosts(listing, "multi_model") == ["gpu-a"]
    assert group_hosts(listing, "state_online") == ["gpu-a", "gpu-b"]
    assert group_hosts(listing, "gpus_20") == ["gpu-a", "gpu-b"]

    # strict: a compose expression that cannot be evaluated fails the source instead of being skipped.
    lenient = inventory_file(tmp_path, "lenient", compose={"broken": "no_such_variable.field"})
    assert "broken" not in inventory_list(env, lenient)["_meta"]["hostvars"]["gpu-a"]
    strict = inventory_file(tmp_path, "strict", strict=True, compose={"broken": "no_such_variable.field"})
    done = run(["ansible-inventory", "-i", str(strict), "--list"], env)
    assert "Could not set broken for host gpu-a" in done.stderr


def test_detailed_vars_add_whole_pool_and_gpu_records(slow_daemon, tmp_path):
    add_node(slow_daemon, "gpu-a", ["m1"], slots_free=1)
    listing = inventory_list(ansible_env(slow_daemon, tmp_path), inventory_file(tmp_path, detailed_vars=True))

    hostvars = listing["_meta"]["hostvars"]["gpu-a"]
    assert hostvars["llorch_pools"] == ["pool-0", "pool-1"] and hostvars["llorch_gpus"] == 2
    pools = hostvars["llorch_pools_detail"]
    assert [(pool["pool_id"], pool["slots_free"], pool["models_available"]) for pool in pools] == [
        ("pool-0", 1, ["m1"]),
        ("pool-1", 1, ["m1"]),
    ]
    assert hostvars["llorch_gpus_detail"][0]["vram_total_bytes"] == 80 * 1024**3


def test_cache_hit_avoids_a_request_and_flush_asks_again(slow_daemon, tmp_path):
    add_node(slow_daemon, "gpu-a", ["m1"])
    env = ansible_env(slow_daemon, tmp_path)
    cache_dir = tmp_path / "inventory-cache"
    uncached = inventory_file(
        tmp_path, "uncached", cache=False, cache_plugin="jsonfile", cache_connection=str(cache_dir)
    )
    cached = inventory_file(
        tmp_path, "cached", cache=True, cache_plugin="jsonfile", cache_connection=str(cache_dir)
    )

    assert group_hosts(inventory_list(env, uncached), "llorch_nodes") == ["gpu-a"]
    assert not cache_dir.exists() or not any(cache_dir.iterdir()), "cache written although caching is off"
    assert group_hosts(inventory_list(env, cached), "llorch_nodes") == ["gpu-a"]
    assert len(list(cache_dir.iterdir())) == 1

    # With the registry gone, a cache hit still answers: it made no request.
    add_node(slow_daemon, "gpu-b", ["m1"])
    slow_daemon.stop()
    assert group_hosts(inventory_list(env, cached), "llorch_nodes") == ["gpu-a"]

    slow_daemon.start()
    flushed = inventory_list(env, cached, "--flush-cache")
    assert group_hosts(flushed, "llorch_nodes") == ["gpu-a", "gpu-b"]
    # ...and the fresh answer was written back for the next cached read.
    slow_daemon.stop()
    assert group_hosts(inventory_list(env, cached), "llorch_nodes") == ["gpu-a", "gpu-b"]


def test_bad_token_and_dead_registry_give_one_line_reasons_without_the_token(daemon, tmp_path):
    source = inventory_file(tmp_path)
    wrong_token = "wrong-token-" + "y" * 40

    rejected = run(
        ["ansible-inventory", "-vvvv", "-i", str(source), "--list"],
        ansible_env(daemon, tmp_path, LLORCH_API_TOKEN=wrong_token),
    )
    assert f"token rejected by {daemon.url} (401)" in rejected.stderr
    unreachable_url = f"http://127.0.0.1:{free_port()}"  # a port nothing listens on
    dead = run(
        ["ansible-inventory", "-i", str(source), "--list"],
        ansible_env(daemon, tmp_path, LLORCH_URL=unreachable_url),
    )
    assert f"cannot reach the registry at {unreachable_url}: connection refused" in dead.stderr
    accepted = run(["ansible-inventory", "-vvvv", "-i", str(source), "--list"], ansible_env(daemon, tmp_path))
    assert accepted.returncode == 0, accepted.stderr

    for done in (rejected, dead, accepted):
        output = done.stdout + done.stderr
        assert "Traceback" not in output
        assert wrong_token not in output
        assert daemon.token not in output


def test_ansible_doc_resolves_the_shared_option_fragment(tmp_path):
    done = run(
        ["ansible-doc", "--json", "-t", "inventory", "llorch.kit.llorch_registry"],
        ansible_env(None, tmp_path),
    )
    assert done.returncode == 0, done.stderr
    options = json.loads(done.stdout)["llorch.kit.llorch_registry"]["doc"]["options"]
    # Own options, the shared llorch fragment, and Ansible's constructed and cache fragments.
    assert {
        "statuses",
        "detailed_vars",
        "set_ansible_host",
        "url",
        "token",
        "token_file",
        "ca_path",
        "keyed_groups",
        "cache_plugin",
    } <= set(options)
    assert options["token"]["env"] == [{"name": "LLORCH_API_TOKEN"}]
    assert options["set_ansible_host"]["default"] is False

"""The validate_inventory role: a wrong inventory fails in seconds, naming the variable."""

from __future__ import annotations

from support import TEST_TOKEN
from support_roles import local_host, validate


def inventory(control=("ctl",), gpu_pools=None, **shared):
    shared_vars = {"llorch_api_token": TEST_TOKEN, "llorch_control_url": "https://ctl:9200", **shared}
    gpu_hosts = {
        name: local_host(**({"pool_managerd_pools": pools} if pools is not None else {}))
        for name, pools in (gpu_pools or {"gpu-1": None}).items()
    }
    return {
        "all": {
            "vars": shared_vars,
            "children": {
                "control": {"hosts": {name: local_host() for name in control}},
                "gpu_nodes": {"hosts": gpu_hosts},
            },
        }
    }


def test_a_good_inventory_passes(tmp_path):
    pools = [{"pool_id": "a", "gpus": [0], "slots_total": 2}, {"pool_id": "b", "gpus": [1], "slots_total": 2}]
    rc, message = validate(tmp_path, inventory(gpu_pools={"gpu-1": pools, "gpu-2": None}))
    assert rc == 0, message


def test_two_control_hosts_are_refused(tmp_path):
    rc, message = validate(tmp_path, inventory(control=("ctl-a", "ctl-b")))
    assert rc != 0
    assert "'control' holds 2 host(s)" in message


def test_short_token_is_refused_without_showing_it(tmp_path):
    rc, message = validate(tmp_path, inventory(llorch_api_token="short-token-123"))
    assert rc != 0
    assert "short-token-123" not in message  # no_log hides the whole result, token included


def test_the_example_placeholder_token_is_refused_by_name(tmp_path):
    # The placeholder of inventories/example/group_vars/all/vault.yml.
    placeholder = "REPLACE-ME-with-a-vaulted-token-of-32-chars-or-more"

    rc, message = validate(tmp_path, inventory(llorch_api_token=placeholder))

    assert rc != 0
    assert "llorch_api_token is still the placeholder" in message
    assert placeholder not in message


def test_url_without_scheme_is_refused(tmp_path):
    rc, message = validate(tmp_path, inventory(llorch_control_url="ctl:9200"))
    assert rc != 0
    assert "llorch_control_url is 'ctl:9200'" in message


def test_a_fail_over_list_passes_and_each_entry_is_checked(tmp_path):
    good = ["https://ctl-a:9200", "https://ctl-b:9200"]
    rc, message = validate(tmp_path, inventory(llorch_control_urls=good))
    assert rc == 0, message

    rc, message = validate(tmp_path, inventory(llorch_control_urls=["https://ctl-a:9200", "ctl-b:9200"]))
    assert rc != 0
    assert "llorch_control_urls[1] is 'ctl-b:9200'" in message


def test_a_fail_over_list_that_is_no_list_or_repeats_a_url_is_refused(tmp_path):
    for wrong in ("https://ctl-a:9200", ["https://ctl-a:9200", "https://ctl-a:9200"], []):
        rc, message = validate(tmp_path, inventory(llorch_control_urls=wrong))
        assert rc != 0, wrong
        assert "llorch_control_urls must be a list of 1 to 16 different orchestratord URLs" in message


def test_gpu_in_two_pools_is_refused_naming_the_host(tmp_path):
    pools = [{"pool_id": "a", "gpus": [0, 1]}, {"pool_id": "b", "gpus": [1]}]
    rc, message = validate(tmp_path, inventory(gpu_pools={"gpu-7": pools}))
    assert rc != 0
    assert "pool_managerd_pools of gpu-7" in message


def test_bad_pool_id_is_refused(tmp_path):
    rc, message = validate(tmp_path, inventory(gpu_pools={"gpu-1": [{"pool_id": "has space", "gpus": [0]}]}))
    assert rc != 0
    assert "pool_managerd_pools of gpu-1" in message


def test_bad_rolling_batch_is_refused(tmp_path):
    rc, message = validate(tmp_path, inventory(llorch_node_serial="lots"))
    assert rc != 0
    assert "llorch_node_serial is 'lots'" in message


def test_a_node_id_the_registry_refuses_is_refused_naming_the_host(tmp_path):
    inv = inventory()
    inv["all"]["children"]["gpu_nodes"]["hosts"]["gpu-1"]["pool_managerd_node_id"] = ".."
    rc, message = validate(tmp_path, inv)
    assert rc != 0
    assert 'The node id of gpu-1 is ".."' in message


def test_model_ids_are_checked_with_the_contract_rule_hub_ids_included(tmp_path):
    good = inventory()
    good["all"]["children"]["gpu_nodes"]["hosts"]["gpu-1"]["model_staging_models"] = [
        {"id": "meta-llama/Llama-3.1-8B-Instruct", "source": "/srv/m.gguf", "sha256": "0" * 64}
    ]
    rc, message = validate(tmp_path, good)
    assert rc == 0, message

    bad = inventory()
    bad["all"]["children"]["gpu_nodes"]["hosts"]["gpu-1"]["model_staging_models"] = [
        {"id": "ok-model", "source": "/srv/m.gguf", "sha256": "0" * 64},
        {"id": "has space", "source": "/srv/n.gguf", "sha256": "0" * 64},
    ]
    (tmp_path / "bad").mkdir()
    rc, message = validate(tmp_path / "bad", bad)
    assert rc != 0
    assert 'model_staging_models of gpu-1 has the model ids ["has space"]' in message


def engine_inventory(pools, models=("llorch-lab/tiny",), node="gpu-3", **host_vars):
    inv = inventory(gpu_pools={node: pools})
    node_vars = inv["all"]["children"]["gpu_nodes"]["hosts"][node]
    node_vars["model_staging_models"] = [
        {"id": model, "source": "/srv/m.gguf", "sha256": "0" * 64} for model in models
    ]
    node_vars.update(host_vars)
    return inv


def engine(**overrides):
    return {"kind": "llama.cpp", "model": "llorch-lab/tiny", "port": 8101, "parallel": 2, **overrides}


def test_pools_with_engines_on_staged_models_pass(tmp_path):
    pools = [
        {"pool_id": "a", "gpus": [0], "engine": engine()},
        {
            "pool_id": "b",
            "gpus": [1],
            "engine": engine(port=8102, context_size=4096, extra_args=["--threads", "2"]),
        },
        {"pool_id": "c", "gpus": [2]},
    ]
    rc, message = validate(tmp_path, engine_inventory(pools))
    assert rc == 0, message


def test_an_engine_model_the_node_does_not_stage_is_refused_naming_host_and_pool(tmp_path):
    pools = [{"pool_id": "a", "gpus": [0], "engine": engine(model="meta-llama/Other")}]
    rc, message = validate(tmp_path, engine_inventory(pools))
    assert rc != 0
    assert 'gpu-3, pool a: engine model "meta-llama/Other" is not in model_staging_models of gpu-3' in message


def test_a_gpu_in_two_pools_is_refused_naming_the_second_pool(tmp_path):
    pools = [
        {"pool_id": "a", "gpus": [0, 1], "engine": engine()},
        {"pool_id": "b", "gpus": [1], "engine": engine(port=8102)},
    ]
    rc, message = validate(tmp_path, engine_inventory(pools))
    assert rc != 0
    assert "pool b: GPU 1 is already in pool a" in message


def test_two_engines_on_one_port_are_refused(tmp_path):
    pools = [
        {"pool_id": "a", "gpus": [0], "engine": engine()},
        {"pool_id": "b", "gpus": [1], "engine": engine()},
    ]
    rc, message = validate(tmp_path, engine_inventory(pools))
    assert rc != 0
    assert "gpu-3, pool b: engine port 8101 is already used by pool a" in message


def test_an_engine_on_the_agents_port_is_refused(tmp_path):
    pools = [{"pool_id": "a", "gpus": [0], "engine": engine(port=8000)}]
    rc, message = validate(tmp_path, engine_inventory(pools))
    assert rc != 0
    assert "gpu-3, pool a: engine port 8000 is the agent's port" in message


def test_an_unknown_engine_kind_is_refused(tmp_path):
    pools = [{"pool_id": "a", "gpus": [0], "engine": engine(kind="vllm")}]
    rc, message = validate(tmp_path, engine_inventory(pools))
    assert rc != 0
    assert 'gpu-3, pool a: unknown engine kind "vllm" (known: llama.cpp)' in message


def test_an_api_key_in_extra_args_is_refused_without_echoing_it(tmp_path):
    pools = [{"pool_id": "a", "gpus": [0], "engine": engine(extra_args=["--api-key", "sekrit-value-123"])}]
    rc, message = validate(tmp_path, engine_inventory(pools))
    assert rc != 0
    assert "must not carry --api-key" in message
    assert "sekrit-value-123" not in message


def test_slots_total_that_differs_from_the_engines_parallel_is_refused(tmp_path):
    pools = [{"pool_id": "a", "gpus": [0], "slots_total": 8, "engine": engine(parallel=2)}]
    rc, message = validate(tmp_path, engine_inventory(pools))
    assert rc != 0
    assert "gpu-3, pool a: slots_total 8 differs from engine parallel 2" in message


def test_controller_credential_files_inside_the_inventory_folder_are_refused_by_name(tmp_path):
    outside = tmp_path.parent / f"{tmp_path.name}-credentials"
    rc, message = validate(
        tmp_path, inventory(llorch_credentials_dir=str(outside), llorch_reader_token_file=str(outside / "r"))
    )
    assert rc == 0, message

    rc, message = validate(tmp_path, inventory(llorch_operator_token_file=str(tmp_path / "operator.token")))
    assert rc != 0
    assert message.startswith(
        f"llorch_operator_token_file ({tmp_path / 'operator.token'}) must be a path on the controller "
        f"outside the inventory folder {tmp_path}"
    )

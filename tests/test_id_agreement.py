"""One table of ids, run through every consumer: they must all agree with the contract.

The contract (plugins/module_utils/llorch_contract.py) says which node, pool and model ids are valid. Each
row of ID_TABLE goes, for real, through:
- orchestratord: a registration with that node id or pool id, a heartbeat listing that model id;
- inventory validation: ansible-playbook running the validate_inventory role over an inventory with that
  node id, pool id or model id;
- pool-managerd: its config with that node id or pool id (refused with exit 2, or accepted), and its
  model manifest with that model id (dropped from the models it reports, or reported);
- model_stage: staging a model with that id (refused, or staged).
Every consumer's verdict must equal the contract's. A failure names the consumer and the row.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import REPO_ROOT, Daemon, make_daemon, sample_heartbeat, sample_registration
from support_agent import make_agent, standin_env
from support_registry import ansible_env, run_tasks
from support_roles import local_host, run_playbook

# The contract is stdlib only: the test reads the very file the modules receive as module_utils.
sys.path.insert(0, str(REPO_ROOT / "plugins" / "module_utils"))
from llorch_contract import valid_id, valid_model_id, valid_node_id

# (value, why it is in the table). Each value is tried as a node id, a pool id and a model id.
ID_TABLE: list[tuple[str, str]] = [
    ("gpu-1", "an ordinary node id"),
    ("pool_0.a", "dots and underscores"),
    ("meta-llama/Llama-3.1-8B-Instruct", "the README's model id: a hub id with a publisher"),
    ("Qwen2.5:7b-q4", "a tag after a colon"),
    (".", "a single dot: no client that normalises paths can address it"),
    ("..", "two dots: the same"),
    ("...", "three dots are an ordinary name"),
    ("gpu-1\n", "a trailing newline (Python's $ would accept it)"),
    ("a" * 128, "the longest node or pool id"),
    ("a" * 129, "one longer than a node or pool id may be"),
    ("m" * 256, "the longest model id"),
    ("m" * 257, "one longer than a model id may be"),
    ("gpu-\u00fc", "a letter outside ASCII"),
    ("\u30e2\u30c7\u30eb", "no ASCII at all"),
    ("a/b", "a slash: a model id may hold one, a node id may not"),
    ("has space", "a space"),
    ("", "empty"),
    ("-leading-dash", "a leading dash is allowed"),
    ("tab\there", "a control character"),
    ("localhost", "Ansible's name for the controller: a pool or model id, never a node id"),
    ("127.0.0.1", "the same, as an address"),
    ("LocalHost", "host names know no case"),
]
ROW_IDS = [f"row{number}" for number in range(len(ID_TABLE))]
VALUES = [value for value, _ in ID_TABLE]

# What the contract says; every consumer is compared with these.
NODE_OK = {value: valid_node_id(value) for value in VALUES}
POOL_OK = {value: valid_id(value) for value in VALUES}
MODEL_OK = {value: valid_model_id(value) for value in VALUES}


def test_the_table_covers_both_verdicts_for_each_kind():
    assert set(NODE_OK.values()) == {True, False} and set(MODEL_OK.values()) == {True, False}
    assert MODEL_OK["meta-llama/Llama-3.1-8B-Instruct"] and not NODE_OK["a/b"] and MODEL_OK["a/b"]
    assert not NODE_OK["."] and not NODE_OK[".."] and not NODE_OK["gpu-1\n"] and not NODE_OK["a" * 129]
    assert NODE_OK["a" * 128] and MODEL_OK["m" * 256] and not MODEL_OK["m" * 257]
    assert POOL_OK["localhost"] and not NODE_OK["localhost"] and not NODE_OK["LocalHost"]


# --- orchestratord --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Daemon:
    daemon = make_daemon(tmp_path_factory.mktemp("registry"), node_timeout_ms=600_000).start()
    yield daemon
    daemon.stop()


def daemon_accepts_registration(daemon: Daemon, node_id: str, pool_id: str) -> bool:
    registration = sample_registration("probe-node")
    registration["node_id"] = node_id
    registration["pools"][0]["pool_id"] = pool_id
    answer = daemon.api("POST", "/v2/nodes/register", registration)
    assert answer.status in (200, 400), (answer.status, answer.text)
    return answer.status == 200


@pytest.mark.parametrize("value", VALUES, ids=ROW_IDS)
def test_orchestratord_agrees_on_node_ids(registry, value):
    assert daemon_accepts_registration(registry, value, "pool-0") is NODE_OK[value]


@pytest.mark.parametrize("value", VALUES, ids=ROW_IDS)
def test_orchestratord_agrees_on_pool_ids(registry, value):
    assert daemon_accepts_registration(registry, "pool-probe", value) is POOL_OK[value]


@pytest.mark.parametrize("value", VALUES, ids=ROW_IDS)
def test_orchestratord_agrees_on_model_ids(registry, value):
    registration = sample_registration("model-probe")
    assert registry.api("POST", "/v2/nodes/register", registration).status == 200
    answer = registry.api("POST", "/v2/nodes/model-probe/heartbeat", sample_heartbeat(registration, [value]))
    assert answer.status in (200, 400), (answer.status, answer.text)
    assert (answer.status == 200) is MODEL_OK[value]


# --- inventory validation -------------------------------------------------------------------------------

VALIDATE = [{"name": "Validate", "hosts": "all", "gather_facts": False, "roles": ["validate_inventory"]}]
GOOD_POOLS = [{"pool_id": "pool-0", "gpus": [0], "slots_total": 1}]


def validation_verdicts(tmp_path: Path, task_name: str, node_vars) -> dict[str, bool]:
    """Run validate_inventory once over one GPU node per row; value -> whether its loop item passed."""
    hosts = {f"gpu-row{number}": local_host(**node_vars(value)) for number, value in enumerate(VALUES)}
    inventory = {
        "all": {
            "vars": {"llorch_api_token": "t" * 40, "llorch_control_url": "https://ctl:9200"},
            "children": {"control": {"hosts": {"ctl": local_host()}}, "gpu_nodes": {"hosts": hosts}},
        }
    }
    _, output = run_playbook(tmp_path, VALIDATE, inventory)
    # Role tasks are named "validate_inventory : <name>" in the output.
    tasks = {
        task["task"]["name"].split(" : ")[-1]: task
        for play in output["plays"]
        for task in play.get("tasks", [])
    }
    assert task_name in tasks, f"the play stopped before {task_name!r}: {list(tasks)}"
    (result,) = tasks[task_name]["hosts"].values()
    passed = {item["node"]: not item.get("failed") for item in result["results"]}
    return {value: passed[f"gpu-row{number}"] for number, value in enumerate(VALUES)}


@pytest.fixture(scope="module")
def inventory_verdicts(tmp_path_factory) -> dict[str, dict[str, bool]]:
    base = tmp_path_factory.mktemp("inventory")
    verdicts = {}
    # One run per kind: the role stops at the first failed check, so each run varies one kind only.
    for kind, task_name, node_vars in (
        (
            "pool",
            "Check that each GPU node's pools are well-formed",
            lambda value: {"pool_managerd_pools": [{"pool_id": value, "gpus": [0], "slots_total": 1}]},
        ),
        (
            "node",
            "Check that each GPU node's id is one the registry accepts",
            lambda value: {"pool_managerd_pools": GOOD_POOLS, "pool_managerd_node_id": value},
        ),
        (
            "model",
            "Check that each model id staged on a GPU node is one the registry accepts",
            lambda value: {
                "pool_managerd_pools": GOOD_POOLS,
                "model_staging_models": [{"id": value, "source": "/srv/m", "sha256": "0" * 64}],
            },
        ),
    ):
        (base / kind).mkdir()
        verdicts[kind] = validation_verdicts(base / kind, task_name, node_vars)
    return verdicts


@pytest.mark.parametrize("value", VALUES, ids=ROW_IDS)
def test_validate_inventory_agrees_on_node_ids(inventory_verdicts, value):
    assert inventory_verdicts["node"][value] is NODE_OK[value]


@pytest.mark.parametrize("value", VALUES, ids=ROW_IDS)
def test_validate_inventory_agrees_on_pool_ids(inventory_verdicts, value):
    assert inventory_verdicts["pool"][value] is POOL_OK[value]


@pytest.mark.parametrize("value", VALUES, ids=ROW_IDS)
def test_validate_inventory_agrees_on_model_ids(inventory_verdicts, value):
    assert inventory_verdicts["model"][value] is MODEL_OK[value]


# --- pool-managerd --------------------------------------------------------------------------------------

EXIT_CONFIG = 2


def agent_runs(base: Path, configs: list[dict[str, Any]], models: dict | None = None) -> list:
    """Start `pool-managerd --once` for every config at once (two CPUs: they mostly wait on imports)."""
    running = []
    for number, overrides in enumerate(configs):
        agent = make_agent(base / f"agent-{number}", None, **overrides)
        if models is not None:
            agent.write_manifest(models)
        agent.write_config()
        running.append(
            subprocess.Popen(
                agent.command("--once"),
                env=standin_env(agent.fixture),
                cwd=agent.workdir,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    done = []
    for process in running:
        stdout, stderr = process.communicate(timeout=120)
        done.append((process.returncode, stdout, stderr))
    return done


def config_verdicts(runs: list) -> dict[str, bool]:
    """value -> whether the agent accepted a config with it (exit 0) rather than refusing it (exit 2)."""
    verdicts = {}
    for value, (returncode, _, stderr) in zip(VALUES, runs, strict=True):
        assert returncode in (0, EXIT_CONFIG), (value, returncode, stderr)
        verdicts[value] = returncode == 0
    return verdicts


@pytest.fixture(scope="module")
def agent_verdicts(tmp_path_factory) -> dict[str, dict[str, bool]]:
    base = tmp_path_factory.mktemp("agent")
    node_runs = agent_runs(base / "node", [{"node_id": value} for value in VALUES])
    pool_runs = agent_runs(
        base / "pool", [{"pools": [{"pool_id": value, "gpus": [0], "slots_total": 1}]} for value in VALUES]
    )
    # One manifest with every row: a bad entry costs only itself, so the report shows which were dropped.
    manifest_agent = make_agent(base / "manifest", None)
    manifest = {}
    for number, value in enumerate(VALUES):
        name = f"model-{number}.gguf"
        (manifest_agent.models_dir / name).write_bytes(b"x")
        manifest[value] = {"path": name, "size_bytes": 1, "sha256": hashlib.sha256(b"x").hexdigest()}
    manifest_agent.write_manifest(manifest)
    once = manifest_agent.run_once("--once")
    assert once.returncode == 0, once.stderr
    reported = set(json.loads(once.stdout)["models_available"])
    return {
        "node": config_verdicts(node_runs),
        "pool": config_verdicts(pool_runs),
        "model": {value: value in reported for value in VALUES},
    }


@pytest.mark.parametrize("value", VALUES, ids=ROW_IDS)
def test_pool_managerd_config_agrees_on_node_ids(agent_verdicts, value):
    assert agent_verdicts["node"][value] is NODE_OK[value]


@pytest.mark.parametrize("value", VALUES, ids=ROW_IDS)
def test_pool_managerd_config_agrees_on_pool_ids(agent_verdicts, value):
    assert agent_verdicts["pool"][value] is POOL_OK[value]


@pytest.mark.parametrize("value", VALUES, ids=ROW_IDS)
def test_pool_managerd_manifest_agrees_on_model_ids(agent_verdicts, value):
    assert agent_verdicts["model"][value] is MODEL_OK[value]


# --- model_stage ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def staging_verdicts(tmp_path_factory) -> dict[str, bool]:
    base = tmp_path_factory.mktemp("staging")
    source = base / "source.gguf"
    source.write_bytes(b"tiny model\n")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    models_dir = base / "models"
    models_dir.mkdir()
    rows = [{"number": number, "id": value} for number, value in enumerate(VALUES)]
    task = {
        "llorch.kit.model_stage": {
            "id": "{{ item.id }}",
            "source": str(source),
            "sha256": digest,
            "models_dir": str(models_dir),
            "dest": "model-{{ item.number }}.gguf",  # one file per row: a file holds one model
        },
        "loop": rows,
        "loop_control": {"label": "{{ item.number }}"},
        "ignore_errors": True,
    }
    (result,) = run_tasks(ansible_env(None, base), base, [task])
    items = {item["item"]["number"]: item for item in result["results"]}
    verdicts = {}
    for number, value in enumerate(VALUES):
        verdicts[value] = not items[number].get("failed")
    return verdicts


@pytest.mark.parametrize("value", VALUES, ids=ROW_IDS)
def test_model_stage_agrees_on_model_ids(staging_verdicts, value):
    assert staging_verdicts[value] is MODEL_OK[value]


def test_the_table_is_plain_yaml_for_the_inventory():
    """The inventory tests write these values through YAML: each must come back unchanged."""
    assert yaml.safe_load(yaml.safe_dump(VALUES)) == VALUES

"""playbooks/status.yml through `ansible-playbook`, against a real orchestratord."""

from __future__ import annotations

import re

import yaml
from support import engine_status
from support_registry import add_node, ansible_env, run


def table_rows(output: str) -> list[list[str]]:
    """The debug message's lines, split on runs of two or more spaces (the table's column gaps)."""
    message = output.split("msg: |-", 1)[1].split("PLAY RECAP", 1)[0]
    return [re.split(r"\s{2,}", line.strip()) for line in message.splitlines() if line.strip()]


def test_status_prints_nodes_and_catalog_from_inventory_vars_or_environment(daemon_factory, tmp_path):
    daemon = daemon_factory(node_timeout_ms=120_000)
    engines = [engine_status("m-shared", "http://10.89.0.11:8101"), engine_status("m-alone", state="dead")]
    add_node(daemon, "gpu-a", ["m-shared", "m-alone"], engines=engines, slots_free=3)
    add_node(daemon, "gpu-b", ["m-shared"])
    add_node(daemon, "gpu-c", heartbeat=False)
    assert daemon.api("POST", "/v2/nodes/gpu-b/drain", {"drain": True}).status == 200
    # The way the lab passes them: variables of the inventory (here an extra-vars file, mode 0600).
    vars_file = tmp_path / "registry-vars.yml"
    vars_file.write_text(
        yaml.safe_dump({"llorch_controller_url": daemon.url, "llorch_api_token": daemon.token})
    )
    vars_file.chmod(0o600)

    from_vars = run(
        ["ansible-playbook", "playbooks/status.yml", "-e", f"@{vars_file}"], ansible_env(None, tmp_path)
    )
    from_env = run(["ansible-playbook", "-vvvv", "playbooks/status.yml"], ansible_env(daemon, tmp_path))

    assert from_vars.returncode == 0, from_vars.stdout + from_vars.stderr
    assert from_env.returncode == 0, from_env.stdout + from_env.stderr
    rows = table_rows(from_vars.stdout)
    assert rows[0] == [
        "NODE", "STATUS", "POOLS", "FREE SLOTS", "FREE VRAM", "MODELS", "HEARTBEAT", "ENGINES"
    ]  # fmt: skip
    nodes = {row[0]: row for row in rows[1:4]}
    assert nodes["gpu-a"][:6] == ["gpu-a", "online", "2/2", "6", "140.00 GB", "m-alone,m-shared"]
    assert re.fullmatch(r"\d+ s ago", nodes["gpu-a"][6])
    assert nodes["gpu-a"][7] == "pool-0: ready m-shared, pool-1: dead m-alone"
    assert nodes["gpu-b"][:3] == ["gpu-b", "draining", "2/2"]
    assert nodes["gpu-b"][7] == "pool-0: none, pool-1: none"
    assert nodes["gpu-c"] == ["gpu-c", "registering", "0/2", "0", "-", "-", "-", "-"]
    assert rows[4] == ["MODEL", "REPLICAS", "SERVING", "NODES"]
    # gpu-b is draining, so only gpu-a counts as holding a model; its engine for m-alone is dead.
    assert sorted(rows[5:]) == [["m-alone", "1", "0/1", "gpu-a"], ["m-shared", "1", "1/1", "gpu-a"]]
    # Same table from the environment's URL and token (the heartbeat ages may differ by now).
    assert [row[:6] for row in table_rows(from_env.stdout)] == [row[:6] for row in rows]
    for done in (from_vars, from_env):
        assert daemon.token not in done.stdout + done.stderr


def test_status_says_why_the_registry_did_not_answer(daemon, tmp_path):
    wrong_token = "wrong-token-" + "q" * 40

    done = run(
        ["ansible-playbook", "-vvvv", "playbooks/status.yml"],
        ansible_env(daemon, tmp_path, LLORCH_API_TOKEN=wrong_token),
    )

    assert done.returncode != 0
    assert f"token rejected by {daemon.url} (401)" in done.stdout
    assert wrong_token not in done.stdout + done.stderr


def test_status_reads_the_registry_with_the_controllers_reader_file_alone(daemon, tmp_path):
    """Least privilege: with the reader file role orchestratord issues, status.yml needs no admin token."""
    add_node(daemon, "gpu-a", ["m-shared"])
    issued = daemon.api("POST", "/v2/credentials", {"name": "ansible-reader-status", "scope": "reader"})
    assert issued.status == 201, issued.text
    credentials = tmp_path / "credentials"
    credentials.mkdir(mode=0o700)
    reader = credentials / "reader.token"
    reader.write_text(issued.body["secret"] + "\n")
    reader.chmod(0o600)
    vars_file = tmp_path / "registry-vars.yml"
    vars_file.write_text(
        yaml.safe_dump({"llorch_controller_url": daemon.url, "llorch_credentials_dir": str(credentials)})
    )

    done = run(
        ["ansible-playbook", "playbooks/status.yml", "-e", f"@{vars_file}"], ansible_env(None, tmp_path)
    )

    assert done.returncode == 0, done.stdout + done.stderr
    assert table_rows(done.stdout)[1][:2] == ["gpu-a", "online"]
    assert issued.body["secret"] not in done.stdout + done.stderr
    # The same file, readable by the group: refused before any call, with the reason.
    reader.chmod(0o640)
    refused = run(
        ["ansible-playbook", "playbooks/status.yml", "-e", f"@{vars_file}"], ansible_env(None, tmp_path)
    )
    assert refused.returncode != 0
    assert f"cannot read token_file {reader}: readable by group or others (mode 0640)" in refused.stdout

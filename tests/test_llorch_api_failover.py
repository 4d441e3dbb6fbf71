"""The registry client with several orchestratord URLs, through the real `ansible-playbook` and
`ansible-inventory`, against real daemons and addresses where nothing answers.

The first URL that gives an HTTP answer wins; a refused connection or a timeout moves on to the next; an
HTTP answer, an error included, is never retried elsewhere; with none answering the error names every URL
and why, and never the token.
"""

from __future__ import annotations

import socket

import pytest
from support import free_port
from support_registry import (
    add_node,
    ansible_env,
    group_hosts,
    inventory_file,
    inventory_list,
    node_record,
    run,
    run_tasks,
)


@pytest.fixture
def live(daemon_factory):
    """A daemon whose nodes stay online for the whole test, however slow the machine."""
    daemon = daemon_factory("live", node_timeout_ms=120_000)
    add_node(daemon, "gpu-a", ["m1"])
    return daemon


@pytest.fixture
def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # a port nothing listens on: refused


def test_modules_move_past_a_dead_url_and_act_on_the_first_that_answers(live, dead_url, tmp_path):
    env = ansible_env(live, tmp_path)
    urls = [dead_url, live.url]
    listed, drained = run_tasks(
        env,
        tmp_path,
        [
            {"llorch.kit.llorch_nodes_info": {"url": urls}},
            {"llorch.kit.llorch_node": {"url": urls, "node_id": "gpu-a", "state": "drained"}},
        ],
    )
    assert not listed.get("failed"), listed
    assert [node["node_id"] for node in listed["nodes"]] == ["gpu-a"]
    assert drained.get("changed") is True and not drained.get("failed"), drained
    assert node_record(live, "gpu-a")["drain"] is True


def test_a_comma_separated_llorch_url_is_a_list_of_urls(live, dead_url, tmp_path):
    env = ansible_env(live, tmp_path, LLORCH_URL=f"{dead_url},{live.url}")
    (listed,) = run_tasks(env, tmp_path, [{"llorch.kit.llorch_nodes_info": {}}])
    assert not listed.get("failed"), listed
    assert listed["count"] == 1


def test_a_hung_url_is_left_after_the_timeout(live, tmp_path):
    # A socket that takes connections (the kernel's backlog) but never answers: a hung replica.
    with socket.create_server(("127.0.0.1", 0), backlog=8) as silent:
        silent_url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        (listed,) = run_tasks(
            ansible_env(live, tmp_path),
            tmp_path,
            [{"llorch.kit.llorch_nodes_info": {"url": [silent_url, live.url], "timeout": 1}}],
        )
    assert not listed.get("failed"), listed
    assert listed["count"] == 1


def test_an_http_error_is_an_answer_and_is_not_retried_elsewhere(live, daemon_factory, tmp_path):
    """The first replica answers (it does not know gpu-a: another database): that answer stands, even
    though the second URL would have found the node."""
    other = daemon_factory("other", node_timeout_ms=120_000)
    (result,) = run_tasks(
        ansible_env(live, tmp_path),
        tmp_path,
        [
            {
                "llorch.kit.llorch_node": {
                    "url": [other.url, live.url],
                    "node_id": "gpu-a",
                    "state": "drained",
                },
                "ignore_errors": True,
            }
        ],
    )
    assert result.get("failed") is True
    assert result["msg"].startswith(f"node gpu-a is not registered with {other.url}"), result["msg"]
    assert node_record(live, "gpu-a")["drain"] is False


def test_when_no_url_answers_the_error_names_each_and_never_the_token(live, dead_url, tmp_path):
    other_dead = f"http://127.0.0.1:{free_port()}"
    env = ansible_env(live, tmp_path)
    (result,) = run_tasks(
        env,
        tmp_path,
        [{"llorch.kit.llorch_nodes_info": {"url": [dead_url, other_dead]}, "ignore_errors": True}],
    )
    assert result["msg"] == (
        f"cannot reach the registry at any of its 2 URLs: {dead_url} (connection refused), "
        f"{other_dead} (connection refused)"
    )
    assert live.token not in str(result)


def test_inventory_takes_a_list_of_urls_and_skips_a_dead_one(live, dead_url, tmp_path):
    env = ansible_env(live, tmp_path)
    listed = inventory_list(env, inventory_file(tmp_path, url=[dead_url, live.url]))
    assert group_hosts(listed, "llorch_nodes") == ["gpu-a"]

    from_env = inventory_list(
        ansible_env(live, tmp_path, LLORCH_URL=f"{dead_url}, {live.url}"), inventory_file(tmp_path, "env")
    )
    assert group_hosts(from_env, "llorch_nodes") == ["gpu-a"]

    other_dead = f"http://127.0.0.1:{free_port()}"
    source = inventory_file(tmp_path, "dead", url=[dead_url, other_dead])
    failed = run(["ansible-inventory", "-i", str(source), "--list"], env)
    assert (
        f"cannot reach the registry at any of its 2 URLs: {dead_url} (connection refused), "
        f"{other_dead} (connection refused)"
    ) in failed.stderr.replace("\n", " "), failed.stderr
    assert live.token not in failed.stdout + failed.stderr
    assert "Traceback" not in failed.stdout + failed.stderr

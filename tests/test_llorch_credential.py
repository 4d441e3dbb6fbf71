"""llorch.kit.llorch_credential through `ansible-playbook`, against a real orchestratord (plain http)."""

from __future__ import annotations

from support_registry import ansible_env, run, run_tasks


def credential_task(name: str, check: bool = False, **params) -> dict:
    task = {"llorch.kit.llorch_credential": {"name": name, **params}}
    if check:
        task["check_mode"] = True
    return task


def names(daemon) -> set[str]:
    answer = daemon.api("GET", "/v2/credentials")
    assert answer.status == 200, answer.text
    return {item["name"] for item in answer.body["credentials"]}


def test_a_join_credential_is_issued_once_its_secret_joins_the_node_and_a_second_run_changes_nothing(
    daemon, tmp_path
):
    env = ansible_env(daemon, tmp_path)
    join = {"scope": "join", "node_id": "gpu-7", "ttl_s": 600, "uses": 1}
    check, issued, again = run_tasks(
        env,
        tmp_path,
        [
            credential_task("join-gpu-7", check=True, **join),
            credential_task("join-gpu-7", **join),
            credential_task("join-gpu-7", **join),
        ],
    )
    assert check["changed"] and "secret" not in check
    assert check["credential"] == {"name": "join-gpu-7", "scope": "join", **{k: join[k] for k in join}}
    assert issued["changed"] and issued["state_before"] == "absent"
    assert issued["secret"].startswith("llj_")
    assert issued["credential"]["node_id"] == "gpu-7" and issued["credential"]["uses_left"] == 1
    # Found by name: nothing issued, and the secret is not (cannot be) shown again.
    assert not again["changed"] and again["state_before"] == "present" and "secret" not in again
    assert names(daemon) == {"join-gpu-7"}

    joined = daemon.api("POST", "/v2/join", {"node_id": "gpu-7"}, token=issued["secret"])
    assert joined.status == 200, joined.text
    assert joined.body["credential_name"] == "node/gpu-7"


def test_revoking_is_idempotent_check_mode_keeps_it_and_the_secret_stops_at_once(daemon, tmp_path):
    env = ansible_env(daemon, tmp_path)
    issued, check, revoked, again = run_tasks(
        env,
        tmp_path,
        [
            credential_task("dashboards", scope="reader"),
            credential_task("dashboards", check=True, state="absent"),
            credential_task("dashboards", state="absent"),
            credential_task("dashboards", state="absent"),
        ],
    )
    assert issued["changed"] and issued["secret"].startswith("llr_")
    assert issued["credential"]["expires_at"] is None
    assert check["changed"] and check["state_before"] == "present"
    assert revoked["changed"] and not again["changed"] and again["state_before"] == "absent"
    assert names(daemon) == set()
    assert daemon.api("GET", "/v2/nodes", token=issued["secret"]).status == 401


def test_a_name_held_by_another_scope_is_an_error_that_changes_nothing(daemon, tmp_path):
    env = ansible_env(daemon, tmp_path)
    first, clash = run_tasks(
        env,
        tmp_path,
        [
            credential_task("ops", scope="reader"),
            {**credential_task("ops", scope="operator"), "ignore_errors": True},
        ],
    )
    assert first["changed"]
    assert clash["failed"]
    assert clash["msg"] == (
        "credential ops exists with scope 'reader', not 'operator'; credentials are never changed in "
        "place: revoke it (state: absent) first"
    )
    listed = daemon.api("GET", "/v2/credentials").body["credentials"]
    assert [(item["name"], item["scope"]) for item in listed] == [("ops", "reader")]


def test_a_refusal_by_the_daemon_names_the_url_and_no_secret_reaches_a_no_log_task_output(daemon, tmp_path):
    env = ansible_env(daemon, tmp_path)
    (refused,) = run_tasks(
        env,
        tmp_path,
        [{**credential_task("bad name!", scope="reader"), "ignore_errors": True}],
    )
    assert refused["failed"]
    assert refused["msg"].startswith(f"the registry at {daemon.url} answered POST /v2/credentials with 400")

    playbook = tmp_path / "no-log.yml"
    playbook.write_text(
        "- hosts: localhost\n  gather_facts: false\n  tasks:\n"
        "    - llorch.kit.llorch_credential: {name: quiet, scope: join, node_id: gpu-9}\n"
        "      no_log: true\n"
        "      register: issued\n"
        "    - ansible.builtin.assert: {that: issued.secret is match('llj_'), quiet: true}\n"
        "      no_log: true\n"
    )
    done = run(["ansible-playbook", "-v", str(playbook)], env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "llj_" not in done.stdout + done.stderr
    assert names(daemon) == {"quiet"}

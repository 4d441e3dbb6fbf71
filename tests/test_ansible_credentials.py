"""roles/orchestratord tasks_from ansible_credentials: the controller's reader and operator credentials,
issued into 0600 files by a real `ansible-playbook` run against a real orchestratord (plain http)."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

from support_registry import add_node
from support_roles import failures, local_host, run_playbook

CREDENTIALS_PLAY = {
    "name": "The controller's credentials",
    "hosts": "ctl",
    "gather_facts": False,
    "tasks": [
        {
            "name": "Keep, issue or rotate them",
            "ansible.builtin.include_role": {"name": "orchestratord", "tasks_from": "ansible_credentials"},
        }
    ],
}


def issue(daemon, tmp_path: Path, **extra_vars: Any) -> dict[str, Any]:
    """Run the tasks file standalone (as playbooks/rotate_credentials.yml will); the JSON output."""
    inventory = {
        "all": {
            "hosts": {
                "ctl": local_host(
                    llorch_controller_url=daemon.url,
                    llorch_api_token=daemon.token,
                    llorch_credentials_dir=str(tmp_path / "credentials"),
                    **extra_vars,
                )
            }
        }
    }
    rc, output = run_playbook(tmp_path, [CREDENTIALS_PLAY], inventory)
    assert rc == 0, failures(output)
    assert daemon.token not in str(output)
    return output


def changed(output: dict[str, Any]) -> int:
    return sum(stats["changed"] for stats in output["stats"].values())


def secret(path: Path) -> str:
    return path.read_text().strip()


def listed(daemon) -> dict[str, str]:
    """name -> scope of every credential the daemon lists."""
    answer = daemon.api("GET", "/v2/credentials")
    assert answer.status == 200, answer.text
    return {item["name"]: item["scope"] for item in answer.body["credentials"]}


def test_reader_and_operator_files_are_private_scoped_kept_and_reissued_when_lost_or_revoked(
    daemon, tmp_path
):
    add_node(daemon, "gpu-a", ["m1"])
    folder = tmp_path / "credentials"
    reader, operator = folder / "reader.token", folder / "operator.token"

    first = issue(daemon, tmp_path)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(reader.stat().st_mode) == stat.S_IMODE(operator.stat().st_mode) == 0o600
    names = listed(daemon)
    assert sorted(names.values()) == ["operator", "reader"]
    assert (folder / "reader.token.name").read_text().strip() in names
    assert secret(reader) not in str(first) and secret(operator) not in str(first)
    # The reader reads and cannot drain; the operator drains.
    assert daemon.api("GET", "/v2/nodes", token=secret(reader)).status == 200
    refused = daemon.api("POST", "/v2/nodes/gpu-a/drain", {"drain": True}, token=secret(reader))
    assert refused.status == 403, refused.text
    drained = daemon.api("POST", "/v2/nodes/gpu-a/drain", {"drain": True}, token=secret(operator))
    assert drained.status == 200, drained.text
    assert daemon.api("GET", "/v2/credentials", token=secret(operator)).status == 403

    # A second run finds both files still good: nothing issued, nothing written.
    assert changed(issue(daemon, tmp_path)) == 0
    assert listed(daemon) == names

    # A lost reader file: a new reader, and the one it replaces (named beside the file) is revoked.
    kept_operator = secret(operator)
    reader.unlink()
    issue(daemon, tmp_path)
    assert secret(operator) == kept_operator
    after_loss = listed(daemon)
    assert sorted(after_loss.values()) == ["operator", "reader"] and after_loss != names
    assert daemon.api("GET", "/v2/nodes", token=secret(reader)).status == 200

    # A revoked operator credential: the file no longer opens the registry, so a new one is issued.
    operator_name = (folder / "operator.token.name").read_text().strip()
    assert daemon.api("DELETE", f"/v2/credentials/{operator_name}").status == 204
    issue(daemon, tmp_path)
    assert secret(operator) != kept_operator
    assert daemon.api("GET", "/v2/nodes", token=secret(operator)).status == 200
    assert sorted(listed(daemon).values()) == ["operator", "reader"]


def test_rotation_writes_new_secrets_then_revokes_the_old_ones(daemon, tmp_path):
    folder = tmp_path / "credentials"
    issue(daemon, tmp_path)
    old = {scope: secret(folder / f"{scope}.token") for scope in ("reader", "operator")}
    old_names = set(listed(daemon))

    rotated = issue(daemon, tmp_path, orchestratord_ansible_credentials_rotate=True)
    assert changed(rotated) > 0
    new_names = set(listed(daemon))
    assert len(new_names) == 2 and not new_names & old_names
    for scope, old_secret in old.items():
        new_secret = secret(folder / f"{scope}.token")
        assert new_secret != old_secret and new_secret not in str(rotated)
        assert daemon.api("GET", "/v2/nodes", token=old_secret).status == 401
        assert daemon.api("GET", "/v2/nodes", token=new_secret).status == 200


def test_a_registry_that_does_not_answer_stops_the_run_and_keeps_the_files(daemon, tmp_path):
    folder = tmp_path / "credentials"
    issue(daemon, tmp_path)
    kept = secret(folder / "reader.token")
    daemon.stop()
    inventory = {
        "all": {
            "hosts": {
                "ctl": local_host(
                    llorch_controller_url=daemon.url,
                    llorch_api_token=daemon.token,
                    llorch_credentials_dir=str(folder),
                )
            }
        }
    }
    rc, output = run_playbook(tmp_path, [CREDENTIALS_PLAY], inventory)
    assert rc != 0
    message = failures(output)["ctl"]
    assert message.startswith(f"Could not check the reader credential in {folder / 'reader.token'}:")
    assert "connection refused" in message and daemon.token not in str(output)
    assert secret(folder / "reader.token") == kept

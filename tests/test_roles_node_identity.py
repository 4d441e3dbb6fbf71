"""GPU nodes join with their own identity through role pool_managerd.

The role's own tasks run through real ansible-playbook on localhost against a real orchestratord: identity.yml
issues a join credential bound to the node (one use), configure.yml writes the agent's config and the join
token and no shared token; the real agent started from that config joins, the role's online wait sees it,
joined.yml removes the spent token file and revokes the credential, and a second run changes nothing. The
node's own credential may not drain the node nor read the registry. Only systemd is left out (molecule's
default scenario runs the whole role).
"""

from __future__ import annotations

import contextlib
import grp
import hashlib
import os
import pwd
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from support import REPO_ROOT, TEST_TOKEN, Daemon
from support_agent import STANDIN, standin_env
from support_roles import failures, local_host, render_role, run_playbook
from support_tls import write_ca

sys.path.insert(0, str(REPO_ROOT / "files" / "pool_managerd"))
from pool_managerd.config import load_settings
from pool_managerd.identity import ca_pins

ROLE = REPO_ROOT / "roles" / "pool_managerd"
NODE = "gpu-7"


def role_tasks(*entry_points: str, root: Path | None = None) -> list[dict[str, Any]]:
    """The role's task files, in order, then the end of the play, so that the restart handler they notify
    (systemd, left out here) never runs. "agent" stands for that restart: the real agent started in the
    background from the config the role wrote."""
    return [*(role_task(name, root) for name in entry_points), {"ansible.builtin.meta": "end_play"}]


def role_task(name: str, root: Path | None) -> dict[str, Any]:
    if name != "agent":
        return {"ansible.builtin.include_role": {"name": "pool_managerd", "tasks_from": name}}
    env = standin_env()
    script = 'echo $$ > "$AGENT_PID_FILE"; exec "$AGENT_PYTHON" -m pool_managerd --config "$AGENT_CONFIG"'
    return {
        "name": "Start the agent as its unit would",
        "ansible.builtin.shell": f'{script} > "$AGENT_LOG" 2>&1',
        "environment": {
            "PYTHONPATH": env["PYTHONPATH"],
            "PYTHONUNBUFFERED": "1",
            "NVIDIA_SMI_STANDIN_FIXTURE": env["NVIDIA_SMI_STANDIN_FIXTURE"],
            "AGENT_PYTHON": sys.executable,
            "AGENT_CONFIG": str(root / "etc" / "pool-managerd.yml"),
            "AGENT_PID_FILE": str(root / "agent.pid"),
            "AGENT_LOG": str(root / "agent.log"),
        },
        "async": 600,
        "poll": 0,
        "changed_when": False,
    }


def changed_tasks(output: dict[str, Any]) -> list[str]:
    return [
        task["task"]["name"].removeprefix("pool_managerd : ")
        for play in output["plays"]
        for task in play["tasks"]
        for result in task["hosts"].values()
        if result.get("changed")
    ]


class Node:
    """This machine as a GPU node: the role's paths under tmp_path, its user the test's own."""

    def __init__(self, tmp_path: Path, daemon: Daemon, **extra: Any) -> None:
        self.root = tmp_path / "node"
        self.etc, self.state, self.models = self.root / "etc", self.root / "state", self.root / "models"
        for folder in (self.etc, self.state, self.models):
            folder.mkdir(parents=True, exist_ok=True)
        self.state.chmod(0o750)
        self.tmp_path, self.daemon = tmp_path, daemon
        self.host_vars = {
            "pool_managerd_node_id": NODE,
            "llorch_control_url": daemon.url,
            "llorch_api_token": daemon.token,
            "pool_managerd_config_dir": str(self.etc),
            "pool_managerd_state_dir": str(self.state),
            "pool_managerd_models_dir": str(self.models),
            "pool_managerd_nvidia_smi": str(STANDIN),
            "pool_managerd_user": pwd.getpwuid(os.getuid()).pw_name,
            "pool_managerd_group": grp.getgrgid(os.getgid()).gr_name,
            "pool_managerd_online_timeout_s": 30,
            **extra,
        }

    @property
    def config_file(self) -> Path:
        return self.etc / "pool-managerd.yml"

    @property
    def join_token_file(self) -> Path:
        return self.etc / "pool-managerd.join-token"

    @property
    def credentials(self) -> Path:
        return self.state / "credentials"

    def run(self, *entry_points: str, **extra: Any) -> dict[str, Any]:
        inventory = {"all": {"hosts": {NODE: local_host(**self.host_vars, **extra)}}}
        play = {
            "name": "node",
            "hosts": "all",
            "gather_facts": False,
            "tasks": role_tasks(*entry_points, root=self.root),
        }
        rc, output = run_playbook(self.tmp_path, [play], inventory)
        assert rc == 0, failures(output)
        return output

    def agent_log(self) -> str:
        log = self.root / "agent.log"
        return log.read_text(errors="replace") if log.exists() else ""

    def stop_agent(self) -> None:
        """The agent the play started, by the pid it wrote (its parent is Ansible's async wrapper)."""
        pid_file = self.root / "agent.pid"
        if pid_file.exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)


def credential_names(daemon: Daemon) -> set[str]:
    answer = daemon.api("GET", "/v2/credentials")
    assert answer.status == 200, answer.text
    return {item["name"] for item in answer.body["credentials"]}


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


@pytest.fixture
def nodes():
    made: list[Node] = []
    yield made
    for node in made:
        node.stop_agent()


def test_a_new_node_joins_with_its_own_credential_and_a_second_run_changes_nothing(daemon, tmp_path, nodes):
    node = Node(tmp_path, daemon)
    nodes.append(node)
    # What the role runs, in its order; the agent starts where the unit's restart would.
    output = node.run("identity", "configure", "agent", "online", "joined")
    changed = changed_tasks(output)
    assert "Issue a join credential for gpu-7" in changed
    assert "Revoke the spent join credential in the daemon" in changed
    assert "Remove the spent join token file from the node" in changed
    assert daemon.token not in str(output)

    # The config names the join token and the credential folder, and no shared token; the agent reads it.
    values = yaml.safe_load(node.config_file.read_text())
    assert "token_file" not in values
    assert values["join_token_file"] == str(node.join_token_file)
    assert values["credential_dir"] == str(node.credentials)
    settings = load_settings(node.config_file)
    assert settings.token_file is None and settings.join_token_file == str(node.join_token_file)
    assert not (node.etc / "pool-managerd.token").exists()

    # The agent joined with the token (plain http, the lab switch: the secret alone), which is gone now,
    # and so is its credential: the node holds its own two, 0600.
    assert f"as node {NODE} with join_token_file {node.join_token_file}" in node.agent_log()
    assert not node.join_token_file.exists()
    assert credential_names(daemon) == {f"node/{NODE}", f"recovery/{NODE}"}
    assert mode(node.credentials) == 0o700
    assert mode(node.credentials / "node-token") == 0o600
    assert mode(node.credentials / "recovery-token") == 0o600
    assert daemon.api("GET", f"/v2/nodes/{NODE}").body["status"] == "online"

    # A second run: the node has its node token, so no join credential, no file, no change.
    output = node.run("identity", "configure", "online", "joined")
    assert changed_tasks(output) == []
    assert credential_names(daemon) == {f"node/{NODE}", f"recovery/{NODE}"}
    assert not node.join_token_file.exists()

    # The node's credential is the node's alone: it may neither drain the node nor read the registry.
    node_token = (node.credentials / "node-token").read_text().splitlines()[0]
    assert node_token.startswith("lln_")
    assert daemon.api("POST", f"/v2/nodes/{NODE}/drain", {"drain": True}, token=node_token).status == 403
    assert daemon.api("GET", "/v2/nodes", token=node_token).status == 403
    assert daemon.api("GET", f"/v2/nodes/{NODE}").body["status"] == "online"


def test_a_join_token_is_written_for_the_node_alone_bound_to_it_for_one_use(daemon, tmp_path):
    node = Node(tmp_path, daemon)
    output = node.run("identity", "configure")
    assert mode(node.join_token_file) == 0o600
    secret = node.join_token_file.read_text().strip()
    assert secret.startswith("llj_") and "sha256:" not in secret
    (join,) = daemon.api("GET", "/v2/credentials").body["credentials"]
    assert join["name"].startswith(f"join-{NODE}-") and join["scope"] == "join"
    assert (join["node_id"], join["uses_left"], join["usable"]) == (NODE, 1, True)
    # no_log: neither the secret nor the admin token shows in the play's output.
    assert secret not in str(output) and daemon.token not in str(output)
    # Bound: it cannot join another node id.
    assert daemon.api("POST", "/v2/join", {"node_id": "gpu-8"}, token=secret).status == 403


def test_the_shared_token_fallback_writes_the_token_file_and_issues_nothing(daemon, tmp_path):
    node = Node(tmp_path, daemon, pool_managerd_shared_token=True)
    output = node.run("identity", "configure")
    assert "Issue a join credential for gpu-7" not in changed_tasks(output)
    values = yaml.safe_load(node.config_file.read_text())
    assert values["token_file"] == str(node.etc / "pool-managerd.token")
    assert "join_token_file" not in values
    token_file = node.etc / "pool-managerd.token"
    assert mode(token_file) == 0o600 and token_file.read_text().strip() == TEST_TOKEN
    assert not node.join_token_file.exists()
    assert credential_names(daemon) == set()


def test_a_shared_token_that_is_not_a_boolean_is_refused_by_the_argument_spec(daemon, tmp_path):
    node = Node(tmp_path, daemon, pool_managerd_shared_token="sometimes")
    inventory = {"all": {"hosts": {NODE: local_host(**node.host_vars)}}}
    play = {"name": "node", "hosts": "all", "gather_facts": False, "roles": ["pool_managerd"]}
    rc, output = run_playbook(tmp_path, [play], inventory)
    assert rc != 0
    message = " ".join(failures(output).values())
    assert "pool_managerd_shared_token" in message and "bool" in message, message


def test_a_credential_dir_outside_the_state_dir_is_refused_before_anything_is_issued(daemon, tmp_path):
    node = Node(tmp_path, daemon, pool_managerd_credential_dir=str(tmp_path / "elsewhere"))
    inventory = {"all": {"hosts": {NODE: local_host(**node.host_vars)}}}
    play = {"name": "node", "hosts": "all", "gather_facts": False, "tasks": role_tasks("identity")}
    rc, output = run_playbook(tmp_path, [play], inventory)
    assert rc != 0
    (message,) = failures(output).values()
    assert message.startswith(
        f"pool_managerd_credential_dir ({tmp_path / 'elsewhere'}) must be a folder inside"
    )
    assert credential_names(daemon) == set()


def test_over_https_the_join_token_pins_the_cluster_ca_from_the_controllers_pki(daemon, tmp_path):
    # Issued over plain http here (the test daemon), but written for an https control plane: the role reads
    # the pin of the PKI's CA itself when llorch_pki did not run in the same play.
    pki = tmp_path.parent / f"{tmp_path.name}-pki"
    pki.mkdir()
    write_ca(pki / "ca.crt")
    node = Node(
        tmp_path,
        daemon,
        llorch_control_url="https://ctl-1:9200",
        llorch_controller_url=daemon.url,
        llorch_pki_dir=str(pki),
    )
    node.run("identity", "configure")
    pin, _, secret = node.join_token_file.read_text().strip().removeprefix("sha256:").partition("::")
    der = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes()).public_bytes(Encoding.DER)
    assert pin == hashlib.sha256(der).hexdigest() == ca_pins(str(pki / "ca.crt"))[0]
    assert secret.startswith("llj_")
    assert yaml.safe_load(node.config_file.read_text())["ca_file"] == "/etc/llorch/tls/ca.crt"


@pytest.mark.parametrize(
    ("urls", "tls"),
    [
        # The list wins over the single URL: its scheme decides, for every URL of it.
        (
            {
                "llorch_control_url": "http://ctl:9200",
                "llorch_control_urls": ["https://a:9200", "https://b:9200"],
            },
            True,
        ),
        ({"llorch_control_urls": ["http://a:9200", "http://b:9200"]}, False),
        ({"llorch_control_url": "https://ctl:9200"}, True),
    ],
)
def test_tls_is_decided_from_every_control_url_in_use(tmp_path, urls, tls):
    shared = {"llorch_api_token": TEST_TOKEN, **urls}
    rendered = render_role(tmp_path, "pool_managerd", None, ("_pool_managerd_tls",), NODE, shared)
    assert rendered["_pool_managerd_tls"] is tls


def test_mixed_schemes_in_the_control_urls_are_refused(daemon, tmp_path):
    node = Node(tmp_path, daemon, llorch_control_urls=["https://a:9200", "http://b:9200"])
    inventory = {"all": {"hosts": {NODE: local_host(**node.host_vars)}}}
    play = {"name": "node", "hosts": "all", "gather_facts": False, "tasks": role_tasks("identity")}
    rc, output = run_playbook(tmp_path, [play], inventory)
    assert rc != 0
    (message,) = failures(output).values()
    assert "all https or all http" in message
    assert credential_names(daemon) == set()

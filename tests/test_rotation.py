"""Rotation without downtime, the way playbooks/rotate_credentials.yml does it, against the real daemon over
TLS and real agents heartbeating every 200 ms: a next CA beside the current one, the bundle of both on every
host, the server certificate re-issued from the next CA (SIGHUP), each node's token rotated and the old one
revoked once the agent uses the new one, its recovery token replaced, then the next CA alone everywhere.

Through all of it no agent fails a heartbeat and every node stays online; afterwards a client that trusts
only the old CA is refused, the old node tokens are 401, and revoking one node's credential stops it at once
(its next heartbeat is a 401 and it rejoins with the recovery token the rotation handed it)."""

from __future__ import annotations

import re
import signal
import ssl
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from support import REPO_ROOT, http, wait_until
from support_agent import AgentProcess, make_agent
from support_tls import TlsDaemon, make_tls_daemon

sys.path.insert(0, str(REPO_ROOT / ".collections"))
from ansible_collections.llorch.kit.plugins.module_utils import llorch_pki

NODES = ("gpu-a", "gpu-b", "gpu-c")
# What an agent logs when a request to the control plane fails, whatever the cause (agent.py's _trouble,
# identity.py, control_urls.py): none of these may appear while the rotation runs.
FAILED = re.compile(
    r" (WARNING|ERROR) .*(control plane|token|certificate|ca_file|join)|gave no answer|joined |HTTP 401"
)


def ensure(kind: str, path: Path, key: Path, ca: Path | None = None, ca_key: Path | None = None) -> dict:
    """llorch_certificate's one call (module_utils), as the role llorch_pki makes it."""
    return llorch_pki.ensure_certificate(
        {
            "kind": kind,
            "path": str(path),
            "private_key_path": str(key),
            "ca_path": None if ca is None else str(ca),
            "ca_private_key_path": None if ca_key is None else str(ca_key),
            "common_name": None if kind == "ca" else "127.0.0.1",
            "dns_names": [],
            "ip_addresses": [] if kind == "ca" else ["127.0.0.1"],
            "valid_days": None,
            "renew_before_days": 30,
        },
        check_mode=False,
    )


class Cluster:
    """The controller's PKI folder, one control host's TLS files, the daemon, and one CA file per node."""

    def __init__(self, root: Path) -> None:
        self.pki = root / "pki"
        self.pki.mkdir(mode=0o700)
        self.control = root / "control-host"
        self.control.mkdir()
        made = ensure("ca", self.pki / "ca.crt", self.pki / "ca.key")
        self.old_pin = made["sha256"]
        self.issue_server(self.pki / "ca.crt", self.pki / "ca.key")
        self.install("ca.crt", (self.pki / "ca.crt").read_bytes())
        self.install_server()
        self.daemon: TlsDaemon = make_tls_daemon(
            root / "daemon",
            node_timeout_ms=3000,
            heartbeat_interval_ms=200,
            tls_cert_file=str(self.control / "orchestratord.crt"),
            tls_key_file=str(self.control / "orchestratord.key"),
            tls_ca_file=str(self.control / "ca.crt"),
        )
        # The controller's own calls trust what the playbook's calls trust (the bundle during the overlap).
        self.daemon.ca_file = self.pki / "ca.crt"
        self.node_ca_files: list[Path] = []
        self.reloads = 0

    def issue_server(self, ca: Path, ca_key: Path) -> dict:
        folder = self.pki / "control-1"
        return ensure("server", folder / "server.crt", folder / "server.key", ca, ca_key)

    def install(self, name: str, data: bytes, mode: int = 0o644) -> None:
        llorch_pki.write_file(str(self.control / name), data, mode)

    def install_server(self) -> None:
        folder = self.pki / "control-1"
        self.install("orchestratord.crt", (folder / "server.crt").read_bytes())
        self.install("orchestratord.key", (folder / "server.key").read_bytes(), 0o600)

    def trust_everywhere(self, pem: bytes) -> None:
        """Phase 1 and 3's file writes: every host's CA file (the control host's tls_ca_file too), by
        rename; then the control host reloads. No agent restarts."""
        for ca_file in self.node_ca_files:
            llorch_pki.write_file(str(ca_file), pem, 0o644)
        self.install("ca.crt", pem)
        self.reload()

    def reload(self) -> None:
        """systemctl reload orchestratord: SIGHUP, and the daemon's line saying it took the files."""
        self.reloads += 1
        self.daemon.proc.send_signal(signal.SIGHUP)
        wait_until(
            lambda: self.daemon.log().count("TLS reloaded: serving") >= self.reloads,
            timeout=10,
            what="orchestratord's TLS reload line",
        )
        assert "TLS reload refused" not in self.daemon.log(), self.daemon.log()


class Watch:
    """Polls every node's status while the rotation runs: a node that is not online once is a failure."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.not_online: list[str] = []
        self.polls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            try:
                context = ssl.create_default_context(cafile=str(self.cluster.daemon.ca_file))
                answer = http(
                    "GET",
                    self.cluster.daemon.url + "/v2/nodes",
                    token=self.cluster.daemon.token,
                    context=context,
                    timeout=3,
                )
            except OSError as error:  # the test's own client: the playbook's trust moves between phases
                self.not_online.append(f"the watcher's request failed: {error}")
                continue
            statuses = {node["node_id"]: node["status"] for node in answer.body["nodes"]}
            self.polls += 1
            self.not_online += [f"{n}: {statuses.get(n)}" for n in NODES if statuses.get(n) != "online"]

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def heartbeats_ok(daemon: TlsDaemon) -> float:
    text = daemon.api("GET", "/metrics", token=None).text
    found = re.search(r'orchestratord_heartbeats_total\{outcome="ok"\} (\S+)', text)
    return float(found.group(1)) if found else 0.0


def credentials(daemon: TlsDaemon) -> dict[str, dict]:
    return {c["name"]: c for c in daemon.api("GET", "/v2/credentials").body["credentials"]}


def parse_time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


@pytest.fixture
def cluster(tmp_path) -> Iterator[tuple[Cluster, list[AgentProcess]]]:
    """The daemon over TLS (the kit's CA) and three agents joined with join tokens pinned to that CA."""
    made = Cluster(tmp_path)
    made.daemon.start()
    agents: list[AgentProcess] = []
    try:
        for node_id in NODES:
            secret = made.daemon.api(
                "POST", "/v2/credentials", {"name": f"join-{node_id}", "scope": "join", "node_id": node_id}
            ).body["secret"]
            folder = tmp_path / node_id
            folder.mkdir()
            join_file = folder / "join-token"
            join_file.write_text(f"sha256:{made.old_pin}::{secret}\n")
            join_file.chmod(0o600)
            ca_file = folder / "ca.crt"
            llorch_pki.write_file(str(ca_file), (made.pki / "ca.crt").read_bytes(), 0o644)
            made.node_ca_files.append(ca_file)
            agents.append(
                make_agent(
                    folder / "agent",
                    made.daemon,
                    token_file=None,
                    join_token_file=str(join_file),
                    credential_dir=str(folder / "credentials"),
                    ca_file=str(ca_file),
                    node_id=node_id,
                    address=f"http://{node_id}.lab:8000",
                ).start()
            )
        wait_until(
            lambda: (
                all(s == "online" for s in statuses(made.daemon).values())
                and len(statuses(made.daemon)) == len(NODES)
            ),
            timeout=30,
            what="three nodes online over TLS",
        )
        yield made, agents
    finally:
        for agent in agents:
            agent.stop()
        made.daemon.stop()


def statuses(daemon: TlsDaemon) -> dict[str, str]:
    for agent_node in daemon.api("GET", "/v2/nodes").body["nodes"]:
        assert agent_node["status"] != "offline", agent_node
    return {node["node_id"]: node["status"] for node in daemon.api("GET", "/v2/nodes").body["nodes"]}


def rotate_node(cluster: Cluster, agent: AgentProcess, node_id: str) -> str:
    """Phase 2b for one node (serial: 1): the rotation call, the new recovery token written to the node's
    credential folder, the wait for a heartbeat with the new token, the old one revoked. Returns the
    token the node held before."""
    daemon = cluster.daemon
    before = (Path(agent.config["credential_dir"]) / "node-token").read_text().split()[0]
    asked_at = time.time()
    answer = daemon.api("POST", f"/v2/nodes/{node_id}/credential/rotate")
    assert answer.status == 200, answer.text
    assert answer.body["name"] == f"recovery/{node_id}" and answer.body["secret"].startswith("llv_")
    # As the playbook's copy does: 0600, replaced by rename, in the agent's own folder.
    folder = Path(agent.config["credential_dir"])
    llorch_pki.write_file(str(folder / "recovery-token"), (answer.body["secret"] + "\n").encode(), 0o600)

    def switched() -> bool:
        current = credentials(daemon).get(f"node/{node_id}")
        return (
            current is not None
            and parse_time(current["created_at"]) >= int(asked_at)
            and current["last_used_at"] is not None
            and parse_time(current["last_used_at"]) >= parse_time(current["created_at"])
            and f"node/{node_id}/old" in credentials(daemon)
        )

    wait_until(switched, timeout=10, what=f"{node_id} heartbeating with its new token")
    assert daemon.api("DELETE", f"/v2/credentials/node/{node_id}/old").status == 204
    assert (folder / "node-token").read_text().split()[0] != before
    return before


def test_a_full_rotation_loses_no_heartbeat_and_leaves_nothing_old_trusted(cluster, tmp_path):
    cluster, agents = cluster
    daemon = cluster.daemon
    marks = [len(agent.log()) for agent in agents]
    ok_at_start, started = heartbeats_ok(daemon), time.monotonic()
    old_ca_pem = (cluster.pki / "ca.crt").read_bytes()
    old_tokens: dict[str, str] = {}

    with Watch(cluster) as watch:
        # Phase 0, on the controller: the next CA beside the current one, and the bundle of both.
        overlap = llorch_pki.ca_overlap(str(cluster.pki), 3650, llorch_pki.DEFAULT_CA_NAME, False)
        assert overlap["changed"] and overlap["current_sha256"] == cluster.old_pin
        new_pin = overlap["next_sha256"]
        assert (
            llorch_pki.ca_overlap(str(cluster.pki), 3650, llorch_pki.DEFAULT_CA_NAME, False)["changed"]
            is False
        )

        # Phase 1: every host trusts both.
        cluster.trust_everywhere(overlap["bundle"].encode())
        cluster.daemon.ca_file = Path(overlap["bundle_path"])
        wait_until(
            lambda: all("changed: new connections trust" in a.log() for a in agents),
            timeout=10,
            what="every agent taking the bundle",
        )

        # Phase 2: the server certificate from the next CA, reloaded (no restart).
        pid = daemon.proc.pid
        issued = cluster.issue_server(
            Path(overlap["next_ca_path"]), Path(overlap["next_ca_private_key_path"])
        )
        assert issued["changed"] and issued["reason"] == "other_ca"
        cluster.install_server()
        cluster.reload()

        # Phase 2b: node by node.
        for node_id, agent in zip(NODES, agents, strict=True):
            old_tokens[node_id] = rotate_node(cluster, agent, node_id)

        # Phase 3: the next CA alone everywhere, then promoted on the controller.
        new_ca_pem = Path(overlap["next_ca_path"]).read_bytes()
        cluster.trust_everywhere(new_ca_pem)
        (tmp_path / "new-ca.crt").write_bytes(new_ca_pem)  # the test's own client, while the files move
        cluster.daemon.ca_file = tmp_path / "new-ca.crt"
        promoted = llorch_pki.ca_promote(str(cluster.pki), False)
        assert promoted["sha256"] == new_pin and promoted["retired"] is not None
        cluster.daemon.ca_file = cluster.pki / "ca.crt"
        assert (cluster.pki / "ca.crt").read_bytes() == new_ca_pem
        assert not (cluster.pki / "next").exists() and Path(promoted["retired"]).read_bytes() == old_ca_pem
        assert llorch_pki.ca_promote(str(cluster.pki), False)["changed"] is False

        # A few more beats after the last step: anything the end broke would show now.
        ok_before = heartbeats_ok(daemon)
        wait_until(lambda: heartbeats_ok(daemon) >= ok_before + 30, timeout=15, what="30 more heartbeats")

    assert daemon.proc.pid == pid and daemon.proc.poll() is None, "orchestratord restarted"
    assert watch.polls >= 10 and watch.not_online == [], watch.not_online
    for agent, mark in zip(agents, marks, strict=True):
        assert agent.running()
        failures = [line for line in agent.log()[mark:].splitlines() if FAILED.search(line)]
        assert failures == [], "\n".join(failures)
        assert agent.log()[mark:].count("node token renewed") == 1
    # Heartbeats went on at their pace: 3 nodes, one every 200 ms each, at least half of that on a loaded
    # machine (an agent that stalled on a handshake or a token would fall far below).
    expected = len(NODES) * (time.monotonic() - started) / 0.2
    assert heartbeats_ok(daemon) - ok_at_start >= expected / 2, (
        heartbeats_ok(daemon) - ok_at_start,
        expected,
    )

    # The old CA is trusted nowhere: a client trusting only it is refused with the verifier's reason.
    only_old = tmp_path / "old-ca.crt"
    only_old.write_bytes(old_ca_pem)
    with pytest.raises(OSError, match="certificate verify failed: unable to get local issuer"):
        http("GET", daemon.url + "/health", context=ssl.create_default_context(cafile=str(only_old)))
    for ca_file in [*cluster.node_ca_files, cluster.control / "ca.crt"]:
        assert ca_file.read_bytes() == new_ca_pem
    assert llorch_pki.read_private_key(str(cluster.pki / "ca.key")) is not None

    # The old node tokens are refused.
    for node_id, token in old_tokens.items():
        answer = daemon.api("POST", f"/v2/nodes/{node_id}/heartbeat", {"pools": []}, token=token)
        assert answer.status == 401, answer.text
    names = credentials(daemon)
    assert not any(name.endswith("/old") for name in names), names
    assert all(not name.startswith("join-") or not names[name]["usable"] for name in names)

    # A join token pinned to the old CA is refused by the agent before its secret leaves the node.
    sys.path.insert(0, str(REPO_ROOT / "files" / "pool_managerd"))
    from pool_managerd.identity import IdentityError, JoinSecret, ca_pins, check_pin

    assert ca_pins(str(cluster.node_ca_files[0])) == [new_pin]
    with pytest.raises(IdentityError, match="does not hold the CA the join token pins"):
        check_pin(JoinSecret("x", cluster.old_pin), daemon.url, str(cluster.node_ca_files[0]), "join")

    # Revoking one node's credential stops it at once: its next heartbeat is a 401, and it rejoins with
    # the recovery token the rotation wrote (the one it held before was replaced by the rotation).
    revoked = agents[1]
    mark = len(revoked.log())
    assert daemon.api("DELETE", "/v2/credentials/node/gpu-b").status == 204
    wait_until(
        lambda: "refused this node's token (HTTP 401 on heartbeat)" in revoked.log()[mark:],
        timeout=5,
        what="gpu-b's next heartbeat refused",
    )
    wait_until(lambda: "with the recovery token" in revoked.log()[mark:], timeout=10, what="gpu-b rejoined")
    wait_until(lambda: statuses(daemon).get("gpu-b") == "online", timeout=10, what="gpu-b online again")


def test_the_agent_takes_a_changed_ca_file_without_a_restart(cluster, tmp_path):
    """The control host comes back with a certificate of another CA: the agent refuses it, naming ca_file,
    until its ca_file holds that CA; written there (by rename) the same agent process trusts it at its next
    request."""
    cluster, agents = cluster
    agent, daemon = agents[0], cluster.daemon
    pid = agent.proc.pid
    other = tmp_path / "other-ca"
    other.mkdir(mode=0o700)
    ensure("ca", other / "ca.crt", other / "ca.key")
    cluster.install("ca.crt", (other / "ca.crt").read_bytes())
    cluster.issue_server(other / "ca.crt", other / "ca.key")
    cluster.install_server()
    cluster.daemon.ca_file = other / "ca.crt"
    mark = len(agent.log())
    daemon.restart()  # cuts the agent's keep-alive connection: its next one meets the other CA
    wait_until(lambda: "does not vouch for" in agent.log()[mark:], timeout=15, what="the refusal")
    llorch_pki.write_file(agent.config["ca_file"], (other / "ca.crt").read_bytes(), 0o644)
    wait_until(lambda: "changed: new connections trust" in agent.log()[mark:], timeout=10, what="the reload")
    wait_until(lambda: statuses(daemon).get(NODES[0]) == "online", timeout=15, what="the node online")
    assert agent.proc.pid == pid and agent.running()
    assert agent.log()[mark:].count("changed: new connections trust") == 1


def test_the_playbooks_modules_rotate_the_ca_files_and_a_node(cluster, tmp_path):
    """llorch_certificate_rotation and llorch_node_credential, run by ansible-playbook: the CA steps are
    idempotent and a node switches to its new token before the old one is revoked."""
    from support_registry import ansible_env, run_tasks

    cluster, agents = cluster
    daemon, agent = cluster.daemon, agents[2]
    pki = str(cluster.pki)
    env = ansible_env(daemon, tmp_path)
    made, again = run_tasks(
        env,
        tmp_path,
        [
            {"llorch.kit.llorch_certificate_rotation": {"pki_dir": pki, "state": "overlap"}},
            {"llorch.kit.llorch_certificate_rotation": {"pki_dir": pki, "state": "overlap"}},
        ],
    )
    assert made["changed"] and not again["changed"] and made["next_sha256"] == again["next_sha256"]
    assert made["current_sha256"] == cluster.old_pin and made["bundle"].count("BEGIN CERTIFICATE") == 2
    assert (cluster.pki / "next").stat().st_mode & 0o777 == 0o700
    assert (cluster.pki / "next" / "ca.key").stat().st_mode & 0o777 == 0o600

    asked, switched, revoked_again = run_tasks(
        env,
        tmp_path,
        [
            {
                "llorch.kit.llorch_node_credential": {
                    "node_id": "gpu-c",
                    "state": "rotating",
                    "ca_path": str(cluster.pki / "ca.crt"),
                },
                "register": "rotation",
            },
            {
                "llorch.kit.llorch_node_credential": {
                    "node_id": "gpu-c",
                    "state": "switched",
                    "since": "{{ rotation.asked_at }}",
                    "ca_path": str(cluster.pki / "ca.crt"),
                    "timeout_s": 20,
                }
            },
            {
                "llorch.kit.llorch_node_credential": {
                    "node_id": "gpu-c",
                    "state": "switched",
                    "since": "{{ rotation.asked_at }}",
                    "ca_path": str(cluster.pki / "ca.crt"),
                }
            },
        ],
    )
    assert asked["changed"] and asked["recovery_token"].startswith("llv_"), asked
    assert switched["changed"] and switched["credential"]["name"] == "node/gpu-c", switched
    assert not revoked_again["changed"]  # the old token is gone already
    assert "node/gpu-c/old" not in credentials(daemon)
    assert "node token renewed" in agent.log() and statuses(daemon)["gpu-c"] == "online"

    promoted, promoted_again = run_tasks(
        env,
        tmp_path,
        [
            {"llorch.kit.llorch_certificate_rotation": {"pki_dir": pki, "state": "promoted"}},
            {"llorch.kit.llorch_certificate_rotation": {"pki_dir": pki, "state": "promoted"}},
        ],
    )
    assert promoted["changed"] and promoted["sha256"] == made["next_sha256"] and not promoted_again["changed"]
    assert not (cluster.pki / "next").exists() and len(list((cluster.pki / "retired").iterdir())) == 1


def test_a_promotion_stopped_between_its_renames_is_finished_by_the_next_run(tmp_path):
    pki = tmp_path / "pki"
    pki.mkdir(mode=0o700)
    ensure("ca", pki / "ca.crt", pki / "ca.key")
    overlap = llorch_pki.ca_overlap(str(pki), 3650, llorch_pki.DEFAULT_CA_NAME, False)
    # What a stop right after the first rename leaves: ca.crt is the next CA, its key still in next/.
    Path(overlap["next_ca_path"]).replace(pki / "ca.crt")
    again = llorch_pki.ca_overlap(str(pki), 3650, llorch_pki.DEFAULT_CA_NAME, False)
    assert again["finished_previous"] and again["current_sha256"] == overlap["next_sha256"]
    key = llorch_pki.read_private_key(str(pki / "ca.key"))
    cert = llorch_pki.read_certificate(str(pki / "ca.crt"))
    assert llorch_pki._public_der(key) == llorch_pki._public_der(cert.public_key())
    assert not (pki / "next").exists()


def test_only_an_admin_rotates_and_only_a_node_with_a_credential(daemon):
    """The route's refusals: an unknown node is a 404 naming it; reader, operator and node credentials are
    403 (access.py's admin need); a bad id is a 400."""
    assert daemon.api("POST", "/v2/nodes/gpu-x/credential/rotate").body["code"] == "CREDENTIAL_NOT_FOUND"
    for scope in ("reader", "operator"):
        secret = daemon.api("POST", "/v2/credentials", {"name": f"a-{scope}", "scope": scope}).body["secret"]
        answer = daemon.api("POST", "/v2/nodes/gpu-x/credential/rotate", token=secret)
        assert answer.status == 403 and scope in answer.body["message"], answer.text
    join = daemon.api("POST", "/v2/credentials", {"name": "j", "scope": "join", "node_id": "gpu-x"}).body
    joined = daemon.api("POST", "/v2/join", {"node_id": "gpu-x"}, token=join["secret"]).body
    answer = daemon.api("POST", "/v2/nodes/gpu-x/credential/rotate", token=joined["node_token"])
    assert answer.status == 403, answer.text
    assert daemon.api("POST", "/v2/nodes/bad%20id/credential/rotate").status == 400
    # An admin's rotation of a node with a credential: the recovery secret replaced at once.
    rotated = daemon.api("POST", "/v2/nodes/gpu-x/credential/rotate")
    assert rotated.status == 200 and rotated.body["name"] == "recovery/gpu-x", rotated.text
    stale = daemon.api("POST", "/v2/join", {"node_id": "gpu-x"}, token=joined["recovery_token"])
    assert stale.status == 401, stale.text
    assert "credential rotation asked by admin 'cluster-admin'" in daemon.log()
    assert rotated.body["secret"] not in daemon.log()

"""Two orchestratord replicas on one PostgreSQL, judged by their own answers.

The tests run in file order and each starts from the state the one before left (molecule.yml runs pytest
with -x): both replicas agree; one replica killed with SIGKILL (and kept down) while the node heartbeats,
the other carries the node; a drain made on the survivor is seen by the restarted one; the database
stopped: writes answer 503 STORE_UNAVAILABLE, reads keep answering 200 and the node stays online; the
database back: nothing lost, both agree again. The replicas are asked over HTTPS from this machine,
trusting the scenario's CA; the hosts are driven through molecule's inventory.
"""

from __future__ import annotations

import json
import os
import ssl
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import testinfra.utils.ansible_runner

PROJECT = Path(os.environ["MOLECULE_PROJECT_DIRECTORY"])
RUNNER = testinfra.utils.ansible_runner.AnsibleRunner(os.environ["MOLECULE_INVENTORY_FILE"])

DB = "molecule-ha-db"
CTL_1 = "molecule-ha-ctl-1"  # the agent's first URL: the one it heartbeats to while it answers
CTL_2 = "molecule-ha-ctl-2"
NODE = "molecule-ha-gpu"
REPLICAS = {CTL_1: "https://10.89.240.41:9200", CTL_2: "https://10.89.240.42:9200"}
CA_FILE = PROJECT / ".lab" / "molecule-ha" / "pki" / "ca.crt"
TOKEN_FILE = PROJECT / ".lab" / "molecule" / "api-token"
# molecule.yml's orchestratord_heartbeat_interval_ms and orchestratord_node_timeout_ms.
HEARTBEAT_S = 1.0
NODE_TIMEOUT_S = 5.0
POSTGRESQL_UNIT = "postgresql@15-main"
# Keeps systemd from restarting the killed replica while the test looks (removed to start it again).
NO_RESTART_DROP_IN = "/run/systemd/system/orchestratord.service.d/ha-verify-no-restart.conf"


# --- the replicas -----------------------------------------------------------------------------------


def registry(replica: str, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    """One call to a replica: (status, decoded JSON or None); (0, reason) when it does not answer."""
    request = urllib.request.Request(
        REPLICAS[replica] + path,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={
            "Authorization": "Bearer " + TOKEN_FILE.read_text().strip(),
            "Content-Type": "application/json",
        },
    )
    context = ssl.create_default_context(cafile=str(CA_FILE))
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as answer:
            raw = answer.read()
            return answer.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as error:
        raw = error.read()
        return error.code, json.loads(raw) if raw else None
    except OSError as error:
        return 0, str(error)


def statuses(replica: str) -> dict[str, tuple[str, bool]]:
    """node id -> (status, drain), as the replica lists its nodes."""
    status, listing = registry(replica, "GET", "/v2/nodes")
    assert status == 200, (replica, status, listing)
    return {node["node_id"]: (node["status"], node["drain"]) for node in listing["nodes"]}


def last_heartbeat(replica: str) -> datetime | None:
    status, node = registry(replica, "GET", f"/v2/nodes/{NODE}")
    assert status == 200, (replica, status, node)
    stamp = node.get("last_heartbeat_at")
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")) if stamp else None


def wait_until(check, timeout: float, what: str, step: float = 0.1):
    """Poll `check` until it returns something true (returned) or `timeout` seconds pass (fail)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(step)
    raise AssertionError(f"{what}: not within {timeout} s (last: {last!r})")


def both_agree(expected: tuple[str, bool]) -> bool:
    views = [statuses(replica) for replica in REPLICAS]
    return views[0] == views[1] and views[0].get(NODE) == expected


def hold(seconds: float, check, what: str, step: float = 0.25) -> int:
    """Assert `check()` on every poll for `seconds`; returns how many polls held."""
    deadline = time.monotonic() + seconds
    polls = 0
    while time.monotonic() < deadline:
        assert check(), f"{what} failed after {polls} polls"
        polls += 1
        time.sleep(step)
    return polls


# --- the tests --------------------------------------------------------------------------------------


def test_both_replicas_list_the_same_nodes_with_the_same_statuses():
    wait_until(lambda: both_agree(("online", False)), 20, f"{NODE} online and undrained on both replicas")
    views = {replica: statuses(replica) for replica in REPLICAS}
    assert views[CTL_1] == views[CTL_2] == {NODE: ("online", False)}, views


def test_a_killed_replica_leaves_the_node_to_the_other_and_sees_its_drain_when_back():
    ctl_1 = RUNNER.get_host(CTL_1)
    ctl_1.check_output(
        "mkdir -p %s && printf '[Service]\\nRestart=no\\n' > %s && systemctl daemon-reload",
        os.path.dirname(NO_RESTART_DROP_IN),
        NO_RESTART_DROP_IN,
    )
    try:
        ctl_1.check_output("systemctl kill --signal=KILL orchestratord")
        killed_at = datetime.now(UTC)
        since_kill = time.monotonic()
        wait_until(lambda: registry(CTL_1, "GET", "/health")[0] == 0, 5, "the killed replica gone")
        assert ctl_1.check_output("systemctl show -p ActiveState --value orchestratord") in (
            "failed",
            "inactive",
        )

        # The agent's next heartbeats go to the survivor: a beat sent after the kill shows there.
        wait_until(
            lambda: (last_heartbeat(CTL_2) or killed_at) > killed_at,
            2 * HEARTBEAT_S + 0.5,
            "a heartbeat sent after the kill, on the surviving replica",
        )
        landed_s = time.monotonic() - since_kill
        assert landed_s <= 2 * HEARTBEAT_S + 0.5, landed_s
        print(f"\nfirst heartbeat on the survivor {landed_s:.2f} s after the kill returned")

        # Down for longer than the node timeout: the node stays online there, its beats keep coming.
        def carried() -> bool:
            beat = last_heartbeat(CTL_2)
            age = (datetime.now(UTC) - beat).total_seconds() if beat else 1e9
            return statuses(CTL_2).get(NODE) == ("online", False) and age <= 2 * HEARTBEAT_S

        assert hold(NODE_TIMEOUT_S + 1, carried, "the node online on the surviving replica") > 10

        status, node = registry(CTL_2, "POST", f"/v2/nodes/{NODE}/drain", {"drain": True})
        assert status == 200 and node["drain"] is True, (status, node)
    finally:
        ctl_1.check_output(
            "rm -f %s && systemctl daemon-reload && systemctl reset-failed orchestratord; "
            "systemctl start orchestratord",
            NO_RESTART_DROP_IN,
        )
    wait_until(lambda: registry(CTL_1, "GET", "/ready")[0] == 200, 30, "the restarted replica ready")
    wait_until(lambda: both_agree(("draining", True)), 10, "the drain seen by the restarted replica")


def test_a_stopped_database_refuses_writes_with_503_reads_go_on_and_nothing_is_lost():
    db = RUNNER.get_host(DB)
    db.check_output("systemctl stop %s", POSTGRESQL_UNIT)
    try:
        for replica in REPLICAS:
            status, answer = wait_until(
                lambda replica=replica: (
                    result
                    if (result := registry(replica, "POST", f"/v2/nodes/{NODE}/drain", {"drain": False}))[0]
                    != 200
                    else None
                ),
                15,
                f"a write refused by {replica} while the database is down",
            )
            assert status == 503 and answer["code"] == "STORE_UNAVAILABLE", (replica, status, answer)

        # Longer than the node timeout: reads answer, the node is neither offline nor undrained anywhere.
        def reads_answer() -> bool:
            return all(statuses(replica).get(NODE) == ("draining", True) for replica in REPLICAS)

        assert hold(NODE_TIMEOUT_S + 1, reads_answer, "reads with the database down") > 10
    finally:
        db.check_output("systemctl start %s", POSTGRESQL_UNIT)

    for replica in REPLICAS:
        wait_until(
            lambda replica=replica: registry(replica, "GET", "/ready")[0] == 200, 30, f"{replica} ready"
        )
    # Nothing lost: the drain made before the stop is in the database (a restarted replica reads it there).
    RUNNER.get_host(CTL_2).check_output("systemctl restart orchestratord")
    wait_until(lambda: registry(CTL_2, "GET", "/ready")[0] == 200, 30, "the restarted replica ready")
    wait_until(lambda: both_agree(("draining", True)), 10, "the drain kept across the database's restart")

    status, node = registry(CTL_1, "POST", f"/v2/nodes/{NODE}/drain", {"drain": False})
    assert status == 200 and node["drain"] is False, (status, node)
    wait_until(lambda: both_agree(("online", False)), 10, "the node back online and undrained on both")

"""Several orchestratord replicas on one PostgreSQL database (docs/ha.md): registrations, drains,
deletions and credentials made on one show on the other within about a second; a node is online on both
or on neither, even when their wall clocks are hours apart (libfaketime shifts one daemon's wall clock
and leaves its monotonic clock alone); a database gap sends no node offline; the same state gives the
same placement on both. Real daemons, a real PostgreSQL (tests/support_postgres.py)."""

from __future__ import annotations

import contextlib
import email.utils
import glob
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from support import make_daemon, sample_registration, wait_until
from support_daemon import beat, online_node, place
from support_postgres import fresh_database

# Other replicas' changes show within db_poll_interval_ms (a NOTIFY makes it sooner); the tests allow
# twice that plus the heartbeat write-back's second, on a shared, busy machine.
CONVERGES_WITHIN_S = 3.0
NODE_TIMEOUT_MS = 3000


def libfaketime() -> str:
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
    if not found:
        pytest.fail(
            "libfaketime is not installed: apt-get install libfaketime (make system-deps)", pytrace=False
        )
    return found[0]


def replicas(postgres, tmp_path: Path, count: int = 2, **overrides) -> list:
    database = fresh_database(postgres, tmp_path / "db")
    return [
        make_daemon(tmp_path / f"replica-{n}", **database, node_timeout_ms=NODE_TIMEOUT_MS, **overrides)
        for n in range(count)
    ]


def start_shifted(daemon, shift: str):
    """Start `daemon` with its wall clock moved by `shift` (libfaketime's syntax, e.g. "+3h"); its
    monotonic clock is left alone, as it would be on a host whose clock is simply wrong."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("LD_PRELOAD", libfaketime())
        env.setenv("FAKETIME", shift)
        env.setenv("FAKETIME_DONT_FAKE_MONOTONIC", "1")
        env.setenv("FAKETIME_DONT_RESET", "1")
        return daemon.start()


def wall_clock_of(daemon) -> float:
    """The daemon's wall clock, from its HTTP Date header."""
    answer = daemon.api("GET", "/health", token=None)
    return email.utils.parsedate_to_datetime(answer.headers["Date"]).timestamp()


def node_status(daemon, node_id: str) -> str | None:
    answer = daemon.api("GET", f"/v2/nodes/{node_id}")
    return answer.body["status"] if answer.status == 200 else None


class Agent:
    """A node agent heartbeating every 200 ms to one replica only, in a thread."""

    def __init__(self, daemon, registration: dict) -> None:
        self.daemon, self.registration = daemon, registration
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stopped.wait(0.2):
            # The test reads the statuses; a refused beat shows there.
            with contextlib.suppress(Exception):
                beat(self.daemon, self.registration, ["llama"], serve="llama")

    def __enter__(self) -> Agent:
        self.thread.start()
        return self

    def stop(self) -> float:
        self.stopped.set()
        self.thread.join(timeout=5)
        return time.monotonic()

    def __exit__(self, *_exc) -> None:
        self.stop()


@pytest.fixture
def pair(postgres, tmp_path):
    daemons = replicas(postgres, tmp_path)
    yield daemons
    for daemon in daemons:
        daemon.stop()


def test_registration_drain_and_deletion_on_one_replica_show_on_the_other(pair):
    first, second = (daemon.start() for daemon in pair)
    online_node(first, "gpu-1", ["llama"], serve="llama")
    started = time.monotonic()
    wait_until(
        lambda: node_status(second, "gpu-1") == "online", CONVERGES_WITHIN_S, what="gpu-1 on the second"
    )
    seen_after_s = time.monotonic() - started
    node = second.api("GET", "/v2/nodes/gpu-1").body
    assert node["models"] == ["llama"] and node["address"] == "http://gpu-1.lab:8080"
    # The agent registers again (a restart) with the same body: it starts over on both replicas.
    assert first.api("POST", "/v2/nodes/register", sample_registration("gpu-1")).status == 200
    assert node_status(first, "gpu-1") == "registering"
    wait_until(lambda: node_status(second, "gpu-1") == "registering", CONVERGES_WITHIN_S, what="registering")
    beat(first, sample_registration("gpu-1"), ["llama"], serve="llama")
    wait_until(lambda: node_status(second, "gpu-1") == "online", CONVERGES_WITHIN_S, what="online again")

    assert second.api("POST", "/v2/nodes/gpu-1/drain", {"drain": True}).status == 200
    wait_until(lambda: first.api("GET", "/v2/nodes/gpu-1").body["drain"] is True, CONVERGES_WITHIN_S)
    assert place(first, model_id="llama").status == 503  # the first replica's placement skips it too

    assert first.api("DELETE", "/v2/nodes/gpu-1").status == 204
    wait_until(lambda: second.api("GET", "/v2/nodes/gpu-1").status == 404, CONVERGES_WITHIN_S)
    assert "node gpu-1 deleted (through another replica)" in second.log()
    print(f"registration seen on the other replica after {seen_after_s * 1000:.0f} ms")


def test_credentials_issued_revoked_and_spent_on_one_replica_hold_on_the_other(pair):
    first, second = (daemon.start() for daemon in pair)
    issued = first.api("POST", "/v2/credentials", {"name": "alice", "scope": "reader"})
    assert issued.status == 201, issued.text
    secret = issued.body["secret"]
    wait_until(
        lambda: second.api("GET", "/v2/nodes", token=secret).status == 200,
        CONVERGES_WITHIN_S,
        what="alice's secret taken by the second replica",
    )
    assert second.api("POST", "/v2/nodes/gpu-1/drain", {"drain": True}, token=secret).status == 403

    join = second.api("POST", "/v2/credentials", {"name": "one-join", "scope": "join"})
    assert join.status == 201, join.text
    wait_until(lambda: "one-join" in names_on(first), CONVERGES_WITHIN_S, what="the join credential")
    joined = first.api("POST", "/v2/join", {"node_id": "gpu-7"}, token=join.body["secret"])
    assert joined.status == 200, joined.text
    # Its single use is spent on every replica: the other one refuses it once the change reached it.
    wait_until(
        lambda: second.api("POST", "/v2/join", {"node_id": "gpu-8"}, token=join.body["secret"]).status == 401,
        CONVERGES_WITHIN_S,
        what="the spent join credential refused by the other replica",
    )
    node_token = joined.body["node_token"]
    wait_until(
        lambda: (
            second.api("POST", "/v2/nodes/register", sample_registration("gpu-7"), token=node_token).status
            == 200
        ),
        CONVERGES_WITHIN_S,
        what="the node's own token taken by the other replica",
    )

    assert second.api("DELETE", "/v2/credentials/alice").status == 204
    wait_until(
        lambda: first.api("GET", "/v2/nodes", token=secret).status == 401,
        CONVERGES_WITHIN_S,
        what="the revocation on the first replica",
    )


def names_on(daemon) -> set[str]:
    answer = daemon.api("GET", "/v2/credentials")
    assert answer.status == 200, answer.text
    return {credential["name"] for credential in answer.body["credentials"]}


def test_a_node_is_online_on_both_replicas_or_neither_with_wall_clocks_hours_apart(pair):
    first, second = pair
    first.start()
    start_shifted(second, "+3h")
    # The shift is real: the second daemon's wall clock is three hours ahead of the first's.
    assert abs(wall_clock_of(second) - wall_clock_of(first) - 3 * 3600) < 60

    registration = online_node(first, "gpu-1", ["llama"], serve="llama")
    with Agent(first, registration) as agent:  # heartbeats reach the first replica only
        wait_until(lambda: node_status(second, "gpu-1") == "online", CONVERGES_WITHIN_S, what="online there")
        # Longer than the node timeout: the second replica keeps it online from the first one's rows.
        deadline = time.monotonic() + NODE_TIMEOUT_MS / 1000 * 1.5
        while time.monotonic() < deadline:
            assert node_status(first, "gpu-1") == "online"
            assert node_status(second, "gpu-1") == "online"
            time.sleep(0.1)
        # A replica that starts meanwhile with its clock hours behind sees the node online at once (its
        # age comes from the database's clock, not from its own wall clock).
        second.stop()
        start_shifted(second, "-3h")
        assert node_status(second, "gpu-1") == "online"
        silent_since = agent.stop()
    for daemon in (first, second):
        wait_until(
            lambda daemon=daemon: node_status(daemon, "gpu-1") == "offline",
            NODE_TIMEOUT_MS / 1000 + 2.0,
            what="gpu-1 offline",
        )
    offline_after_s = time.monotonic() - silent_since
    assert offline_after_s <= NODE_TIMEOUT_MS / 1000 + 2.0
    # A replica three hours behind, started after the silence, does not take the node for alive.
    second.stop()
    start_shifted(second, "-3h")
    assert node_status(second, "gpu-1") == "offline"
    print(f"both replicas list the node offline {offline_after_s * 1000:.0f} ms after its agent stopped")


def test_a_database_gap_sends_no_node_offline_and_liveness_resumes_from_fresh_heartbeats(postgres, pair):
    first, second = (daemon.start() for daemon in pair)
    alive = online_node(first, "gpu-1", ["llama"], serve="llama")
    dying = online_node(first, "gpu-2", ["llama"], serve="llama")
    with Agent(first, alive), Agent(first, dying) as dying_agent:
        for node_id in ("gpu-1", "gpu-2"):
            wait_until(lambda node_id=node_id: node_status(second, node_id) == "online", CONVERGES_WITHIN_S)
        postgres.stop()
        try:
            wait_until(lambda: "node liveness is paused" in second.log(), 5.0, what="the pause logged")
            dying_agent.stop()  # gpu-2 dies during the gap: nobody can tell until the database is back
            deadline = time.monotonic() + NODE_TIMEOUT_MS / 1000 * 2
            while time.monotonic() < deadline:
                # The second replica cannot see the first one's heartbeats, yet marks nobody offline.
                assert node_status(second, "gpu-1") == "online"
                assert node_status(second, "gpu-2") == "online"
                time.sleep(0.1)
        finally:
            postgres.start()
        wait_until(lambda: "node liveness resumes" in second.log(), 15.0, what="liveness resumed")
        # gpu-1's heartbeats keep it online everywhere; gpu-2, silent, goes offline on both.
        for daemon in (first, second):
            wait_until(
                lambda daemon=daemon: node_status(daemon, "gpu-2") == "offline",
                NODE_TIMEOUT_MS / 1000 + 3.0,
                what="gpu-2 offline once the database is back",
            )
        assert node_status(second, "gpu-1") == "online"
        assert node_status(first, "gpu-1") == "online"
        assert "gpu-1 offline" not in second.log()


def test_the_same_state_gives_the_same_placement_on_every_replica(pair):
    first, second = (daemon.start() for daemon in pair)
    # Ties everywhere: every node has the same free slots and VRAM, registered in a shuffled order.
    for node_id in ("gpu-3", "gpu-1", "gpu-4", "gpu-2"):
        online_node(first, node_id, ["llama", "qwen"], serve="llama", pools=2)
    wait_until(
        lambda: second.api("GET", "/v2/nodes?status=online").body["count"] == 4,
        CONVERGES_WITHIN_S,
        what="every node online on the second replica",
    )
    for request in ({"model_id": "llama"}, {}, {"model_id": "llama", "vram_bytes": 1024**3}):
        answers = [place(daemon, **request) for daemon in (first, second)]
        assert all(answer.status == 200 for answer in answers), [a.text for a in answers]
        assert answers[0].body == answers[1].body
        assert (answers[0].body["node_id"], answers[0].body["pool_id"]) == ("gpu-1", "pool-0")


def test_a_single_use_join_token_joins_one_node_however_many_replicas_are_asked_at_once(pair):
    first, second = (daemon.start() for daemon in pair)
    join = first.api("POST", "/v2/credentials", {"name": "one-join", "scope": "join"})
    assert join.status == 201, join.text
    wait_until(lambda: "one-join" in names_on(second), CONVERGES_WITHIN_S, what="the join credential there")
    secret = join.body["secret"]

    def join_on(n: int):
        daemon = (first, second)[n % 2]
        return daemon.api("POST", "/v2/join", {"node_id": f"gpu-{n}"}, token=secret).status

    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = sorted(pool.map(join_on, range(8)))
    # Both replicas held the token with its one use left; the database spends it once.
    assert statuses == [200] + [401] * 7, statuses
    joined = [n for n in range(8) if f"node/gpu-{n}" in names_on(first) | names_on(second)]
    assert len(joined) == 1, joined


def test_a_lost_listen_connection_is_opened_again_and_changes_still_show_at_once(postgres, tmp_path):
    # Polls ten seconds apart: a change showing within a second came through the NOTIFY.
    first, second = (daemon.start() for daemon in replicas(postgres, tmp_path, db_poll_interval_ms=10_000))
    try:
        database = first.config["db_url"].rsplit("/", 1)[1]
        killed = postgres.sql(
            database,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            f"WHERE application_name = 'orchestratord-listen' AND datname = '{database}'",
        )
        assert len(killed) == 2, killed
        wait_until(
            lambda: "LISTEN connection" in second.log() and "was lost: opening it again" in second.log(),
            5.0,
            what="the lost LISTEN connection noticed",
        )
        wait_until(
            lambda: (
                len(
                    postgres.sql(
                        database,
                        "SELECT pid FROM pg_stat_activity "
                        f"WHERE application_name = 'orchestratord-listen' AND datname = '{database}'",
                    )
                )
                == 2
            ),
            5.0,
            what="both replicas listening again",
        )
        online_node(first, "gpu-1", ["llama"], serve="llama")
        wait_until(lambda: node_status(second, "gpu-1") is not None, 2.0, what="the registration via NOTIFY")
    finally:
        first.stop()
        second.stop()

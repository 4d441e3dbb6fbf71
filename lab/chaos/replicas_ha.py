"""What the HA rows (replica_kill, db_restart) share: a control plane of two replicas on this machine's
loopback, built the way tests/test_orchestratord_replicas.py and bench/replicas.py build it.

The podman lab has one control host, so two replicas and their database cannot be faulted there; here
they are the shipped daemon (`python -m orchestratord`, HTTPS on 127.0.0.1 with a throwaway CA from
tests/support_tls.py, which the agents, the clients and the checks trust) on a throwaway PostgreSQL from
Debian's server (bench/_orchestratord/postgres.py), the swarm of simulated agents (bench/_chaos/swarm.py)
with both URLs, half listing A first and half B first, and registry clients asking for placements through
the controller's own client over both URLs (bench/_chaos/placements.py). Everything is started by
`loopback()` and stopped when its block ends, nothing left running.
"""

from __future__ import annotations

import contextlib
import shutil
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from _chaos.placements import PlacementLoad
from _chaos.swarm import Swarm, first_answer_after
from _orchestratord import postgres
from common import poll
from support import (
    TEST_TOKEN,
    Daemon,
    engine_status,
    http,
    sample_heartbeat,
    sample_registration,
)
from support_postgres import PostgresServer, fresh_database
from support_tls import make_tls_daemon, write_ca

HEARTBEAT_S = 5.0  # the lab's and the shipped interval
NODE_TIMEOUT_S = 15.0  # the shipped three intervals
PLACEMENTS_PER_S = 20.0
AFTER_S = 5.0  # the clients' "after" window: at least this long from the repair
# The swarm's agents run no engine, so two more nodes report one (ready, serving MODEL) for the placements;
# each heartbeats like an agent given both URLs, one A first, one B first.
MODEL = "chaos-model"
SERVED = ("served-a", "served-b")
PLACEMENT = {"model_id": MODEL}


class ServedNodes:
    """SERVED's heartbeats every HEARTBEAT_S, each to its first URL that answers, registering on a 404."""

    def __init__(self, urls: tuple[str, str], context: ssl.SSLContext):
        self._orders = {SERVED[0]: urls, SERVED[1]: urls[::-1]}
        self._context = context
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="served-nodes", daemon=True)

    def _post(self, url: str, body: dict) -> int:
        return http("POST", url, body, token=TEST_TOKEN, timeout=5, context=self._context).status

    def _beat(self, node: str) -> None:
        registration = sample_registration(node)
        pool = {"engine": engine_status(MODEL), "models_available": [MODEL]}
        for url in self._orders[node]:
            beat_url = f"{url}/v2/nodes/{node}/heartbeat"
            try:
                if self._post(beat_url, sample_heartbeat(registration, **pool)) == 404:
                    self._post(f"{url}/v2/nodes/register", registration)
                    self._post(beat_url, sample_heartbeat(registration, **pool))
                return
            except OSError:
                continue  # no answer: the next URL, as an agent does

    def _run(self) -> None:
        while True:
            for node in SERVED:
                self._beat(node)
            if self._stopping.wait(HEARTBEAT_S):
                return

    def start(self) -> ServedNodes:
        for node in SERVED:
            self._beat(node)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(15)


@dataclass
class Loopback:
    server: PostgresServer
    replicas: list[Daemon]  # [A, B]
    swarm: Swarm
    clients: PlacementLoad

    @property
    def urls(self) -> list[str]:
        return [r.url for r in self.replicas]

    def nodes(self, replica: Daemon, status: str | None = None) -> dict[str, dict] | None:
        """id -> node as `replica` lists it; None when it gives no 200."""
        try:
            answer = replica.api("GET", "/v2/nodes" + (f"?status={status}" if status else ""), timeout=10)
        except OSError:
            return None
        return {n["node_id"]: n for n in answer.body["nodes"]} if answer.status == 200 else None

    def drain(self, replica: Daemon, node: str) -> tuple[int | None, str]:
        """(status, error code) of a drain through `replica`; (None, why) with no answer."""
        try:
            answer = replica.api("POST", f"/v2/nodes/{node}/drain", {"drain": True}, timeout=10)
        except OSError as error:
            return None, type(error).__name__
        return answer.status, ((answer.body or {}).get("code") or "") if answer.status != 200 else ""


def statuses(nodes: dict[str, dict] | None) -> dict[str, tuple[str, bool]]:
    return {name: (n["status"], bool(n.get("drain"))) for name, n in (nodes or {}).items()}


@contextlib.contextmanager
def loopback(size: int) -> Iterator[Loopback]:
    """The server, both replicas, `size` agents joined (each heard by its first replica) and the clients
    running; all stopped at the end of the block."""
    server = postgres.start(durable=False)
    replicas: list[Daemon] = []
    swarm = clients = served = None
    try:
        database = fresh_database(server, server.root / "secrets")
        settings = {
            "heartbeat_interval_ms": int(HEARTBEAT_S * 1000),
            "node_timeout_ms": int(NODE_TIMEOUT_S * 1000),
            "max_nodes": size + 16,
            "log_level": "warning",
        }
        ca_file = server.root / "ca.pem"  # one throwaway CA signs both replicas' certificates
        ca = write_ca(ca_file)
        for name in ("a", "b"):
            replicas.append(make_tls_daemon(server.root / name, ca, **database, **settings).start())
        urls = (replicas[0].url, replicas[1].url)
        swarm = Swarm(
            urls[0],
            TEST_TOKEN,
            size,
            start_over_s=HEARTBEAT_S,
            ca_file=str(ca_file),
            urls_of=lambda n: urls if n % 2 == 0 else urls[::-1],
        ).start()
        joined_at = time.monotonic()
        if poll(lambda: len(first_answer_after(swarm.sent, joined_at)) == size, 120, 0.5) is None:
            joined = len(first_answer_after(swarm.sent, joined_at))
            raise RuntimeError(f"the swarm did not join in 120 s ({joined} of {size})")
        served = ServedNodes(urls, replicas[0].client_context()).start()
        clients = PlacementLoad(list(urls), TEST_TOKEN, PLACEMENT, PLACEMENTS_PER_S, str(ca_file)).start()
        yield Loopback(server, replicas, swarm, clients)
    finally:
        if clients is not None:
            clients.stop()
        if served is not None:
            served.stop()
        if swarm is not None:
            swarm.stop()
        for replica in replicas:
            replica.stop()
        if server.running():
            server.stop()
        shutil.rmtree(server.root, ignore_errors=True)


def probe(replica: Daemon) -> bool:
    try:
        return replica.api("GET", "/health", token=None, timeout=1).status == 200
    except OSError:
        return False

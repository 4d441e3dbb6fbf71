"""Registry clients during the HA chaos rows: an open loop of placements (`POST /v2/placement`) through the
controller's own client (plugins/module_utils/llorch_api.py) given every replica's URL, first that answers
wins, as a playbook or the inventory plugin would reach the control plane.

Open loop as load.py: request i leaves at start + i / rate on a pool of worker threads whatever became of
the ones before it. Each request is recorded as load.py's Request, so a scenario reads what the clients saw
with the same Window (errors, P50/P95/P99). Each worker holds its own client: the client remembers the URL
that answered last, and moves on from a replica that gives no answer.
"""

from __future__ import annotations

import atexit
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _chaos.load import Request, Window

# The client imports its siblings as the collection's (ansible_collections.llorch.kit...), as Ansible runs it:
# a private folder holding that name as a link to this checkout makes the import the real one.
_COLLECTIONS = Path(tempfile.mkdtemp(prefix="llorch-chaos-collections-"))
atexit.register(shutil.rmtree, _COLLECTIONS, True)
(_COLLECTIONS / "ansible_collections" / "llorch").mkdir(parents=True)
(_COLLECTIONS / "ansible_collections" / "llorch" / "kit").symlink_to(Path(__file__).resolve().parents[2])
sys.path.insert(0, str(_COLLECTIONS))

from ansible_collections.llorch.kit.plugins.module_utils.llorch_api import (  # noqa: E402
    LlorchApiError,
    LlorchClient,
)


class PlacementLoad:
    """`rate` placements a second over `urls` (tried in that order) with `token`, until stopped."""

    def __init__(
        self,
        urls: list[str],
        token: str,
        body: dict,
        rate: float,
        ca_path: str | None = None,
        workers: int = 16,
        timeout_s: int = 10,
    ):
        self.requests: list[Request] = []  # appended by the workers, read by other threads
        self._sent_at: list[float] = []
        self._urls, self._token, self._body, self._rate = urls, token, body, rate
        self._timeout_s = timeout_s
        self._ca_path = ca_path  # HTTPS replicas: the CA the client trusts (the client's ca_path option)
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="placements")
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._schedule, name="placement-load", daemon=True)

    def _client(self) -> LlorchClient:
        if not hasattr(self._local, "client"):
            self._local.client = LlorchClient(
                self._urls, token=self._token, ca_path=self._ca_path, timeout=self._timeout_s
            )
        return self._local.client

    def _one(self, due: float) -> None:
        sent = time.monotonic()
        self._sent_at.append(sent)
        status, outcome = 200, "ok"
        try:
            self._client().request("POST", "/v2/placement", self._body)
        except LlorchApiError as error:
            status = error.status
            outcome = f"status {error.status} {error.code or ''}".strip() if error.status else "no answer"
        self.requests.append(Request(sent, time.monotonic(), status, outcome))

    def _schedule(self) -> None:
        started, number = time.monotonic(), 0
        while not self._stopping.wait(max(0.0, started + number / self._rate - time.monotonic())):
            self._pool.submit(self._one, started + number / self._rate)
            number += 1

    def start(self) -> PlacementLoad:
        self._client()  # the client's imports (Ansible's open_url) before the clock starts
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(10)
        self._pool.shutdown(wait=True, cancel_futures=True)

    def window(self, start: float, end: float) -> Window:
        return Window([r for r in list(self.requests) if start <= r.sent_at < end])

    def in_flight(self, at: float) -> int:
        """Requests sent before `at` that had not ended at `at`."""
        return sum(r.sent_at <= at < r.ended_at for r in list(self.requests))

    def settled(self, until: float, timeout_s: float = 30) -> None:
        """Wait until every request sent before `until` has ended."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if sum(r.sent_at < until for r in list(self.requests)) >= sum(t < until for t in self._sent_at):
                return
            time.sleep(0.1)

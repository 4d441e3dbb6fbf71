"""A swarm of simulated node agents built from pool-managerd's own code, in one thread of the caller.

Each simulated node is a real `pool_managerd.agent.Agent` running its own register/heartbeat loop
(`Agent._loop`: the backoff with full jitter, the pace the control plane sets, re-registering on 404) over
its own `ControlPlane` session, so what the daemon sees after a kill or a partition is what a fleet of real
agents would send. Only the GPU probe is shared: the stand-in nvidia-smi is read once and every node
reports that machine. Every request is recorded (when it was sent, whether an HTTP answer came), which is
what the request-rate figures are computed from.

    swarm = Swarm(url, token, count=1000, start_over_s=2).start()
    ...
    swarm.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
STANDIN = REPO_ROOT / "files" / "testing" / "nvidia-smi-standin"
STANDIN_FIXTURE = REPO_ROOT / "files" / "testing" / "nvsmi" / "lab-2x-l4"
sys.path.insert(0, str(REPO_ROOT / "files" / "pool_managerd"))

from pool_managerd.agent import Agent  # noqa: E402  (the agent's package, from the checkout)
from pool_managerd.config import PoolConfig, Settings  # noqa: E402
from pool_managerd.control import Answer, ControlPlane  # noqa: E402
from pool_managerd.node import probe_gpus  # noqa: E402

AGENT_LOG = logging.getLogger("pool_managerd")


@dataclass(frozen=True)
class Sent:
    """One request of one simulated node: when it left (monotonic), what it was, whether it was answered."""

    at: float
    node: int
    kind: str  # "register" | "heartbeat"
    status: int | None  # None: no HTTP answer (refused, timed out)
    answered_at: float
    url: str = ""  # the control-plane URL that answered (or the next to try, with no answer)


class RecordingControlPlane(ControlPlane):
    """The agent's client, unchanged, with every request written to the swarm's log."""

    def __init__(self, swarm: Swarm, node: int, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._swarm = swarm
        self._node = node

    async def request(self, method: str, path: str, *args, **kwargs) -> Answer:
        sent = time.monotonic()
        answer = await super().request(method, path, *args, **kwargs)
        kind = path.rsplit("/", 1)[-1]  # "register", "heartbeat" or a node id (a deregistration)
        self._swarm.sent.append(Sent(sent, self._node, kind, answer.status, time.monotonic(), self.base_url))
        return answer


def node_id(number: int) -> str:
    return f"swarm-{number:04d}"


class Swarm:
    """`count` simulated agents against `url`; started over `start_over_s` seconds, as a fleet comes up."""

    def __init__(
        self,
        url: str,
        token: str,
        count: int,
        start_over_s: float = 2.0,
        ca_file: str | None = None,
        request_timeout_s: float = 5.0,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        urls_of: Callable[[int], tuple[str, ...]] | None = None,
    ):
        self.url = url
        # Per node, the control plane's URLs in the order that node tries them (control_urls), when the
        # swarm runs against replicas; None: every node has `url` alone.
        self._urls_of = urls_of
        self.count = count
        # Appended by the swarm's loop only, read by other threads: a list append is atomic.
        self.sent: list[Sent] = []
        self.agents: list[Agent] = []
        self._token = token
        self._start_over_s = start_over_s
        self._ca_file = ca_file
        self._timing = {
            "request_timeout_s": request_timeout_s,
            "backoff_initial_s": backoff_initial_s,
            "backoff_max_s": backoff_max_s,
        }
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="swarm", daemon=True)
        self._ready = threading.Event()
        self._scratch = tempfile.TemporaryDirectory(prefix="llorch-swarm-")
        self._failure: BaseException | None = None
        self._log_level: int | None = None

    def _settings(self, number: int) -> Settings:
        scratch = Path(self._scratch.name)
        urls = self._urls_of(number) if self._urls_of is not None else None
        return Settings(
            control_url=urls[0] if urls else self.url,
            control_urls=urls,
            token_file=str(scratch / "token-not-read"),  # the token is handed over; the name is for messages
            node_id=node_id(number),
            address=f"http://{node_id(number)}.swarm:8000",
            models_dir=str(scratch / "models"),
            nvidia_smi=str(STANDIN),
            ca_file=self._ca_file,
            **self._timing,
        )

    def _build(self) -> None:
        # A thousand agents saying "unreachable" once each is noise: the figures tell the story. The level
        # is the process's, so stop() puts it back (tests after this one read the agent's log lines).
        self._log_level = AGENT_LOG.level
        AGENT_LOG.setLevel(logging.ERROR)
        (Path(self._scratch.name) / "models").mkdir()
        os.environ.setdefault("NVIDIA_SMI_STANDIN_FIXTURE", str(STANDIN_FIXTURE))
        gpus = probe_gpus(self._settings(0))  # one probe: every simulated node is the same machine
        pools = (PoolConfig("gpus01", tuple(gpu.index for gpu in gpus.gpus), 2),)
        self.agents = [Agent(self._settings(n), self._token, pools, gpus) for n in range(self.count)]

    async def _life(self, number: int, agent: Agent) -> None:
        await asyncio.sleep(random.uniform(0, self._start_over_s))
        settings = agent.settings
        async with RecordingControlPlane(
            self,
            number,
            settings.control_urls or settings.control_url,
            self._token,
            settings.request_timeout_s,
            settings.ca_file,
        ) as control:
            await agent._loop(control)  # the agent's own loop: backoff, pace, re-registration

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._build()
        except BaseException as error:  # reported by start()
            self._failure = error
            self._ready.set()
            return
        tasks = [self._loop.create_task(self._life(n, agent)) for n, agent in enumerate(self.agents)]
        self._ready.set()
        self._loop.run_forever()
        for task in tasks:
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        self._loop.close()

    def start(self) -> Swarm:
        self._thread.start()
        assert self._ready.wait(60), "the swarm did not start"
        if self._failure is not None:
            raise self._failure
        return self

    def stop(self) -> None:
        with contextlib.suppress(RuntimeError):  # the loop already closed
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self._scratch.cleanup()
        if self._log_level is not None:
            AGENT_LOG.setLevel(self._log_level)


def herd_bucket_s(heartbeat_s: float, count: int) -> float:
    """The bucket the herd figure is read in: a fifth of a heartbeat, and at least 200 steady requests, so
    that a loaded machine's own unevenness (measured: single 0.5 s buckets at 2x the mean in a steady run
    on 2 busy cores) does not read as a herd, while a fleet returning together still stands out."""
    return max(heartbeat_s / 5, 200 * heartbeat_s / count)


def rate_per_s(sent: list[Sent], start: float, end: float, bucket_s: float) -> list[float]:
    """Requests per second that reached the daemon (got an HTTP answer), in buckets of `bucket_s` by the
    time they were sent: a herd shows as one tall bucket."""
    buckets = max(1, int((end - start) / bucket_s))
    counts = [0] * buckets
    for s in sent:
        if s.status is not None and start <= s.at < start + buckets * bucket_s:
            counts[int((s.at - start) / bucket_s)] += 1
    return [count / bucket_s for count in counts]


def first_answer_after(sent: list[Sent], since: float) -> dict[int, float]:
    """Per node: when (answered_at, monotonic) its first 2xx heartbeat sent at or after `since` came back."""
    first: dict[int, float] = {}
    for s in sorted(sent, key=lambda s: s.answered_at):
        if s.at >= since and s.kind == "heartbeat" and s.status == 200:
            first.setdefault(s.node, s.answered_at)
    return first

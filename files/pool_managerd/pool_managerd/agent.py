"""The agent's life: register with backoff, heartbeat at the pace the control plane sets, deregister on stop.

It never exits because the control plane is down, slow, restarted or refusing it: every request has a
timeout and every failure leads to another try: a registration after a jittered exponential backoff, a
heartbeat at the heartbeat's own jittered pace. One log line per state change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import threading
import time

from .config import PoolConfig, Settings
from .control import Answer, ControlPlane
from .engine_config import EngineFile
from .engine_watch import EngineWatch, watch_engines
from .identity import CredentialStore, IdentityError, check_pin, join_candidates, now
from .models import ModelManifest
from .node import heartbeat, pool_statuses, probe_gpus, registration
from .nvidia_smi import NvidiaSmiError, ProbeResult

log = logging.getLogger(__name__)

# The longest a stop may wait for the deregistration: systemd's stop timeout is far longer.
DEREGISTER_TIMEOUT_S = 3.0
# The state of an agent whose registrations work and whose heartbeats get 404 at once.
HEARTBEAT_NOT_FOUND = "heartbeat-not-found"
# Exit code when a person must act (as __main__'s configuration errors): a CA pin that does not match.
EXIT_PERSON_MUST_ACT = 2
# A failed heartbeat's next try starts this share of the interval after the failed one started, drawn
# uniformly. A host that refused or answered an error is up and will come back with every node at once:
# retries at the heartbeat's own pace keep its return at the steady rate, not a herd (1.12-1.36x after a
# kill -9, docs/chaos.md). A try that found no way there (no route, no reply in time) never reached the
# control plane, so it cannot add to a herd there: the next comes within one interval, so that a healed
# network brings the node back within one heartbeat (at 0.8-1.2x it took 5.8 s at 5 s).
RETRY_PACE = (0.8, 1.2)
UNREACHABLE_RETRY_PACE = (0.5, 1.0)
# Each wait between heartbeats is the interval the control plane set times a draw from this range (mean 1,
# so the rate it planned for holds). Without it nodes that a slow moment of the control plane answered
# together (a restart's TLS handshakes, a pause) would stay in step, every interval, for good.
BEAT_JITTER = (0.9, 1.1)


# The pace the control plane sets is obeyed within these bounds: a hostile or broken answer can neither
# make the agent hammer it nor sleep for days.
MIN_HEARTBEAT_MS = 100
MAX_HEARTBEAT_MS = 60_000


def heartbeat_delay_s(asked_ms: int, node_timeout_ms: int | None) -> float:
    """The wait before the next heartbeat: what the control plane asked for, within 100 ms .. 60 s and
    under half the node timeout it announced, so that one late heartbeat never takes the node offline."""
    ceiling = MAX_HEARTBEAT_MS
    if node_timeout_ms is not None and node_timeout_ms > 0:
        ceiling = min(ceiling, max(MIN_HEARTBEAT_MS, node_timeout_ms // 2))
    return min(max(asked_ms, MIN_HEARTBEAT_MS), ceiling) / 1000


class Backoff:
    """Exponential backoff with full jitter: a random wait in [0, min(cap, initial * 2**attempt)]."""

    def __init__(self, initial_s: float, cap_s: float):
        self.initial_s = initial_s
        self.cap_s = cap_s
        self.attempt = 0

    def next_delay(self) -> float:
        ceiling = min(self.cap_s, self.initial_s * (2**self.attempt))
        self.attempt = min(self.attempt + 1, 32)
        return random.uniform(0, ceiling)

    def reset(self) -> None:
        self.attempt = 0


class Agent:
    def __init__(
        self,
        settings: Settings,
        token: str | None,
        pools: tuple[PoolConfig, ...],
        gpus: ProbeResult | None,
        engines: dict[str, EngineFile] | None = None,
        engine_key: str | None = None,
    ):
        self.settings = settings
        self._shared_token = token  # token_file's: the last resort once node identities are in use
        self.credentials = CredentialStore(settings.credential_dir)
        self.using_node_token = False  # whether the secret presented is this node's own
        self.needs_credential = True  # at start, and after the node token was refused
        self.generation = ""  # of the registration the control plane answered last
        self.pools = pools
        self.gpus = gpus
        self.gpus_healthy = True
        self.draining = False
        self.manifest = ModelManifest(settings.models_dir)
        self.backoff = Backoff(settings.backoff_initial_s, settings.backoff_max_s)
        self.state = "starting"
        self.registered_once = False
        self.node_timeout_ms: int | None = None
        self.heartbeat_s: float | None = None  # the interval in force, once registered
        # Set when an engine starts or stops serving: the next heartbeat goes at once, not at its time.
        self._beat_now = asyncio.Event()
        self.engine_watches = {
            pool_id: EngineWatch(engine, self._beat_now.set) for pool_id, engine in (engines or {}).items()
        }
        self._engine_key = engine_key
        self._stop = asyncio.Event()
        self._control: ControlPlane | None = None

    # -- state and logging ------------------------------------------------------------------------------

    @property
    def control_url(self) -> str:
        """The control-plane URL in use now (control_urls: the one that answered last), for log lines."""
        return self._control.base_url if self._control is not None else self.settings.control_url

    def _enter(self, state: str, message: str, level: int = logging.INFO) -> None:
        """Log only when the state changes, so a long outage is one line, not one per retry."""
        if state != self.state:
            log.log(level, message)
            self.state = state

    def _trouble(self, what: str, answer: Answer) -> None:
        url = self.control_url
        if answer.status == 401 and self.using_node_token:
            # Expired or revoked while the agent was off or the control plane lost it: recover alone.
            log.warning(
                "control plane %s refused this node's token (HTTP 401 on %s); joining again", url, what
            )
            self.credentials.forget_node_token()
            self.needs_credential = True
            self.state = "rejoining"
        elif answer.status == 401:
            self._enter(
                "rejected",
                f"token rejected by {url} (HTTP 401 on {what}): check token_file "
                f"{self.settings.token_file}; retrying with backoff",
                logging.ERROR,
            )
        elif answer.status is not None and answer.problem:
            self._enter(
                "bad-answer",
                f"control plane {url} gave {answer.problem} (HTTP {answer.status} on {what}); "
                "retrying with backoff",
                logging.ERROR,
            )
        elif answer.untrusted_certificate:
            trusted = self.settings.ca_file or "the system's CA store (no ca_file set)"
            self._enter(
                "untrusted",
                f"control plane {url} presented a TLS certificate that {trusted} does not vouch for on "
                f"{what} ({answer.problem}): point ca_file at the CA that signed it; retrying with backoff",
                logging.ERROR,
            )
        elif answer.status is None or answer.status >= 500:
            self._enter(
                "unreachable",
                f"control plane {url} unreachable on {what} ({answer.describe()}); retrying with backoff",
                logging.WARNING,
            )
        else:
            self._enter(
                "refused",
                f"control plane {url} refused the {what} ({answer.describe()}); retrying with backoff",
                logging.ERROR,
            )

    # -- one cycle ----------------------------------------------------------------------------------------

    def _gpus_failing(self, problem: str) -> None:
        if self.gpus_healthy:
            log.error("GPU probe failed: %s; GPU pools report not ready", problem)
        self.gpus_healthy = False

    async def _watch_gpus(self) -> None:
        """Read free VRAM every gpu_probe_interval_s, off the heartbeat's path.

        Heartbeats only read the latest snapshot, so a slow or hung nvidia-smi (a GPU fallen off the bus)
        never delays one: the node stays online and its GPU pools report not ready while the probe fails or
        has run longer than gpu_probe_timeout_s. One probe at a time: a hung one is waited for, not piled on.
        """
        while True:
            await asyncio.sleep(self.settings.gpu_probe_interval_s)
            await self._probe_once()

    async def _probe_once(self) -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        limit = self.settings.gpu_probe_timeout_s

        def settle(outcome: tuple[ProbeResult | None, str] | None, error: BaseException | None) -> None:
            if done.done():  # the agent stopped meanwhile
                return
            if error is not None:
                done.set_exception(error)
            else:
                done.set_result(outcome)

        def work() -> None:
            outcome, error = None, None
            try:
                # Only the GPU query: the CUDA version does not change under a running driver.
                fresh = probe_gpus(self.settings, False, timeout=limit)
                outcome = (fresh, "" if fresh is not None else "no GPU found any more")
            except NvidiaSmiError as failure:
                outcome = (None, str(failure))
            except BaseException as bug:  # not an outage but a bug: re-raised in the event loop
                error = bug
            with contextlib.suppress(RuntimeError):  # the event loop is gone: the agent has stopped
                loop.call_soon_threadsafe(settle, outcome, error)

        # A daemon thread, not the default executor: one stuck in the driver must not hold up the exit.
        threading.Thread(target=work, name="gpu-probe", daemon=True).start()
        try:
            fresh, problem = await asyncio.wait_for(asyncio.shield(done), limit)
        except TimeoutError:
            self._gpus_failing(
                f"nvidia-smi did not answer within {limit:g} s: the GPU driver may be hung "
                "(look for Xid errors in the kernel log)"
            )
            fresh, problem = await done
        if fresh is None:
            self._gpus_failing(problem or "no GPU found any more")
            return  # keep the last GPU list: the pools stay registered, only not ready
        fresh.cuda_version = self.gpus.cuda_version
        self.gpus = fresh
        if not self.gpus_healthy:
            log.info("GPU probe works again; GPU pools report ready")
        self.gpus_healthy = True

    async def _register(self, control: ControlPlane) -> float | None:
        """Register; the heartbeat interval in seconds, or None after a failure."""
        body = registration(self.settings, self.gpus, self.pools)
        answer = await control.register(body)
        if not answer.ok:
            self._trouble("registration", answer)
            return None
        self.node_timeout_ms = answer.body.node_timeout_ms
        self.generation = answer.body.generation
        interval_s = heartbeat_delay_s(answer.body.heartbeat_interval_ms, self.node_timeout_ms)
        self.heartbeat_s = interval_s
        again = "registered again" if self.registered_once else "registered"
        if self.state != HEARTBEAT_NOT_FOUND:  # that state ends with a heartbeat that works, not here
            self._enter(
                "online",
                f"{again} with {self.control_url} as node {self.settings.node_id} "
                f"({len(self.pools)} pools, {len(body.capabilities.gpus)} GPUs; heartbeat every "
                f"{interval_s * 1000:g} ms)",
            )
        self.registered_once = True
        return interval_s

    async def _heartbeat(self, control: ControlPlane) -> tuple[str, float | None]:
        """Send one heartbeat: ('ok', next interval s) | ('unknown', None) | ('failed', None) |
        ('unreachable', None) (failed on the way, see Answer.unreachable) | ('changed', None) when the
        control plane holds another registration than this agent's."""
        statuses = pool_statuses(
            self.pools,
            self.gpus,
            self.gpus_healthy,
            self.draining,
            self.manifest.available(),
            {pool_id: watch.reading() for pool_id, watch in self.engine_watches.items()},
        )
        answer = await control.heartbeat(self.settings.node_id, heartbeat(statuses))
        if answer.status == 404:
            return "unknown", None
        if not answer.ok:
            self._trouble("heartbeat", answer)
            return ("unreachable" if answer.unreachable else "failed"), None
        if self.state != "online":
            self._enter("online", f"control plane {self.control_url} back online")
        if answer.body.credential is not None:
            await self._renewed(answer.body.credential)
        if answer.body.generation and self.generation and answer.body.generation != self.generation:
            # Someone replaced the record (an admin, another replica restoring an older one): the control
            # plane no longer holds what this agent registered.
            log.warning(
                "control plane %s holds registration generation %s, not %s as registered; registering again",
                self.control_url,
                answer.body.generation,
                self.generation,
            )
            return "changed", None
        drain = answer.body.drain
        if drain != self.draining:
            log.info(
                "drain %s by the control plane: pools now report draining=%s",
                "requested" if drain else "lifted",
                str(drain).lower(),
            )
            self.draining = drain
        self.heartbeat_s = heartbeat_delay_s(answer.body.next_heartbeat_ms, self.node_timeout_ms)
        return "ok", self.heartbeat_s

    async def _back_off(self) -> None:
        delay = self.backoff.next_delay()
        log.debug("next try in %.3f s", delay)  # one line per retry, at debug level only
        await asyncio.sleep(delay)

    async def _paced_retry(self, tried_at: float, unreachable: bool) -> None:
        """After a failed heartbeat, the next try starts at the heartbeat's own pace (RETRY_PACE, or
        UNREACHABLE_RETRY_PACE when no way there was found), counted from `tried_at`, the monotonic time
        the failed one started.

        Not the registration's exponential backoff: after a control plane's restart that backoff brought
        the nodes whose heartbeats fell due meanwhile back together, 2-4x the steady rate, and the unlucky
        ones only after 10-15 s (docs/chaos.md). At the heartbeat's pace a returning control plane sees its
        steady rate, and every node is back within about one interval."""
        share = random.uniform(*(UNREACHABLE_RETRY_PACE if unreachable else RETRY_PACE))
        pace = (self.heartbeat_s or self.backoff.initial_s) * share
        delay = max(0.0, pace - (time.monotonic() - tried_at))
        log.debug("next heartbeat try in %.3f s", delay)
        await asyncio.sleep(delay)

    # -- identity (identity.py) ------------------------------------------------------------------------------

    async def _renewed(self, credential) -> None:
        """A renewed node token from a heartbeat answer: on disk first, then in use."""
        try:
            self.credentials.save_node_token(credential.node_token, credential.expires_at)
        except OSError as error:
            # The old token stays valid until its own expiry; the next heartbeat brings none, so the node
            # rejoins with its recovery token then. Better than using a token a restart would not find.
            log.error("could not store the renewed node token in %s: %s", self.settings.credential_dir, error)
            return
        control = self._control
        if control is not None:
            control.token = credential.node_token
        self.using_node_token = True
        log.info("node token renewed, valid until %s", credential.expires_at)

    async def _authenticate(self, control: ControlPlane) -> None:
        """Until the agent holds a secret worth presenting: its stored node token, a join with its
        recovery token or its join token, or the shared token_file token. IdentityError when a person
        must act (a CA pin that does not match ca_file)."""
        settings = self.settings
        while True:
            token = self.credentials.node_token(now())
            if token is not None:
                control.token, self.using_node_token, self.needs_credential = token, True, False
                return
            joined, unanswered = None, False
            for candidate in join_candidates(self.credentials, settings.join_token_file):
                if not candidate.recovery:
                    check_pin(candidate.secret, self.control_url, settings.ca_file, candidate.what)
                answer = await control.join(settings.node_id, candidate.secret.secret)
                if answer.ok:
                    joined = (candidate, answer.body)
                    break
                if answer.status in (401, 403):
                    self._enter(
                        f"join-refused:{candidate.what}",
                        f"control plane {self.control_url} refused the join of node {settings.node_id} "
                        f"with {candidate.what} ({answer.describe()})",
                        logging.ERROR,
                    )
                    if candidate.recovery:
                        self.credentials.forget_recovery_token()
                    continue
                self._trouble("join", answer)
                unanswered = True
                break  # no usable answer: the same order again after a pause
            if joined is not None:
                candidate, body = joined
                # On disk before use: a crash right after must not lose the only copy of either.
                self.credentials.save_recovery_token(body.recovery_token)
                self.credentials.save_node_token(body.node_token, body.expires_at)
                control.token, self.using_node_token, self.needs_credential = body.node_token, True, False
                log.info(
                    "joined %s as node %s with %s; node token valid until %s",
                    self.control_url,
                    settings.node_id,
                    candidate.what,
                    body.expires_at,
                )
                return
            if self._shared_token is not None and not unanswered:
                if settings.join_token_file is not None:
                    log.warning(
                        "no node credential works; falling back to the shared token_file %s",
                        settings.token_file,
                    )
                control.token, self.using_node_token, self.needs_credential = self._shared_token, False, False
                return
            await self._back_off()

    async def _loop(self, control: ControlPlane) -> None:
        interval: float | None = None
        beat_since_registering = False
        while True:
            if self.needs_credential:
                await self._authenticate(control)
                interval = None
            if interval is None:
                interval = await self._register(control)
                if interval is None:
                    await self._back_off()
                    continue
                beat_since_registering = False
            tried_at = time.monotonic()
            outcome, next_interval = await self._heartbeat(control)
            if outcome == "unknown" and not beat_since_registering:
                # Unknown right after registering: not a lost node but a control plane that takes
                # registrations and loses heartbeats (a proxy routing only some paths, a renamed route).
                # Registering again at once would hammer it: back off until a heartbeat works.
                self._enter(
                    HEARTBEAT_NOT_FOUND,
                    f"control plane {self.control_url} accepted the registration of node "
                    f"{self.settings.node_id} but answers its heartbeats with 404 (a proxy that routes only "
                    "some paths, or a renamed route?); registering again with backoff",
                    logging.ERROR,
                )
                interval = None
                await self._back_off()
                continue
            if outcome == "changed":
                self.state = "unregistered"
                interval = None
                continue
            if outcome == "unknown":
                log.warning(
                    "control plane %s does not know node %s (deleted by an operator or its database "
                    "was lost); registering again",
                    self.control_url,
                    self.settings.node_id,
                )
                self.state = "unregistered"
                interval = None
                continue
            if outcome in ("failed", "unreachable"):
                await self._paced_retry(tried_at, unreachable=outcome == "unreachable")
                continue
            beat_since_registering = True
            self.backoff.reset()  # only a heartbeat that works ends a run of retries
            interval = next_interval
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._beat_now.wait(), interval * random.uniform(*BEAT_JITTER))
            self._beat_now.clear()

    # -- the whole life -----------------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop.set)
        log.info(
            "pool-managerd starting: node %s, control plane %s, %d pools",
            self.settings.node_id,
            ", ".join(self.settings.control_urls),
            len(self.pools),
        )
        for warning in self.gpus.warnings if self.gpus else []:
            log.warning("nvidia-smi: %s", warning)
        async with ControlPlane(
            self.settings.control_urls,
            self._shared_token,
            self.settings.request_timeout_s,
            self.settings.ca_file,
        ) as control:
            self._control = control
            loop_task = asyncio.create_task(self._loop(control))
            tasks = [loop_task, asyncio.create_task(self._stop.wait())]
            if self.gpus is not None:
                tasks.append(asyncio.create_task(self._watch_gpus()))
            if self.engine_watches:
                # Off the heartbeat's path, as the GPU probe: heartbeats send the last reading.
                watching = watch_engines(
                    list(self.engine_watches.values()),
                    self._engine_key or "",
                    self.settings.engine_poll_interval_s,
                    self.settings.engine_timeout_s,
                    lambda: self.heartbeat_s,
                )
                tasks.append(asyncio.create_task(watching))
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            refused: IdentityError | None = None
            for task in tasks:
                task.cancel()
                # An exception other than the cancel is a bug, not an outage: it propagates and
                # systemd restarts the agent.
                with contextlib.suppress(asyncio.CancelledError):
                    try:
                        await task
                    except IdentityError as error:  # a person must act: no retry can help
                        refused = error
            if refused is not None:
                log.error("%s", refused)
                return EXIT_PERSON_MUST_ACT
            if self.settings.deregister_on_stop and self.registered_once:
                timeout = min(self.settings.request_timeout_s, DEREGISTER_TIMEOUT_S)
                answer = await control.deregister(self.settings.node_id, timeout)
                if answer.ok or answer.status == 404:
                    log.info("deregistered node %s from %s", self.settings.node_id, self.control_url)
                else:
                    log.warning("could not deregister node %s: %s", self.settings.node_id, answer.describe())
        log.info("pool-managerd stopped")
        return 0

"""The client endpoint: /v1/models, /v1/chat/completions and /v1/completions, passed through to the
engines of the pools (docs/gateway.md says how and why).

The request body goes to the engine as the bytes that came; only `model` and `stream` are read from it.
The answer comes back as the engine's bytes, streamed, never re-encoded. Nothing reaches the client until
the commit point: the engine's first real token (sse.py) or, not streaming, its status line below 500.
Before it a failure (refused, 5xx, a timeout, a stream that ends) is tried once more on another pool,
silently; after it nothing is retried, and a broken stream ends with one defined SSE error event.
A node that goes offline (the registry's sweep) fails its requests in flight at once, by the same rule.

Right after a restart the registry cannot yet say a model is unknown: the nodes restored from the store
have not heartbeated. Until node_timeout_ms has passed, and after it while a restored node that held the
model is still silent, a model no live node serves is `503 warming_up`, never `404 model_not_found`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator

import aiohttp
import msgspec
from aiohttp import web

from .config import Settings
from .connections import ConnectionGuard
from .contract import valid_model_id
from .engine_keys import EngineKeyMissing, EngineKeys
from .metrics import UNKNOWN_MODEL, Metrics
from .openai_errors import CLIENT, GatewayError, error_bytes, invalid_request, server_error
from .recent_errors import RecentErrors
from .registry import Registry
from .routing import QueueRefused, RoutePool
from .sse import CommitScanner

log = logging.getLogger(__name__)

EVENT_STREAM = "text/event-stream"
ENGINE_KEEPALIVE_S = 4.0  # below llama-server's own 5 s, so the engine never closes one under a request
USER_AGENT = "orchestratord"  # what engines see; never aiohttp's version
# The idle timer is moved only when it falls outside [last chunk + idle, that + slack]: once per slack, not
# once per token (a reschedule costs about 1.7 us; a check 0.2). It fires at most this late.
IDLE_SLACK_MAX_S = 0.5
RETRY_AFTER_S = 1  # a slot frees within about a request's time; clients back off from there
BROKEN_STREAM_EVENT = (
    b"data: "
    + error_bytes(
        "server_error", "engine_stream_broken", "the engine's answer broke off; nothing was retried"
    )
    + b"\n\n"
)


class RequestHead(msgspec.Struct):
    """All the gateway reads of a client's body; every other field goes to the engine untouched."""

    model: str
    stream: bool = False


_decode_head = msgspec.json.Decoder(RequestHead).decode


class ModelEntry(msgspec.Struct):
    id: str
    object: str = "model"
    created: int = 0
    owned_by: str = "llorch"


class ModelList(msgspec.Struct):
    data: list[ModelEntry]
    object: str = "list"


class _PassThrough(web.StreamResponse):
    """An answer whose headers wait for its first bytes, as aiohttp's own Response's do; only for bytes
    already in hand, written right after prepare()."""

    _send_headers_immediately = False


class _Failed(Exception):
    """An attempt failed before the commit point: another pool may be tried."""

    def __init__(self, code: str, message: str, timed_out: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.timed_out = timed_out


class _NodeLost(Exception):
    """The engine's node went offline under the request (RoutingTable.drop_node cancelled it)."""


class Gateway:
    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        engine_keys: EngineKeys,
        metrics: Metrics | None,
        recent_errors: RecentErrors,
        connections: ConnectionGuard,
    ) -> None:
        self.registry = registry
        self.routes = registry.routes
        self.engine_keys = engine_keys
        self.stats = None if metrics is None else metrics.gateway
        self.recent_errors = recent_errors
        self.connections = connections
        self.max_body_bytes = settings.max_body_bytes
        self.queue_timeout_s = settings.gateway_queue_timeout_ms / 1000
        self.connect_timeout_s = settings.gateway_connect_timeout_ms / 1000
        self.first_byte_timeout_s = settings.gateway_first_byte_timeout_ms / 1000
        self.idle_timeout_s = settings.gateway_idle_timeout_ms / 1000
        self.idle_slack_s = min(self.idle_timeout_s / 16, IDLE_SLACK_MAX_S)
        self.session: aiohttp.ClientSession | None = None
        self.fresh_session: aiohttp.ClientSession | None = None
        # The warm-up after a start (see the module's docstring): the registry's clock at start, and the
        # contact time each restored node had then (a heartbeat or a registration moves it).
        self.started: float | None = None
        self.restored_contact: dict[str, float] = {}
        self.restarted = False  # the store held nodes: a cluster this daemon served before its start
        self.warm_up_retry_after_s = max(1, math.ceil(settings.heartbeat_interval_ms / 1000))

    async def session_context(self, app: web.Application) -> AsyncIterator[None]:
        """One client session for every engine: keep-alive connections, no limit but the engines' own."""
        # Runs after the registry loaded the store (app.py's cleanup_ctx order) and before the daemon
        # listens, so no heartbeat has moved a restored node yet.
        self.started = self.registry.clock()
        self.restored_contact = {node_id: node.last_contact for node_id, node in self.registry.nodes.items()}
        self.restarted = bool(self.restored_contact)
        # Idle connections are dropped before the engine drops them: llama-server (cpp-httplib) closes an
        # idle kept-alive connection after 5 s, and a request sent on one it just closed fails unsent.
        connector = aiohttp.TCPConnector(
            limit=0, limit_per_host=0, keepalive_timeout=ENGINE_KEEPALIVE_S, ttl_dns_cache=60
        )
        timeout = aiohttp.ClientTimeout(
            total=None, connect=self.connect_timeout_s, sock_connect=self.connect_timeout_s
        )
        # A User-Agent of our own rather than skip_auto_headers=("User-Agent",), which keeps aiohttp's
        # version from the engines as well but makes aiohttp build two header dicts per request (about
        # 1.5% of the daemon's time per request, py-spy, bench/gateway.py part 1).
        self.session = aiohttp.ClientSession(
            connector=connector,
            timeout=timeout,
            auto_decompress=False,
            headers={"User-Agent": USER_AGENT},
        )
        # For the one resend after an engine closed a pooled connection under a request: always a new
        # connection, never another pooled one that may be just as closed.
        self.fresh_session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True, ttl_dns_cache=60),
            timeout=timeout,
            auto_decompress=False,
            headers={"User-Agent": USER_AGENT},
        )
        yield
        await self.session.close()
        await self.fresh_session.close()

    # --- /v1/models

    def models(self) -> bytes:
        registry = self.registry
        registry.settle()
        now = registry.clock()
        served = sorted(
            model
            for model, node_ids in registry.served_nodes.items()
            if any(self._serves_now(node_id, model, now) for node_id in node_ids)
        )
        return msgspec.json.encode(ModelList(data=[ModelEntry(id=model) for model in served]))

    def _serves_now(self, node_id: str, model: str, now: float) -> bool:
        from .views import serves_now  # the catalog's rule of "serves now"

        node = self.registry.nodes.get(node_id)
        if node is None or node.drain or not self.registry.is_live(node, now):
            return False
        return any(
            pool.engine is not None and pool.engine.model_id == model and serves_now(pool)
            for pool in node.pools or ()
        )

    # --- /v1/chat/completions, /v1/completions

    async def forward(self, request: web.Request, path: str) -> web.StreamResponse:
        started = time.perf_counter()
        label = UNKNOWN_MODEL
        outcome = "invalid"
        try:
            body = await self._read_body(request)
            head = self._head(body)
            model = head.model
            self.registry.settle()  # the served models below must be current
            if model in self.registry.served_nodes:
                label = model
            response, outcome = await self._serve(request, path, body, model, label, started)
            return response
        except GatewayError as exc:
            outcome = exc.code
            return exc.response()
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            if self.stats is not None:
                self.stats.finished(label, outcome, time.perf_counter() - started)

    async def _read_body(self, request: web.Request) -> bytes:
        length = request.content_length
        if length is not None and length > self.max_body_bytes:
            raise _too_large(self.max_body_bytes)
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise _too_large(self.max_body_bytes) from None

    def _head(self, body: bytes) -> RequestHead:
        try:
            head = _decode_head(body)
        except msgspec.ValidationError as exc:
            raise invalid_request("invalid_params", f"invalid request: {exc}") from None
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise invalid_request("invalid_json", f"the body is not valid JSON: {exc}") from None
        if not valid_model_id(head.model):
            raise invalid_request(
                "invalid_params", "invalid request: `model` is not a model id - at `$.model`"
            )
        return head

    async def _serve(
        self, request: web.Request, path: str, body: bytes, model: str, label: str, started: float
    ) -> tuple[web.StreamResponse, str]:
        registry, routes = self.registry, self.routes
        registry.settle()
        now = registry.clock()
        pool = routes.pick(model, now)
        if pool is None:
            pool = await self._wait_for_slot(request, model, label, now)
        task = asyncio.current_task()
        assert task is not None
        # aiohttp does not cancel a handler whose client left; the guard does, for this request's time.
        self.connections.watch(request.protocol, task.cancel)
        try:
            try:
                return await self._attempt(request, path, body, pool, label, started)
            except _Failed as first:
                self._note_failure(pool, model, first)
                routes.release(pool)
                retry = routes.pick(model, registry.clock(), exclude=pool.key)
                if retry is None:
                    pool = None
                    raise self._final(model, first) from None
                pool = retry
                if self.stats is not None:
                    self.stats.retries += 1
                try:
                    return await self._attempt(request, path, body, pool, label, started)
                except _Failed as second:
                    self._note_failure(pool, model, second)
                    raise self._final(model, second) from None
        finally:
            self.connections.unwatch(request.protocol)
            if pool is not None:
                routes.release(pool)

    async def _wait_for_slot(self, request: web.Request, model: str, label: str, now: float) -> RoutePool:
        routes = self.routes
        if not routes.routable(model, now):
            if not self._set_up_for(model, now):
                if self._warming_up(model, now):
                    raise self._refuse(
                        model,
                        server_error(
                            503,
                            "warming_up",
                            f"{model!r} is not served yet: orchestratord restarted and the nodes that "
                            "may serve it have not all reported since",
                            self.warm_up_retry_after_s,
                        ),
                    )
                raise self._refuse(
                    model, invalid_request("model_not_found", f"no engine serves model {model!r}", 404)
                )
            raise self._refuse(
                model,
                server_error(
                    503,
                    "no_capacity",
                    f"no engine serving {model!r} takes requests now (loading, dead, drained or set aside)",
                    RETRY_AFTER_S,
                ),
            )
        client = request[CLIENT]
        try:
            future = routes.enqueue(model, client)
        except QueueRefused as exc:
            if exc.over_share:
                raise self._refuse(
                    model,
                    GatewayError(
                        429,
                        "rate_limit_error",
                        "key_over_share",
                        f"the queue for {model!r} is full and this key holds its share of it",
                        RETRY_AFTER_S,
                    ),
                ) from None
            raise self._refuse(
                model, server_error(503, "queue_full", f"the queue for {model!r} is full", RETRY_AFTER_S)
            ) from None
        task = asyncio.current_task()
        assert task is not None
        waited_from = time.perf_counter()
        self.connections.watch(request.protocol, task.cancel)  # a client that leaves leaves the queue
        try:
            async with asyncio.timeout(self.queue_timeout_s):
                pool = await future
        except TimeoutError:
            routes.leave(model, client, future)
            raise self._refuse(
                model,
                server_error(
                    503, "queue_timeout", f"no slot for {model!r} within the queue timeout", RETRY_AFTER_S
                ),
            ) from None
        except BaseException:
            routes.leave(model, client, future)
            raise
        finally:
            self.connections.unwatch(request.protocol)
            if self.stats is not None:
                self.stats.waited(label, time.perf_counter() - waited_from)
        return pool

    def _set_up_for(self, model: str, now: float) -> bool:
        registry = self.registry
        for node_id in registry.served_nodes.get(model, ()):
            node = registry.nodes.get(node_id)
            if node is not None and registry.is_live(node, now):
                return True
        return False

    def _warming_up(self, model: str, now: float) -> bool:
        """Whether the registry may not know yet who serves `model`: within node_timeout_ms of a start
        that restored nodes (any node live before it reports within that), or while a restored node that
        served or staged `model` has sent nothing since. A daemon that starts on an empty store has no
        cluster to wait for: its unknown models are 404 from the first request."""
        if self.started is None or not self.restarted:
            return False
        registry = self.registry
        if now - self.started < registry.node_timeout_s:
            return True
        # Only the model's holders are looked at: the cost is theirs, not the cluster's. A node that
        # registered or heartbeated since has a newer contact time; the registry knows what it holds now.
        restored = self.restored_contact
        for holders in (registry.served_nodes.get(model, ()), registry.model_nodes.get(model, ())):
            for node_id in holders:
                contact = restored.get(node_id)
                node = registry.nodes.get(node_id)
                if contact is not None and node is not None and node.last_contact == contact:
                    return True
        return False

    def _refuse(self, model: str, error: GatewayError) -> GatewayError:
        self.recent_errors.record("gateway", model, error.code, error.message)
        return error

    def _note_failure(self, pool: RoutePool, model: str, failure: _Failed) -> None:
        message = f"pool {pool.label}: {failure.message}"
        self.recent_errors.record("gateway", model, failure.code, message)
        if self.routes.failed(pool):
            log.warning("pool %s set aside until its node's next heartbeat: %s", pool.label, failure.message)

    def _final(self, model: str, failure: _Failed) -> GatewayError:
        if failure.timed_out:
            error = server_error(504, "engine_timeout", f"no engine serving {model!r} answered in time")
        else:
            error = server_error(502, "engine_unavailable", f"no engine serving {model!r} could answer")
        return self._refuse(model, error)

    # --- one attempt on one pool

    async def _attempt(
        self, request: web.Request, path: str, body: bytes, pool: RoutePool, label: str, started: float
    ) -> tuple[web.StreamResponse, str]:
        loop = asyncio.get_running_loop()
        first_byte_deadline = loop.time() + self.first_byte_timeout_s
        task = asyncio.current_task()
        assert task is not None
        routes, node_id = self.routes, pool.key[0]
        call = routes.calling(node_id, task)  # cancelled, `lost`, should the node go offline under it
        committed = False
        reading_engine = True  # after the commit point, an error while writing is the client's going
        engine: aiohttp.ClientResponse | None = None
        client: web.StreamResponse | None = None
        try:
            # A pool handed to a queued request may have lost its node before the request ran: the sweep
            # that dropped the node is past, and would not cut this call off.
            if not self.registry.is_live(pool.node, self.registry.clock()):
                raise _Failed("node_lost", f"its node {node_id} went offline before the request was sent")
            async with asyncio.timeout_at(first_byte_deadline) as timer:
                engine = await self._send(pool, path, body)
                status = engine.status
                if status >= 500:
                    raise _Failed("engine_error", f"the engine answered {status}")
                held: list[bytes] = []
                streaming = status < 400 and engine.content_type == EVENT_STREAM
                if streaming:
                    held = await self._until_commit(engine, timer, first_byte_deadline)
                committed = True
                self.routes.succeeded(pool)
                if self.stats is not None:
                    self.stats.committed(label, time.perf_counter() - started)
                # Headers go out with the first bytes (one write, not two) when those bytes are in hand: a
                # stream's held preamble, a whole plain answer. A plain answer still coming gets its status
                # line at once, as before: a client must see a cut-off answer as begun (200) and cut off.
                whole = streaming or engine.content.is_eof()
                client = _PassThrough(status=status) if whole else web.StreamResponse(status=status)
                # The engine's header as it came: aiohttp must not add a charset of its own.
                client.headers["Content-Type"] = engine.headers.get("Content-Type", engine.content_type)
                if not streaming and engine.content_length is not None:
                    client.content_length = engine.content_length
                reading_engine = False
                await client.prepare(request)
                content = engine.content
                idle_s, slack_s = self.idle_timeout_s, self.idle_slack_s
                # Bytes in hand go out at once, as one write: the held preamble with the headers; the
                # answer's last bytes, once the engine's answer has ended, with the end of the answer.
                data = b"".join(held)
                while not content.at_eof():
                    if data:
                        await client.write(data)
                    now = loop.time()
                    _keep_deadline(timer, now + idle_s, now + idle_s + slack_s)
                    reading_engine = True
                    data = await content.readany()
                    reading_engine = False
                    if not data:
                        break
                timer.reschedule(None)
            reading_engine = False
            await client.write_eof(data)
            engine.release()
            engine = None
            return client, "ok" if status < 400 else "engine_4xx"
        except _Failed:
            raise
        except asyncio.CancelledError:
            routes.call_ended(node_id, call)  # before any await: a later offline must not cancel again
            if not call.lost or task.uncancel():
                raise  # the client left, or the daemon stops: nothing to answer
            return await self._node_lost(request, client, pool, label, committed), "stream_broken"
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            routes.call_ended(node_id, call)  # before any await, as above
            if not committed:
                # A connect timeout is an engine that cannot be reached, not a slow one.
                timed_out = isinstance(exc, TimeoutError) and not isinstance(
                    exc, aiohttp.ConnectionTimeoutError
                )
                what = "timed out" if timed_out else f"failed: {_describe(exc)}"
                raise _Failed(
                    "engine_timeout" if timed_out else "engine_unavailable", what, timed_out
                ) from None
            if not reading_engine:  # the client went away: nothing to tell it, nothing against the pool
                assert client is not None
                return client, "cancelled"
            return await self._broken(request, client, pool, label, exc), "stream_broken"
        finally:
            routes.call_ended(node_id, call)
            if engine is not None:
                engine.close()  # drops the engine's connection: llama-server stops the slot's work

    async def _node_lost(
        self,
        request: web.Request,
        client: web.StreamResponse | None,
        pool: RoutePool,
        label: str,
        committed: bool,
    ) -> web.StreamResponse:
        """The pool's node went offline under the attempt: before the commit point another pool may take
        it (_Failed), after it the answer ends as a broken one does."""
        if self.stats is not None:
            self.stats.node_lost["after_commit" if committed else "before_commit"] += 1
        lost = _NodeLost(f"its node {pool.key[0]} went offline")
        if not committed:
            raise _Failed("node_lost", str(lost)) from None
        return await self._broken(request, client, pool, label, lost)

    async def _send(self, pool: RoutePool, path: str, body: bytes) -> aiohttp.ClientResponse:
        assert self.session is not None
        node_id = pool.key[0]
        try:
            key_headers = self.engine_keys.headers_for(node_id)
        except EngineKeyMissing as exc:
            raise _Failed("engine_key_missing", str(exc)) from None
        # No `Connection: close` for streams, though llama-server closes the connection after each streamed
        # answer while answering Keep-Alive: a request that takes such a connection from the pool fails
        # unsent and goes once more on a new one (_post), which costs what a new connection every time
        # would, while engines that keep their connections keep them (bench/gateway.py part 1: a new
        # connection per request halved the daemon's capacity).
        headers = key_headers
        engine = await self._post(pool.url + path, body, headers)
        # Never the client's fault (it passed the gateway's own check): an engine 401 is a key out of step.
        if engine.status == 401:
            if self.engine_keys.keys_dir is not None:
                # A rotated key: read it again and send once more when it changed.
                try:
                    fresh = self.engine_keys.forget(node_id)
                except EngineKeyMissing as exc:
                    engine.close()
                    raise _Failed("engine_key_missing", str(exc)) from None
                if fresh != key_headers:
                    engine.close()
                    engine = await self._post(pool.url + path, body, fresh)
            if engine.status == 401:
                engine.close()
                raise _Failed("engine_unauthorized", "the engine refused the node's engine key (401)")
        return engine

    async def _post(self, url: str, body: bytes, headers: dict[str, str]) -> aiohttp.ClientResponse:
        assert self.session is not None and self.fresh_session is not None
        try:
            return await self.session.post(url, data=body, headers=headers)
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            if isinstance(exc, aiohttp.ClientConnectorError):
                raise  # no connection at all (refused, unreachable): the engine's failure
            # A kept-alive connection the engine closed as the request went out (llama-server closes idle
            # ones after 5 s): the request never reached it. Once more on the same pool, on a new
            # connection; a second failure is the engine's, as any other.
            if self.stats is not None:
                self.stats.resends += 1
            return await self.fresh_session.post(url, data=body, headers=headers)

    async def _until_commit(
        self, engine: aiohttp.ClientResponse, timer: asyncio.Timeout, first_byte_deadline: float
    ) -> list[bytes]:
        """The engine's bytes up to and including the commit point, read as they come."""
        loop = asyncio.get_running_loop()
        scanner = CommitScanner()
        held: list[bytes] = []
        content = engine.content
        idle_s, slack_s = self.idle_timeout_s, self.idle_slack_s
        while True:
            now = loop.time()
            _keep_deadline(
                timer,
                min(first_byte_deadline, now + idle_s),
                min(first_byte_deadline, now + idle_s + slack_s),
            )
            chunk = await content.readany()
            if not chunk:
                raise _Failed("engine_unavailable", "the engine's stream ended before its first token")
            held.append(chunk)
            if scanner.feed(chunk):
                return held

    async def _broken(
        self,
        request: web.Request,
        client: web.StreamResponse | None,
        pool: RoutePool,
        label: str,
        exc: BaseException,
    ) -> web.StreamResponse:
        """After the commit point: end a stream with the one error event; a plain answer is cut off."""
        self.recent_errors.record(
            "gateway",
            label,
            "engine_stream_broken",
            f"pool {pool.label}: the answer broke off: {_describe(exc)}",
        )
        self.routes.failed(pool)
        if client is None:  # cannot happen: committed means prepared; kept safe
            raise server_error(502, "engine_unavailable", "the engine's answer broke off")
        if client.content_type == EVENT_STREAM:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await client.write(BROKEN_STREAM_EVENT)
                await client.write_eof()
        elif request.transport is not None:
            self.connections.unwatch(request.protocol)  # this close is ours, not the client leaving
            request.transport.close()  # the client sees a cut-off body, never a complete-looking one
        return client


def _keep_deadline(timer: asyncio.Timeout, earliest: float, latest: float) -> None:
    """Have the timer fire between `earliest` and `latest`, moving it (to `latest`) only when it is not."""
    when = timer.when()
    if when is None or not earliest <= when <= latest:
        timer.reschedule(latest)


def _too_large(limit: int) -> GatewayError:
    return GatewayError(
        413, "invalid_request_error", "payload_too_large", f"the body is larger than {limit} bytes"
    )


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

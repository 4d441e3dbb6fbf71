"""The control plane's HTTP API as the agent uses it: register, heartbeat, deregister. Never raises.

The agent does not trust what comes back: it reads at most MAX_ANSWER_BYTES (a huge answer once grew it to
gigabytes, again at every retry), decodes answers with the contract's structs (strictly: "false" is not
false), and follows no redirect (its registration must not travel to a host it was not configured with).
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgspec

from .contract import shown
from .control_urls import ControlUrls
from .wire import Heartbeat, HeartbeatAnswer, JoinAnswer, JoinRequest, RegisterAnswer, Registration

# orchestratord's answers are a few hundred bytes; an error envelope is under 1 KiB.
MAX_ANSWER_BYTES = 64 * 1024
JSON = {"Content-Type": "application/json"}
# A connect that failed on the way (no route to the network or host, the kernel's own connect timeout), not
# at a host that refused it.
UNREACHABLE_ERRNOS = frozenset({errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ETIMEDOUT})

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Answer:
    """What came back: an HTTP status and the decoded body, or why nothing usable came.

    status None: no HTTP answer at all (refused, timed out, cut off, or a TLS certificate the agent does not
    trust: `untrusted_certificate`). A status with a `problem`: an answer the agent cannot use (too large,
    not the contract's shape, a redirect it will not follow).
    """

    status: int | None
    body: Any = None
    problem: str = ""
    untrusted_certificate: bool = False
    # No answer because the way there failed (no route, no reply within the timeout), as opposed to a
    # reachable host refusing or answering: the agent retries these sooner (agent.py RETRY_PACE).
    unreachable: bool = False

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300 and not self.problem

    def describe(self) -> str:
        if self.status is None:
            return self.problem
        if self.problem:
            return f"HTTP {self.status}, {self.problem}"
        if isinstance(self.body, dict) and isinstance(self.body.get("code"), str):
            message = self.body.get("message")
            return f"HTTP {self.status} {shown(self.body['code'])}: {shown(str(message or ''), 200)}"
        return f"HTTP {self.status}"


class TooLarge(Exception):
    """An answer over the reader's limit (announced or arrived); the message says the limit."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"an answer over {limit} bytes")


async def read_bounded(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body, or TooLarge as soon as more than `limit` bytes arrived (or were announced). The one
    bounded reader of the agent's HTTP answers: orchestratord's and its engines'."""
    if response.content_length is not None and response.content_length > limit:
        raise TooLarge(limit)
    body = bytearray()
    while True:
        chunk = await response.content.read(limit + 1 - len(body))
        if not chunk:
            return bytes(body)
        body += chunk
        if len(body) > limit:
            raise TooLarge(limit)


def _decoded(status: int, raw: bytes, answer_type: type | None) -> Answer:
    if 200 <= status < 300 and answer_type is not None:
        try:
            return Answer(status, msgspec.json.decode(raw, type=answer_type))
        except msgspec.DecodeError as error:  # ValidationError too: the body is not the contract's
            return Answer(
                status, problem=f"an answer that is not a {answer_type.__name__}: {shown(str(error), 160)}"
            )
    try:
        payload = json.loads(raw) if raw else None
    except ValueError:
        payload = None
    return Answer(status, payload)


class CaTrust:
    """ca_file as an SSL context, rebuilt when the file changes (another inode, size or mtime: a rotation
    writes a new bundle by rename). One os.stat per request is the whole cost while nothing changes.

    A file that cannot be loaded any more (removed, half-written by hand) keeps the context built last, with
    one ERROR line per change: the agent goes on trusting what worked rather than nothing."""

    def __init__(self, ca_file: str) -> None:
        self.ca_file = ca_file
        self.context: ssl.SSLContext | None = None
        self._seen: tuple[int, int, int, int] | None = None

    def _identity(self) -> tuple[int, int, int, int] | None:
        try:
            info = os.stat(self.ca_file)
        except OSError:
            return None
        return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)

    def load(self) -> ssl.SSLContext:
        """Build the context now; ssl's errors (OSError, SSLError) reach the caller."""
        seen = self._identity()
        self.context = ssl.create_default_context(cafile=self.ca_file)
        self._seen = seen
        return self.context

    def current(self) -> ssl.SSLContext:
        seen = self._identity()
        if self.context is not None and seen == self._seen:
            return self.context
        previous = self.context
        try:
            self.load()
        except (OSError, ssl.SSLError, ValueError) as error:
            self._seen = seen  # one line per change of the file, not one per request
            if previous is None:
                raise
            log.error(
                "ca_file %s changed but cannot be loaded (%s); still trusting its previous content",
                self.ca_file,
                error,
            )
            return previous
        if previous is not None:
            log.info("ca_file %s changed: new connections trust what it holds now", self.ca_file)
        assert self.context is not None
        return self.context


class ControlPlane:
    """One HTTP session to orchestratord; every request has a total timeout and follows no redirect.

    `base_url` is one URL or the list of the control plane's replicas (control_urls): a request that gets no
    HTTP answer moves on to the next URL (see control_urls.py), one that gets any HTTP answer stays.
    """

    def __init__(
        self, base_url: str | Sequence[str], token: str | None, timeout_s: float, ca_file: str | None = None
    ):
        self.urls = ControlUrls((base_url,) if isinstance(base_url, str) else base_url)
        # The secret presented on every request; the agent replaces it when it joins or a renewed node
        # token arrives (identity.py), so it is sent per request, not fixed in the session.
        self.token = token
        self._timeout_s = timeout_s
        self._ca_file = ca_file
        self._session: aiohttp.ClientSession | None = None
        # The trust built from ca_file, and what the file was when it was built (CaTrust): a rotation
        # rewrites the file and the next request trusts what it holds now, with no restart.
        self._trust = CaTrust(ca_file) if ca_file else None

    async def __aenter__(self) -> ControlPlane:
        if self._trust is not None:
            self._trust.load()  # at start a ca_file that cannot be read is the caller's error, as before
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._timeout_s),
            # Uncompressed only: a small compressed answer must not inflate past the bound in one chunk.
            headers={"Accept-Encoding": "identity"},
            auto_decompress=False,
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def base_url(self) -> str:
        """The URL in use now: the one that answered last, or the next to try."""
        return self.urls.current

    async def request(
        self,
        method: str,
        path: str,
        body: msgspec.Struct | None = None,
        answer_type: type | None = None,
        timeout_s: float | None = None,
        token: str | None = None,
    ) -> Answer:
        """One call; with several URLs, each is tried at most once, from the current one on, until one gives
        an HTTP answer. No answer from any: the last URL's failure (the caller backs off)."""
        self.urls.start_round()
        while True:
            url = self.urls.current
            answer = await self._request_once(url, method, path, body, answer_type, timeout_s, token)
            if answer.status is not None:
                if self.urls.answered() and len(self.urls.urls) > 1:
                    log.info("control plane %s (%s) answers again", url, self.urls.position)
                return answer
            moved_to = self.urls.failed()
            if moved_to is None or self.urls.all_failed:
                return answer
            # One line per switch; during an outage of every URL, the retries' switches only at debug.
            log.log(
                logging.DEBUG if self.urls.outage else logging.INFO,
                "control plane %s gave no answer (%s); switching to %s (%s)",
                url,
                answer.problem,
                moved_to,
                self.urls.position,
            )
            await asyncio.sleep(self.urls.switch_pause_s())

    async def _request_once(
        self,
        url: str,
        method: str,
        path: str,
        body: msgspec.Struct | None,
        answer_type: type | None,
        timeout_s: float | None,
        token: str | None,
    ) -> Answer:
        assert self._session is not None, "use ControlPlane as an async context manager"
        timeout = aiohttp.ClientTimeout(total=timeout_s or self._timeout_s)
        headers = {"Authorization": f"Bearer {token or self.token}"}
        if body is not None:
            headers.update(JSON)
        # Per request: aiohttp pools connections by their SSL context, so keep-alive connections opened with
        # the previous trust finish on it and every new one is verified with what ca_file holds now.
        ssl_context = self._trust.current() if self._trust is not None else True
        try:
            async with self._session.request(
                method,
                url + path,
                data=None if body is None else msgspec.json.encode(body),
                headers=headers,
                timeout=timeout,
                allow_redirects=False,
                ssl=ssl_context,
            ) as response:
                if 300 <= response.status < 400:
                    where = response.headers.get("Location", "")
                    return Answer(
                        response.status,
                        problem=f"a redirect to {shown(where.split('?', 1)[0], 80)} (not followed: set "
                        "control_url to the address that answers)",
                    )
                if response.headers.get("Content-Encoding", "identity").lower() != "identity":
                    return Answer(response.status, problem="a compressed answer (not asked for)")
                try:
                    raw = await read_bounded(response, MAX_ANSWER_BYTES)
                except TooLarge as error:
                    return Answer(response.status, problem=str(error))
                return _decoded(response.status, raw, answer_type)
        except TimeoutError:
            return Answer(None, problem=f"no answer within {timeout.total:g} s", unreachable=True)
        except aiohttp.ClientConnectorCertificateError as error:
            # Caught before its base class ClientConnectorError: a setup problem (ca_file), not an outage,
            # said apart so that the log can name the fix.
            failure = error.certificate_error
            reason = getattr(failure, "verify_message", None) or str(failure)
            return Answer(
                None, problem=f"certificate not trusted: {shown(reason, 160)}", untrusted_certificate=True
            )
        except aiohttp.ClientConnectorError as error:
            return Answer(
                None,
                problem=f"cannot connect ({error.os_error.strerror or error.os_error})",
                unreachable=error.os_error.errno in UNREACHABLE_ERRNOS,
            )
        except (aiohttp.ClientError, OSError, ValueError) as error:
            return Answer(None, problem=f"{type(error).__name__}: {error}".rstrip(": "))

    async def register(self, body: Registration) -> Answer:
        return await self.request("POST", "/v2/nodes/register", body, RegisterAnswer)

    async def heartbeat(self, node_id: str, body: Heartbeat) -> Answer:
        return await self.request("POST", f"/v2/nodes/{node_id}/heartbeat", body, HeartbeatAnswer)

    async def join(self, node_id: str, secret: str) -> Answer:
        """Trade a join or recovery secret for this node's own credential (JoinAnswer)."""
        return await self.request("POST", "/v2/join", JoinRequest(node_id=node_id), JoinAnswer, token=secret)

    async def deregister(self, node_id: str, timeout_s: float) -> Answer:
        return await self.request("DELETE", f"/v2/nodes/{node_id}", timeout_s=timeout_s)

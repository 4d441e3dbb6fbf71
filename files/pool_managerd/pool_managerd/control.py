"""The control plane's HTTP API as the agent uses it: register, heartbeat, deregister. Never raises."""

from __future__ import annotations

import json
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

from .wire import Heartbeat, Registration

JSON = {"Content-Type": "application/json"}


@dataclass(frozen=True)
class Answer:
    """What came back: an HTTP status and JSON body, or status None and why nothing usable came."""

    status: int | None
    body: Any = None
    problem: str = ""

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    def describe(self) -> str:
        if self.status is None:
            return self.problem
        if isinstance(self.body, dict) and "code" in self.body:
            return f"HTTP {self.status} {self.body.get('code')}: {self.body.get('message', '')}"
        return f"HTTP {self.status}"


class ControlPlane:
    """One HTTP session to orchestratord; every request has a total timeout."""

    def __init__(self, base_url: str, token: str, timeout_s: float, ca_file: Path | None = None):
        self.base_url = base_url
        self._token = token
        self._timeout_s = timeout_s
        self._ca_file = ca_file
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> ControlPlane:
        ssl_context = ssl.create_default_context(cafile=str(self._ca_file)) if self._ca_file else None
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._timeout_s),
            headers={"Authorization": f"Bearer {self._token}"},
            connector=aiohttp.TCPConnector(ssl=ssl_context) if ssl_context else aiohttp.TCPConnector(),
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def request(
        self, method: str, path: str, body: msgspec.Struct | None = None, timeout_s: float | None = None
    ) -> Answer:
        assert self._session is not None, "use ControlPlane as an async context manager"
        timeout = aiohttp.ClientTimeout(total=timeout_s or self._timeout_s)
        try:
            async with self._session.request(
                method,
                self.base_url + path,
                data=None if body is None else msgspec.json.encode(body),
                headers=None if body is None else JSON,
                timeout=timeout,
            ) as response:
                text = await response.text()
                try:
                    payload = json.loads(text) if text else None
                except ValueError:
                    payload = None
                return Answer(response.status, payload)
        except TimeoutError:
            return Answer(None, problem=f"no answer within {timeout.total:g} s")
        except aiohttp.ClientConnectorError as error:
            return Answer(None, problem=f"cannot connect ({error.os_error.strerror or error.os_error})")
        except (aiohttp.ClientError, OSError, ValueError) as error:
            return Answer(None, problem=f"{type(error).__name__}: {error}".rstrip(": "))

    async def register(self, body: Registration) -> Answer:
        return await self.request("POST", "/v2/nodes/register", body)

    async def heartbeat(self, node_id: str, body: Heartbeat) -> Answer:
        return await self.request("POST", f"/v2/nodes/{node_id}/heartbeat", body)

    async def deregister(self, node_id: str, timeout_s: float) -> Answer:
        return await self.request("DELETE", f"/v2/nodes/{node_id}", timeout_s=timeout_s)

# Copyright: llorch-kit contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The one client for the orchestratord registry, shared by the inventory plugin and every module.

It sits on Ansible's own ``open_url`` so that proxies, CA bundles and ``validate_certs`` behave as
Ansible users expect, and it has one error path: every failure becomes an ``LlorchApiError`` whose
message names the registry URL and what went wrong. No message ever contains the token.

Modules build it with ``LlorchClient.from_module(module)``; the inventory plugin, which has no
AnsibleModule, with ``LlorchClient.from_options(plugin.get_option)``.

The url may list several orchestratord replicas (a list, or one comma-separated string such as
``LLORCH_URL=https://ctl-1:9200,https://ctl-2:9200``). A call goes to the URL that answered last (the first
at the start) and moves to the next only when that URL gives no HTTP answer at all (refused, timed out,
cut off, a TLS failure). Any HTTP answer, a 404 or a 503 included, is the registry speaking: another replica
on the same database would say the same, so it is returned, never retried elsewhere.
"""

from __future__ import annotations

import errno
import http.client
import json
import os
import socket
import ssl
import time
from datetime import UTC, datetime
from urllib.error import HTTPError, URLError
from urllib.parse import quote

from ansible.module_utils.basic import env_fallback
from ansible_collections.llorch.kit.plugins.module_utils.llorch_contract import (
    ENGINE_SERVING_STATES,
    SecretFileError,
    read_secret_file,
)

# The options every llorch module takes; documented once in plugins/doc_fragments/llorch.py.
LLORCH_ARGUMENT_SPEC = {
    # A list: Ansible splits a comma-separated string (the environment's form) into one.
    "url": {"type": "list", "elements": "str", "fallback": (env_fallback, ["LLORCH_URL"])},
    "token": {"type": "str", "no_log": True, "fallback": (env_fallback, ["LLORCH_API_TOKEN"])},
    "token_file": {"type": "path"},
    "validate_certs": {"type": "bool", "default": True},
    "ca_path": {"type": "path"},
    "timeout": {"type": "int", "default": 10},
}

# How often a wait re-reads a node: one GET per poll is cheap for the registry, and a person waiting on a
# playbook notices half a second at most.
POLL_INTERVAL_S = 0.5
# The most the client reads of one answer. The registry's largest, the node list of a full cluster
# (max_nodes 10,000), is about 12 MB with lean records; anything far beyond is not orchestratord speaking.
MAX_ANSWER_BYTES = 128 * 1024 * 1024
MAX_ERROR_BYTES = 64 * 1024
# The most registry URLs a client takes (as pool-managerd's control_urls).
MAX_URLS = 16

# Short phrases for the errno values an operator meets most; anything else falls back to strerror.
_ERRNO_PHRASES = {
    errno.ECONNREFUSED: "connection refused",
    errno.EHOSTUNREACH: "host unreachable",
    errno.ENETUNREACH: "network unreachable",
    errno.ECONNRESET: "connection reset",
    errno.ETIMEDOUT: "timed out",
}


class LlorchApiError(Exception):
    """A failed registry call, phrased for a person: it names the URL and never holds the token."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code


def read_token_file(path: str) -> str:
    """The token stored in `path`, read the way the services read theirs (the contract's reader).

    The file may sit in a folder another user can write: no link is followed, and a file that group or
    others can read is refused, as orchestratord and pool-managerd refuse it.
    """
    try:
        return read_secret_file(path, what="token_file")
    except SecretFileError as exc:
        # "token_file P is readable by group ..." -> "cannot read token_file P: readable by group ..."
        prefix = f"token_file {os.path.expanduser(path)}"
        reason = str(exc).removeprefix(prefix).lstrip(":").strip().removeprefix("is ")
        raise LlorchApiError(f"cannot read token_file {path}: {reason}") from None


def _reason(exc: BaseException) -> str:
    """A short human phrase for a connection-level failure."""
    if isinstance(exc, URLError) and not isinstance(exc, HTTPError):
        reason = exc.reason
        if isinstance(reason, BaseException):
            return _reason(reason)
        return str(reason)
    # http.client's failures, before OSError: RemoteDisconnected is also a ConnectionResetError. What the
    # other end sent (an SSH banner, say) is not echoed: it is not ours to put in a message.
    if isinstance(exc, http.client.RemoteDisconnected):
        return "the connection was closed without an answer (is it really orchestratord?)"
    if isinstance(exc, http.client.IncompleteRead):
        return "the answer was cut short"
    if isinstance(exc, http.client.HTTPException):
        return "the answer is not HTTP (is it really orchestratord?)"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted ({exc.verify_message}); set ca_path, or validate_certs: false"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error ({exc.reason or exc})"
    if isinstance(exc, socket.gaierror):
        return f"name not resolved ({exc.strerror})"
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return "timed out"
    if isinstance(exc, OSError) and exc.errno in _ERRNO_PHRASES:
        return _ERRNO_PHRASES[exc.errno]
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


def registry_urls(url) -> list[str]:
    """The registry URLs from the url option: one string (comma-separated for several) or a list of them.
    Raises LlorchApiError naming what is wrong."""
    items = [url] if isinstance(url, str) else list(url or [])
    urls = []
    for item in items:
        if not isinstance(item, str):
            raise LlorchApiError(f"registry url {item!r} is not a string")
        urls += [part.strip().rstrip("/") for part in item.split(",") if part.strip()]
    if not urls:
        raise LlorchApiError("no registry URL: set the url option or the LLORCH_URL environment variable")
    if len(urls) > MAX_URLS:
        raise LlorchApiError(f"{len(urls)} registry URLs: at most {MAX_URLS}")
    for candidate in urls:
        if "://" not in candidate:
            raise LlorchApiError(f"registry url {candidate!r} has no scheme: write it as http://HOST:PORT")
    return list(dict.fromkeys(urls))  # each once, in the order given


class _NoAnswer(Exception):
    """One URL gave no HTTP answer; the reason is a short phrase (see _reason)."""


class LlorchClient:
    """Talks to orchestratord's /v2 API with a bearer token; `url` is the one in use (see the module doc)."""

    def __init__(
        self,
        url: str | list[str] | None,
        token: str | None = None,
        token_file: str | None = None,
        validate_certs: bool = True,
        ca_path: str | None = None,
        timeout: int = 10,
    ):
        self.urls = registry_urls(url)
        self.url = self.urls[0]
        # An explicit token_file wins: the token option also picks up LLORCH_API_TOKEN from the
        # environment, and a file named on purpose is the stronger signal.
        if token_file:
            token = read_token_file(token_file)
        if not token:
            raise LlorchApiError(
                "no API token: set token, token_file or the LLORCH_API_TOKEN environment variable"
            )
        self._token = token
        self.validate_certs = validate_certs
        self.ca_path = ca_path
        self.timeout = timeout

    @classmethod
    def from_options(cls, get_option) -> LlorchClient:
        """Build from any option getter (AnsibleModule.params.get, a plugin's get_option)."""
        return cls(
            url=get_option("url"),
            token=get_option("token"),
            token_file=get_option("token_file"),
            validate_certs=get_option("validate_certs"),
            ca_path=get_option("ca_path"),
            timeout=get_option("timeout"),
        )

    @classmethod
    def from_module(cls, module) -> LlorchClient:
        """Build from an AnsibleModule made with LLORCH_ARGUMENT_SPEC; fails the module on bad options."""
        try:
            return cls.from_options(module.params.get)
        except LlorchApiError as exc:
            module.fail_json(msg=str(exc))
            raise  # not reached: fail_json exits

    def __repr__(self) -> str:
        return f"LlorchClient(urls={self.urls!r})"

    def request(self, method: str, path: str, body=None, allow_missing: bool = False):
        """One call; returns the decoded JSON body (None for 204, or for 404 when `allow_missing`).

        Tries the URL in use, then each other one in turn, until one gives an HTTP answer; that URL stays in
        use for the next calls. None answering: one error naming every URL and why."""
        start = self.urls.index(self.url)
        failures = []  # (url, why), in the order tried
        for url in self.urls[start:] + self.urls[:start]:
            self.url = url
            try:
                return self._request_once(method, path, body, allow_missing)
            except _NoAnswer as exc:
                failures.append((url, str(exc)))
        self.url = self.urls[start]
        if len(failures) == 1:
            raise LlorchApiError(f"cannot reach the registry at {self.url}: {failures[0][1]}")
        tried = ", ".join(f"{url} ({why})" for url, why in failures)
        raise LlorchApiError(f"cannot reach the registry at any of its {len(failures)} URLs: {tried}")

    def _request_once(self, method: str, path: str, body, allow_missing: bool):
        """One call to self.url; _NoAnswer when that URL gives no HTTP answer."""
        headers = {"Authorization": f"Bearer {self._token}", "Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        where = f"{method} {path}"
        # Imported here: an inventory read from the cache never makes a request, and this import is a
        # visible part of a cached read's time.
        from ansible.module_utils.urls import open_url

        try:
            # No redirects: following one would carry the token to another address, and a registry
            # behind a redirect is better fixed by setting url to the final address.
            answer = open_url(
                self.url + path,
                data=data,
                headers=headers,
                method=method,
                timeout=self.timeout,
                validate_certs=self.validate_certs,
                ca_path=self.ca_path,
                follow_redirects="none",
                use_netrc=False,
            )
            with answer:
                status, payload = answer.status, answer.read(MAX_ANSWER_BYTES + 1)
                # read(n) returns what came before the peer closed, without the IncompleteRead that a whole
                # read() raises: compare with the announced length to tell a cut-short answer.
                announced = answer.headers.get("Content-Length", "")
                if announced.isdigit() and len(payload) < int(announced) <= MAX_ANSWER_BYTES:
                    raise http.client.IncompleteRead(payload, int(announced) - len(payload))
        except HTTPError as exc:
            if allow_missing and exc.code == 404:
                return None
            raise self._http_error(exc, where) from None
        except (URLError, OSError, http.client.HTTPException) as exc:
            # HTTPException: a url that points at something other than an HTTP server (an SSH port) or a
            # connection cut mid-answer (IncompleteRead); BadStatusLine and IncompleteRead are no OSError.
            raise _NoAnswer(_reason(exc)) from None
        if len(payload) > MAX_ANSWER_BYTES:
            raise LlorchApiError(
                f"the registry at {self.url} answered {where} with more than {MAX_ANSWER_BYTES} bytes; "
                f"not read (is {self.url} really orchestratord?)"
            )
        if status == 204 or not payload:
            return None
        try:
            return json.loads(payload)
        except ValueError:
            raise LlorchApiError(
                f"the registry at {self.url} answered {where} with a body that is not JSON "
                f"(is {self.url} really orchestratord?)"
            ) from None

    def _http_error(self, exc: HTTPError, where: str) -> LlorchApiError:
        if exc.code == 401:
            return LlorchApiError(f"token rejected by {self.url} (401)", status=401, code="UNAUTHORIZED")
        if exc.code in (301, 302, 303, 307, 308):
            target = exc.headers.get("Location", "elsewhere") if exc.headers else "elsewhere"
            return LlorchApiError(
                f"the registry at {self.url} redirected {where} to {target}; set url to the final address",
                status=exc.code,
            )
        code, message = None, ""
        try:
            envelope = json.loads(exc.read(MAX_ERROR_BYTES) or b"null")
        except (ValueError, OSError):
            envelope = None
        if isinstance(envelope, dict):
            code, message = envelope.get("code"), envelope.get("message", "")
        detail = " ".join(str(part) for part in (code, message) if part) or (exc.reason or "")
        return LlorchApiError(
            f"the registry at {self.url} answered {where} with {exc.code}: {detail}".rstrip(": "),
            status=exc.code,
            code=code,
        )

    # The registry's routes, one method each.

    def list_nodes(self, status: str | None = None) -> list[dict]:
        path = "/v2/nodes" + (f"?status={quote(status)}" if status else "")
        answer = self.request("GET", path)
        if not isinstance(answer, dict) or not isinstance(answer.get("nodes"), list):
            raise LlorchApiError(f"the registry at {self.url} answered GET {path} without a nodes list")
        return answer["nodes"]

    def get_node(self, node_id: str) -> dict | None:
        """The node's record, or None when the registry does not know it."""
        return self.request("GET", f"/v2/nodes/{quote(node_id, safe='')}", allow_missing=True)

    def set_drain(self, node_id: str, drain: bool) -> dict:
        return self.request("POST", f"/v2/nodes/{quote(node_id, safe='')}/drain", body={"drain": drain})

    def delete_node(self, node_id: str) -> bool:
        """Remove the node; False when it was already gone."""
        path = f"/v2/nodes/{quote(node_id, safe='')}"
        try:
            self.request("DELETE", path)
        except LlorchApiError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def list_credentials(self) -> list[dict]:
        """Every credential the daemon holds, without secrets (admin only)."""
        answer = self.request("GET", "/v2/credentials")
        if not isinstance(answer, dict) or not isinstance(answer.get("credentials"), list):
            raise LlorchApiError(f"the registry at {self.url} answered GET /v2/credentials without a list")
        return answer["credentials"]

    def get_credential(self, name: str) -> dict | None:
        """The credential called `name` (no secret), or None when the daemon holds none by that name."""
        return next((item for item in self.list_credentials() if item.get("name") == name), None)

    def create_credential(self, body: dict) -> dict:
        """Issue one; the answer holds its secret, which the daemon shows this once."""
        return self.request("POST", "/v2/credentials", body=body)

    def delete_credential(self, name: str) -> bool:
        """Revoke the credential; False when it was already gone. Names may hold a '/' (node/<id>)."""
        try:
            self.request("DELETE", f"/v2/credentials/{quote(name, safe='/')}")
        except LlorchApiError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def catalog_availability(self) -> dict:
        return self.request("GET", "/v2/catalog/availability")

    def catalog_models(self) -> list[dict]:
        answer = self.request("GET", "/v2/catalog/models")
        return answer.get("models", []) if isinstance(answer, dict) else []


def wait_for_node(client: LlorchClient, node_id: str, ready, timeout_s: float) -> tuple[dict | None, bool]:
    """Re-read the node until `ready(node)` holds: (node, True), or (the last record seen, False) once
    `timeout_s` runs out. The record is None while the registry does not know the node (an agent that has
    not registered yet, or registers again after a restart), which is waited out like any other state."""
    deadline = time.monotonic() + max(timeout_s, 0)
    while True:
        node = client.get_node(node_id)
        if node is not None and ready(node):
            return node, True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return node, False
        time.sleep(min(POLL_INTERVAL_S, remaining))


def pool_busy_slots(pool: dict) -> int:
    """Slots of one pool with a request in flight, as its last heartbeat reported them.

    A pool whose engine is loading or dead has nothing in flight: its agent reports every slot free, and
    should a record say otherwise (an older agent, a reading taken as the engine died) it still counts
    none, so that an engine that will not come back never holds up a drain until its timeout.
    """
    engine = pool.get("engine")
    if isinstance(engine, dict) and engine.get("state") not in ENGINE_SERVING_STATES:
        return 0
    return max(int(pool.get("slots_total") or 0) - int(pool.get("slots_free") or 0), 0)


def busy_slots(node: dict) -> int:
    """Slots with a request in flight across the node's pools (see pool_busy_slots)."""
    return sum(pool_busy_slots(pool) for pool in node.get("pools") or [])


def _parse_time(value: str | None) -> datetime | None:
    """An RFC 3339 UTC time from the wire, or None."""
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def node_summary(node: dict, now: datetime | None = None) -> dict:
    """The figures a person reads first about a node, derived from its registry record."""
    pools = node.get("pools") or []
    last_heartbeat = _parse_time(node.get("last_heartbeat_at"))
    now = now or datetime.now(UTC)
    engines = [pool.get("engine") for pool in pools if isinstance(pool.get("engine"), dict)]
    return {
        "pools_ready": sum(1 for pool in pools if pool.get("ready")),
        "pools_total": len(pools),
        "engines_total": len(engines),
        "engines_serving": sum(1 for engine in engines if engine.get("state") in ENGINE_SERVING_STATES),
        "slots_free": sum(int(pool.get("slots_free") or 0) for pool in pools),
        "slots_busy": busy_slots(node),
        "vram_free_bytes": sum(int(pool.get("vram_free_bytes") or 0) for pool in pools),
        "heartbeat_age_s": max(int((now - last_heartbeat).total_seconds()), 0) if last_heartbeat else None,
    }


def is_drained(node: dict) -> bool:
    """Whether an operator drained the node.

    The daemon's `drain` flag says it exactly; without one, `status: draining` is the best sign.
    """
    if "drain" in node:
        return bool(node["drain"])
    if "drained" in node:
        return bool(node["drained"])
    return node.get("status") == "draining"

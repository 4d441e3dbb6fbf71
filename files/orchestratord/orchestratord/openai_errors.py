"""The gateway's own errors, in OpenAI's shape, which the clients of /v1/* already parse:
`{"error": {"message", "type", "param", "code"}}`. An engine's own errors pass through untouched."""

from __future__ import annotations

import msgspec
from aiohttp import web

CLIENT = "llorch.client"  # request key: the client key's name, set by the guard on /v1/* routes


class OpenAIErrorBody(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str


class OpenAIError(msgspec.Struct):
    error: OpenAIErrorBody


_encode = msgspec.json.Encoder().encode


def error_bytes(error_type: str, code: str, message: str) -> bytes:
    return _encode(OpenAIError(OpenAIErrorBody(message, error_type, None, code)))


def openai_error(
    status: int, error_type: str, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=error_bytes(error_type, code, message),
        status=status,
        content_type="application/json",
        headers=headers,
    )


class GatewayError(Exception):
    """A refusal of the gateway's own; `retry_after_s` becomes Retry-After (whole seconds)."""

    def __init__(
        self, status: int, error_type: str, code: str, message: str, retry_after_s: int | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s

    def response(self) -> web.Response:
        headers = None if self.retry_after_s is None else {"Retry-After": str(self.retry_after_s)}
        return openai_error(self.status, self.error_type, self.code, self.message, headers)


def invalid_request(code: str, message: str, status: int = 400) -> GatewayError:
    return GatewayError(status, "invalid_request_error", code, message)


def server_error(status: int, code: str, message: str, retry_after_s: int | None = None) -> GatewayError:
    return GatewayError(status, "server_error", code, message, retry_after_s)

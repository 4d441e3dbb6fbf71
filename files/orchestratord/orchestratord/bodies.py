"""Request bodies in, answers out: every body decoded by one schema in one call, every refusal a 400
in the error envelope whichever decoder met the problem."""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

from . import schemas

JSON = "application/json"

_decoders = {
    schemas.Registration: msgspec.json.Decoder(schemas.Registration),
    schemas.Heartbeat: msgspec.json.Decoder(schemas.Heartbeat),
    schemas.DrainRequest: msgspec.json.Decoder(schemas.DrainRequest),
    schemas.PlacementRequest: msgspec.json.Decoder(schemas.PlacementRequest),
}


class ApiError(Exception):
    """An answer in the error envelope; the middleware turns it into a response."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


def json_response(value: Any, status: int = 200) -> web.Response:
    return web.Response(body=schemas.encode(value), status=status, content_type=JSON)


def _whole_floats_as_ints(value: Any) -> Any:
    """4.0 -> 4 throughout a decoded JSON value, in place; a loop, not recursion, however deep the value."""
    if isinstance(value, float):
        return int(value) if value.is_integer() else value
    pending = [value]
    while pending:
        container = pending.pop()
        if isinstance(container, list):
            items = enumerate(container)
        elif isinstance(container, dict):
            items = container.items()
        else:
            continue
        for key, item in items:
            if isinstance(item, float):
                if item.is_integer():
                    container[key] = int(item)  # replaces a value: the container keeps its size
            elif isinstance(item, list | dict):
                pending.append(item)
    return value


def _refusal(exc: Exception, schema: type) -> ApiError:
    """The 400 for a body that does not decode, whichever decoder met the problem first."""
    if isinstance(exc, msgspec.ValidationError):
        return ApiError(400, "INVALID_PARAMS", f"invalid {schema.__name__}: {exc}")
    if isinstance(exc, UnicodeDecodeError):  # msgspec checks the bytes of each string it reads
        detail = f"byte 0x{exc.object[exc.start]:02x} at offset {exc.start}"
        return ApiError(400, "INVALID_PARAMS", f"malformed JSON body: not UTF-8 text, {detail}")
    if isinstance(exc, RecursionError):  # msgspec's own depth guard: arrays in arrays thousands deep
        return ApiError(400, "INVALID_PARAMS", f"invalid {schema.__name__}: body nested too deeply")
    return ApiError(400, "INVALID_PARAMS", f"malformed JSON body: {exc}")


# What decoding a peer's bytes may raise; anything else is a bug in the daemon and stays a 500.
DECODE_ERRORS = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)


async def decode_body(request: web.Request, schema: type) -> Any:
    body = await request.read()
    try:
        if not body.isascii():
            # JSON is UTF-8 (RFC 8259); msgspec checks only the strings it keeps, not those it skips.
            body.decode()
        return _decoders[schema].decode(body)
    except msgspec.ValidationError as exc:
        if "got `float`" not in str(exc):
            raise _refusal(exc, schema) from None
    except DECODE_ERRORS as exc:
        raise _refusal(exc, schema) from None
    # JSON Schema counts 4.0 as an integer, so the published document promises to accept it; the fast
    # strict decoder does not, so such bodies take this slower path. Strings are still no numbers. The
    # strict decoder stopped at the first float: the rest of the body may still be malformed, hold
    # numbers out of range or bytes that are not UTF-8, so this path refuses all the same errors.
    try:
        return msgspec.convert(_whole_floats_as_ints(msgspec.json.decode(body)), schema, strict=True)
    except DECODE_ERRORS as exc:
        raise _refusal(exc, schema) from None


def check(rule, body):
    try:
        return rule(body)
    except schemas.ValidationProblem as exc:
        raise ApiError(400, "INVALID_PARAMS", str(exc)) from None

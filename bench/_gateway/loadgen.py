"""One load-generator process: HTTP/1.1 over plain asyncio streams, timing each request.

Open loop (`--rate`): request i is due at start + i / rate whatever happened to the ones before it, so a slow
target meets the same arrivals a fast one does (no coordinated omission). Closed loop (`--concurrency`):
that many clients, each sending its next request when its last answer ended (a saturation test).

Times are taken from the moment the request's coroutine started: time to first token
(the first byte of the first chunk holding a real token: a streamed answer's preamble is not a token) and
total time (the answer's last byte). The generator also records its own lag: how late each request's
coroutine started against its due time (asyncio's timers wake on a 1 ms grid, so up to about 1 ms is the
clock, not the load). Where that lag grows, the generator's loop is saturated: it could not keep the rate
and would read answers late, and the bench says so rather than print the figure.

A request counts as served only when the status is 200 and a streamed answer ends with `data: [DONE]`;
anything else is an error, counted and sampled. Results go to --out as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter

# A token chunk of a chat stream carries a string `content` (the role-only preamble has `"content":null`);
# a text completion's carries `"text":"` followed by at least one character.
TOKEN_MARKERS = (b'"content":"', b'"text":"')
DONE = b"data: [DONE]"
MAX_ERROR_SAMPLES = 5


class Target:
    def __init__(self, host: str, port: int, path: str, body: bytes, key: str, stream: bool) -> None:
        self.host, self.port, self.stream = host, port, stream
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {key}\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        self.request = head.encode() + body
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []


class Results:
    def __init__(self) -> None:
        self.first_token_ms: list[float] = []
        self.total_ms: list[float] = []
        self.lag_ms: list[float] = []
        self.errors: Counter[str] = Counter()
        self.sent = 0
        self.window_ends = float("inf")  # perf_counter() at the end of the measured window
        self.served_in_window = 0  # answers that ended well before the window closed: the throughput

    def error(self, what: str) -> None:
        self.errors[what[:200]] += 1


async def read_answer(reader: asyncio.StreamReader, stream: bool) -> tuple[int, float | None, bytes, bool]:
    """One HTTP/1.1 answer: (status, time its first token arrived, the body's tail, connection reusable)."""
    status_line = await reader.readline()
    if not status_line:
        raise NoAnswer("connection closed before the status line")
    status = int(status_line.split(b" ", 2)[1])
    length, chunked, keep_alive = None, False, True
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value:
            chunked = True
        elif name == b"connection" and value == b"close":
            keep_alive = False
    first_token_at = None if stream else time.perf_counter()
    tail = b""
    if chunked:
        while True:
            size = int((await reader.readline()).split(b";", 1)[0], 16)
            if size == 0:
                await reader.readline()
                break
            data = await reader.readexactly(size + 2)
            if first_token_at is None and any(marker in tail + data for marker in TOKEN_MARKERS):
                first_token_at = time.perf_counter()
            tail = (tail + data[:-2])[-64:]
    elif length is not None:
        data = await reader.readexactly(length)
        if first_token_at is None and any(marker in data for marker in TOKEN_MARKERS):
            first_token_at = time.perf_counter()
        tail = data[-64:]
    else:
        data = await reader.read()
        if first_token_at is None and any(marker in data for marker in TOKEN_MARKERS):
            first_token_at = time.perf_counter()
        tail, keep_alive = data[-64:], False
    return status, first_token_at, tail, keep_alive


class StaleConnection(ConnectionError):
    """A kept-alive connection the server had closed before reading our request: safe to send again."""


async def exchange(target: Target, reuse: bool):
    """Send the request on an idle connection (or a new one) and read the answer.

    A server may close a kept-alive connection at any time (llama-server's HTTP library does after a number
    of requests); a request that met such a connection got no byte back and is sent again once on a new
    one, as HTTP clients do, rather than counted as the target's error.
    """
    fresh = not (reuse and target.idle)
    reader, writer = await asyncio.open_connection(target.host, target.port) if fresh else target.idle.pop()
    try:
        writer.write(target.request)
        return (reader, writer, *await read_answer(reader, target.stream))
    except (ConnectionError, asyncio.IncompleteReadError) as failure:
        writer.close()
        if not fresh and isinstance(failure, NoAnswer | ConnectionResetError | BrokenPipeError):
            raise StaleConnection(str(failure)) from failure
        raise


class NoAnswer(ConnectionError):
    """The connection closed before the status line."""


async def one_request(target: Target, results: Results, due: float) -> None:
    began = time.perf_counter()
    results.lag_ms.append((began - due) * 1000)
    try:
        results.sent += 1
        try:
            reader, writer, status, first_token_at, tail, keep_alive = await exchange(target, reuse=True)
        except StaleConnection:
            reader, writer, status, first_token_at, tail, keep_alive = await exchange(target, reuse=False)
    except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as failure:
        results.error(f"{type(failure).__name__}: {failure}")
        return
    ended_at = time.perf_counter()
    if keep_alive:
        target.idle.append((reader, writer))
    else:
        writer.close()
    if status != 200:
        results.error(f"status {status}: {tail.decode(errors='replace')}")
    elif target.stream and DONE not in tail:
        results.error(f"stream without [DONE]: ...{tail.decode(errors='replace')}")
    elif first_token_at is None:
        results.error("answer without a token")
    else:
        results.first_token_ms.append((first_token_at - began) * 1000)
        results.total_ms.append((ended_at - began) * 1000)
        if ended_at <= results.window_ends:
            results.served_in_window += 1


async def open_loop(
    target: Target, rate: float, start_at: float, duration_s: float, results: Results
) -> None:
    """Fire request i at start + i / rate; returns when every request sent has ended."""
    await asyncio.sleep(max(0.0, start_at - time.time()))
    started = time.perf_counter()
    results.window_ends = started + duration_s
    total = int(rate * duration_s)
    pending: set[asyncio.Task] = set()
    for number in range(total):
        due = started + number / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one_request(target, results, due))
        pending.add(task)
        task.add_done_callback(pending.discard)
    if pending:
        await asyncio.wait(pending)


async def closed_loop(target: Target, concurrency: int, start_at: float, duration_s: float, results: Results):
    await asyncio.sleep(max(0.0, start_at - time.time()))
    started = time.perf_counter()
    ends = results.window_ends = started + duration_s

    async def client() -> None:
        while time.perf_counter() < ends:
            await one_request(target, results, time.perf_counter())

    await asyncio.gather(*(client() for _ in range(concurrency)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True, help="http://127.0.0.1:PORT/v1/chat/completions")
    parser.add_argument("--body", required=True, help="the JSON request body")
    parser.add_argument("--key-file", required=True, help="the bearer key to send (a file: never in argv)")
    parser.add_argument("--rate", type=float, help="open loop: requests per second")
    parser.add_argument("--concurrency", type=int, help="closed loop: clients")
    parser.add_argument("--start-at", type=float, required=True, help="time.time() to begin at")
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    host_port, _, path = args.url.removeprefix("http://").partition("/")
    host, port = host_port.rsplit(":", 1)
    body = args.body.encode()
    with open(args.key_file) as handle:
        key = handle.read().strip()
    target = Target(host, int(port), "/" + path, body, key, bool(json.loads(body).get("stream")))
    results = Results()
    if args.rate:
        asyncio.run(open_loop(target, args.rate, args.start_at, args.duration, results))
    else:
        asyncio.run(closed_loop(target, args.concurrency, args.start_at, args.duration, results))
    with open(args.out, "w") as handle:
        json.dump(
            {
                "window_s": args.duration,
                "sent": results.sent,
                "served_in_window": results.served_in_window,
                "first_token_ms": results.first_token_ms,
                "total_ms": results.total_ms,
                "lag_ms": results.lag_ms,
                "errors": dict(results.errors.most_common(MAX_ERROR_SAMPLES)),
                "error_count": sum(results.errors.values()),
            },
            handle,
        )


if __name__ == "__main__":
    main()

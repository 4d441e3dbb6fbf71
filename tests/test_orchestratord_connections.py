"""Idle connections that never present the token cannot lock the daemon out: past max_connections the
oldest of them make room for newcomers, each is closed after connection_idle_timeout_ms, and the log says
so in a bounded number of lines, never one per connection."""

from __future__ import annotations

import contextlib
import socket

from support import sample_registration, wait_until

CAP = 40
IDLE_MS = 1500


def idle_connections(port: int, count: int, partial: bytes = b"") -> list[socket.socket]:
    sockets = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        if partial:
            sock.sendall(partial)
        sockets.append(sock)
    return sockets


def closed_by_peer(sock: socket.socket) -> bool:
    sock.settimeout(0)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def connection_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if "orchestratord.connections" in line]


def test_more_idle_connections_than_the_cap_do_not_lock_out_a_real_client(daemon_factory):
    daemon = daemon_factory(max_connections=CAP, connection_idle_timeout_ms=60_000)
    port = daemon.config["listen_port"]
    silent = idle_connections(port, CAP * 3)
    trickling = idle_connections(port, CAP, partial=b"POST /v2/nodes/register HTTP/1.1\r\nHost: x\r\n")
    try:
        answer = daemon.api("POST", "/v2/nodes/register", sample_registration("gpu-1"))
        assert answer.status == 200, answer.text
        assert daemon.api("GET", "/v2/nodes").body["count"] == 1
        # The oldest idle ones were pushed out to make room.
        wait_until(lambda: all(closed_by_peer(sock) for sock in silent[:CAP]), what="oldest idle closed")
        assert len(connection_lines(daemon.log())) <= 2, daemon.log()
        assert "max_connections (40)" in daemon.log()
        assert "Traceback" not in daemon.log()
    finally:
        for sock in silent + trickling:
            sock.close()


def test_a_connection_without_the_token_is_closed_after_the_idle_timeout(daemon_factory):
    daemon = daemon_factory(max_connections=CAP, connection_idle_timeout_ms=IDLE_MS)
    port = daemon.config["listen_port"]
    idle = idle_connections(port, 10) + idle_connections(port, 5, partial=b"GET /v2/nodes HTTP/1.1\r\n")
    trusted = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        request = f"GET /v2/nodes HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {daemon.token}\r\n\r\n"
        trusted.sendall(request.encode())
        assert b" 200 " in trusted.recv(65536).split(b"\r\n", 1)[0]
        wait_until(lambda: all(closed_by_peer(sock) for sock in idle), timeout=15, what="idle closed")
        assert not closed_by_peer(trusted)  # the authenticated one stays for aiohttp's keep-alive
        wait_until(lambda: "connection_idle_timeout_ms (1500)" in daemon.log(), what="the log line")
        assert len(connection_lines(daemon.log())) == 1, daemon.log()
    finally:
        for sock in [*idle, trusted]:
            with contextlib.suppress(OSError):
                sock.close()

"""Fixtures shared by every test module; the machinery lives in support.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from support import Daemon, make_daemon
from support_gateway import Upstream, gateway_daemon

# The throwaway PostgreSQL server of the store tests, one per session (tests/support_postgres.py).
pytest_plugins = ["support_postgres"]


@pytest.fixture
def daemon_factory(request, tmp_path) -> Iterator:
    """Start real daemons with config overrides: `daemon_factory(node_timeout_ms=500)`.

    On SQLite, unless a module parametrizes it indirectly with "postgresql" (each daemon then gets a fresh
    database on the session's PostgreSQL server, started only when a test needs it)."""
    store = getattr(request, "param", "sqlite")
    started: list[Daemon] = []

    def start(name: str = "orchestratord", **overrides) -> Daemon:
        if store == "postgresql":
            from support_postgres import fresh_database  # registered by pytest_plugins above

            overrides = {**fresh_database(request.getfixturevalue("postgres"), tmp_path / name), **overrides}
        daemon = make_daemon(tmp_path / name, **overrides).start()
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


@pytest.fixture
def daemon(daemon_factory) -> Daemon:
    """A real orchestratord on 127.0.0.1 with a fresh database."""
    return daemon_factory()


@pytest.fixture
def models_dir(tmp_path) -> Path:
    """An empty models folder for staging tests."""
    path = tmp_path / "models"
    path.mkdir()
    return path


@pytest.fixture
def upstreams() -> Iterator:
    """Scripted engines for the gateway tests: `upstreams(mode="hold")` (tests/support_gateway.py)."""
    started: list[Upstream] = []

    def start(**settings) -> Upstream:
        upstream = Upstream(**settings).start()
        started.append(upstream)
        return upstream

    yield start
    for upstream in started:
        upstream.release()  # a held answer must not keep the loop from stopping
        upstream.close()


@pytest.fixture
def gateway(tmp_path) -> Iterator:
    """Daemons with client keys and short gateway timeouts: `gateway(gateway_queue_max=2)`."""
    started: list[Daemon] = []

    def start(**overrides) -> Daemon:
        daemon = gateway_daemon(tmp_path / f"d{len(started)}", **overrides).start()
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()

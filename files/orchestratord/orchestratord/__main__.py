"""`python -m orchestratord --config FILE`: read the settings and the token, then serve.

Exit codes: 0 after a clean stop; 1 when it cannot serve now but a restart may help (the port taken, the
database's folder not there yet); 2 when a person must act first: a configuration or token problem, or a
damaged or empty database file. The unit sets RestartPreventExitStatus=2 so it does not loop on those.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from aiohttp import web

from . import __version__
from .client_keys import load_client_keys
from .config import (
    ConfigError,
    Settings,
    describe_database,
    load_db_password,
    load_settings,
    load_token,
    token_fingerprint,
)
from .store import Store, StoreError, StoreRefused
from .tls import HandshakeBoundSite, ServerTls, load_server_tls

EXIT_CANNOT_SERVE = 1
EXIT_PERSON_MUST_ACT = 2

log = logging.getLogger("orchestratord")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="orchestratord", description="llorch-kit control daemon")
    parser.add_argument("--config", help="YAML settings file (e.g. /etc/llorch/orchestratord.yml)")
    parser.add_argument("--version", action="version", version=f"orchestratord {__version__}")
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config)
        token = load_token(settings)
        client_keys = load_client_keys(settings.client_keys_file, token)
        db_password = load_db_password(settings)
        server_tls = load_server_tls(settings)
    except ConfigError as exc:
        print(f"orchestratord: {exc}", file=sys.stderr)
        return EXIT_PERSON_MUST_ACT
    logging.basicConfig(
        level=settings.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from .app import create_app  # after logging is set up

    log.info(
        "orchestratord %s on %s://%s:%d, database %s, token %s, %d client key(s), heartbeat %d ms, "
        "node timeout %d ms",
        __version__,
        "http" if server_tls is None else "https",
        settings.listen_host,
        settings.listen_port,
        describe_database(settings),
        token_fingerprint(token),
        len(client_keys),
        settings.heartbeat_interval_ms,
        settings.node_timeout_ms,
    )
    if server_tls is None:
        log.warning("serving plain HTTP (plain_http: true): for labs and tests only, tokens cross in clear")
    else:
        log.info("serving HTTPS with %s, valid until %s", server_tls.cert_file, server_tls.not_after_text())
    try:
        asyncio.run(
            serve(create_app(settings, token, client_keys, db_password, server_tls), settings, server_tls)
        )
    except StoreRefused as exc:
        log.error("%s", exc)
        return EXIT_PERSON_MUST_ACT
    except StoreError as exc:
        log.error("%s", exc)
        return EXIT_CANNOT_SERVE
    except OSError as exc:
        log.error(
            "cannot serve on %s:%d: %s", settings.listen_host, settings.listen_port, exc.strerror or exc
        )
        return EXIT_CANNOT_SERVE
    return 0


async def serve(app: web.Application, settings: Settings, server_tls: ServerTls | None = None) -> None:
    """What web.run_app does, plus the connection guard on the server it builds, until SIGTERM/SIGINT;
    over HTTPS when server_tls is given, whose certificate SIGHUP reloads."""
    from .routes import CONNECTIONS, REGISTRY

    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    try:
        await runner.setup()  # opens the store: a damaged database stops the start here
        guard = app[CONNECTIONS]
        guard.attach(runner.server)
        if server_tls is None:
            site = web.TCPSite(runner, settings.listen_host, settings.listen_port)
        else:
            site = HandshakeBoundSite(
                runner,
                settings.listen_host,
                settings.listen_port,
                server_tls.context,
                settings.connection_idle_timeout_ms / 1000,
            )
        await site.start()
        guard.start()
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        # SIGHUP (systemctl reload) renews the certificate and the database's CA; it never ends the process.
        loop.add_signal_handler(signal.SIGHUP, _reload, server_tls, app[REGISTRY].store)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stopping.set)
        await stopping.wait()
        await guard.stop()
    finally:
        await runner.cleanup()


def _reload(server_tls: ServerTls | None, store: Store) -> None:
    if server_tls is None:
        log.info("SIGHUP: no certificate to reload on plain HTTP")
    else:
        server_tls.reload()
    store.reload_tls()


if __name__ == "__main__":
    sys.exit(main())

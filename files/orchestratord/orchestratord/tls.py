"""HTTPS for the daemon: the choice of HTTPS or plain HTTP, the server's SSL context, its certificate and
key read safely, the reload on SIGHUP, and the certificates' expiry times for /metrics.

The private key is opened once without following a link, checked on the descriptor (owner-only, a bounded
regular file) and handed to ssl as /proc/self/fd/N of that descriptor: a name swapped after the check
cannot change what is loaded. A renewed pair is first loaded into a scratch context and checked there (it
parses, the key matches, it has not expired, the cluster CA signs it); only then is it loaded into the
live context, from the same descriptors. New handshakes get the new certificate, open connections keep
theirs, and a bad pair leaves the old one served.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import ssl
import stat
import time
from dataclasses import dataclass

from aiohttp import web

from .config import Settings
from .config_file import ConfigError
from .contract import SecretFileError, open_owner_only

log = logging.getLogger(__name__)

MAX_CERT_FILE_BYTES = 1024 * 1024  # a chain of a few certificates is a few KiB; a bundle of CAs more
MAX_KEY_FILE_BYTES = 64 * 1024
CHOOSE = (
    "orchestratord serves HTTPS: set tls_cert_file and tls_key_file, "
    "or plain_http: true (labs and tests only)"
)


class TlsError(ValueError):
    """A certificate, key or CA file that cannot be served; the message is one line naming the file."""


def check_tls_settings(settings: Settings) -> None:
    """HTTPS with both files, or plain_http alone; ConfigError (one line) for anything in between."""
    files = {"tls_cert_file": settings.tls_cert_file, "tls_key_file": settings.tls_key_file}
    named = [name for name, value in files.items() if value]
    if settings.plain_http:
        if named:
            raise ConfigError(
                f"plain_http: true and {' and '.join(named)} are both set: choose HTTPS (remove plain_http) "
                "or plain HTTP for a lab (remove the TLS files)"
            )
        return
    if not named:
        raise ConfigError(CHOOSE)
    if len(named) == 1:
        missing = "tls_key_file" if named == ["tls_cert_file"] else "tls_cert_file"
        raise ConfigError(f"{named[0]} is set without {missing}: HTTPS needs both")


def _utc(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- reading a certificate's not-after ---------------------------------------------------------------
#
# The standard library decodes a certificate only through a handshake (getpeercert) or for loaded CAs; a
# server certificate is neither. Its not-after sits at a fixed place in the DER (Certificate ->
# TBSCertificate -> Validity), so a few lines walk there. This reads one field of a certificate ssl has
# already parsed and accepted; no signature or trust decision is made here.


def _der_item(der: bytes, offset: int) -> tuple[int, int, int]:
    """(tag, start of content, end of content) of the DER item at `offset`."""
    if offset + 2 > len(der):
        raise ValueError("truncated")
    tag, length, start = der[offset], der[offset + 1], offset + 2
    if length & 0x80:
        count = length & 0x7F
        if not 1 <= count <= 4 or start + count > len(der):
            raise ValueError("bad length")
        length, start = int.from_bytes(der[start : start + count], "big"), start + count
    if start + length > len(der):
        raise ValueError("truncated")
    return tag, start, start + length


def not_after(der: bytes) -> float:
    """The not-after of a DER certificate, as unix seconds; ValueError when it is not one."""
    tbs_certificate = _der_item(der, 0)[1]
    position = _der_item(der, tbs_certificate)[1]  # its first field
    if _der_item(der, position)[0] == 0xA0:  # [0] version, absent in v1 certificates
        position = _der_item(der, position)[2]
    for _skipped in ("serialNumber", "signature", "issuer"):
        position = _der_item(der, position)[2]
    validity = _der_item(der, position)[1]
    not_before_end = _der_item(der, validity)[2]
    tag, start, end = _der_item(der, not_before_end)
    text = der[start:end].decode("ascii")
    if tag == 0x17:  # UTCTime YYMMDDHHMMSSZ: 50-99 are 1950-1999 (RFC 5280)
        text = ("19" if int(text[:2]) >= 50 else "20") + text
    elif tag != 0x18:  # GeneralizedTime YYYYMMDDHHMMSSZ
        raise ValueError("no validity")
    moment = datetime.datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=datetime.UTC)
    return moment.timestamp()


def _first_certificate(pem: bytes, what: str, path: str) -> float:
    """The not-after of the first certificate in a PEM file's bytes; TlsError when there is none."""
    text = pem.decode("ascii", "replace")
    begin, end = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
    start = text.find(begin)
    stop = text.find(end, start)
    if start < 0 or stop < 0:
        raise TlsError(f"{what} {path} holds no PEM certificate")
    try:
        return not_after(ssl.PEM_cert_to_DER_cert(text[start : stop + len(end)]))
    except ValueError:
        raise TlsError(f"{what} {path}: its first certificate cannot be decoded") from None


# --- files -------------------------------------------------------------------------------------------


def _open_public(path: str, what: str) -> int:
    """A descriptor of a certificate file (public: a link is fine, e.g. a renewal tool's current/)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise TlsError(f"{what} {path} cannot be read: {exc.strerror}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_CERT_FILE_BYTES:
        os.close(fd)
        raise TlsError(f"{what} {path} is not a regular file of at most {MAX_CERT_FILE_BYTES} bytes")
    return fd


def _read_all(fd: int) -> bytes:
    return os.pread(fd, MAX_CERT_FILE_BYTES + 1, 0)


def _ssl_reason(exc: ssl.SSLError) -> str:
    return (exc.reason or str(exc)).lower().replace("_", " ")


def _refuse_password() -> str:
    # An encrypted key would make OpenSSL prompt on the terminal; a service has none. Refuse instead.
    raise TlsError("encrypted")


def _chain_error(context: ssl.SSLContext, ca_pem: str) -> str | None:
    """Why a client trusting `ca_pem` would refuse the certificate `context` serves, or None when it would
    accept it: a real handshake through memory buffers, checked as pool-managerd and Ansible check it
    (names aside: those depend on the URL the client uses)."""
    try:
        client = ssl.create_default_context(cadata=ca_pem)
    except ssl.SSLError as exc:
        return f"the CA file cannot be loaded ({_ssl_reason(exc)})"
    client.check_hostname = False
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    client_side = client.wrap_bio(to_client, to_server)
    server_side = context.wrap_bio(to_server, to_client, server_side=True)
    for _flight in range(8):  # TLS 1.3 takes two flights each way; a bound instead of a loop that could spin
        for side in (client_side, server_side):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                continue
            except ssl.SSLCertVerificationError as exc:
                return exc.verify_message or _ssl_reason(exc)
            except ssl.SSLError as exc:
                return _ssl_reason(exc)
        if client_side.version() is not None and server_side.version() is not None:
            return None
    return "the handshake did not finish"


@dataclass
class _Pair:
    cert_fd: int
    key_fd: int
    server_not_after: float
    ca_not_after: float | None

    def load_into(self, context: ssl.SSLContext) -> None:
        context.load_cert_chain(
            f"/proc/self/fd/{self.cert_fd}", f"/proc/self/fd/{self.key_fd}", password=_refuse_password
        )

    def close(self) -> None:
        os.close(self.cert_fd)
        os.close(self.key_fd)


def new_server_context() -> ssl.SSLContext:
    """TLS 1.2 or newer with the library's server defaults; no client certificates (nodes present a bearer
    node token over TLS)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class ServerTls:
    """The live SSL context of the listening socket and what it serves."""

    def __init__(self, cert_file: str, key_file: str, ca_file: str | None) -> None:
        self.cert_file, self.key_file, self.ca_file = cert_file, key_file, ca_file
        self.context = new_server_context()
        self.server_not_after = 0.0
        self.ca_not_after: float | None = None

    def load(self) -> None:
        """Check the files on a scratch context, then load them into the live one. TlsError otherwise,
        with the live context untouched (unless the files change between the two loads: said so)."""
        pair = self._checked_pair()
        try:
            pair.load_into(self.context)
        except (ssl.SSLError, OSError, TlsError) as exc:  # the files changed between the two loads
            raise TlsError(f"tls_cert_file {self.cert_file} changed while it was loaded: {exc}") from None
        finally:
            pair.close()
        self.server_not_after, self.ca_not_after = pair.server_not_after, pair.ca_not_after

    def reload(self) -> None:
        """SIGHUP: the renewed pair for new handshakes, or the old one kept and one ERROR line."""
        try:
            self.load()
        except TlsError as exc:
            log.error(
                "TLS reload refused, still serving the certificate valid until %s: %s",
                _utc(self.server_not_after),
                exc,
            )
            return
        log.info("TLS reloaded: serving %s, valid until %s", self.cert_file, _utc(self.server_not_after))

    def not_after_text(self) -> str:
        return _utc(self.server_not_after)

    def expiry(self) -> dict[str, float]:
        """certificate label -> not-after (unix seconds), for the expiry gauge."""
        times = {"server": self.server_not_after}
        if self.ca_not_after is not None:
            times["ca"] = self.ca_not_after
        return times

    def _checked_pair(self) -> _Pair:
        cert_fd = _open_public(self.cert_file, "tls_cert_file")
        try:
            key_fd = open_owner_only(self.key_file, "tls_key_file", MAX_KEY_FILE_BYTES)
        except SecretFileError as exc:
            os.close(cert_fd)
            raise TlsError(str(exc)) from None
        pair = _Pair(cert_fd, key_fd, 0.0, None)
        try:
            pair.server_not_after = _first_certificate(_read_all(cert_fd), "tls_cert_file", self.cert_file)
            if pair.server_not_after <= time.time():
                raise TlsError(
                    f"tls_cert_file {self.cert_file} expired at {_utc(pair.server_not_after)}: "
                    "issue a new certificate (playbooks/renew_certificates.yml)"
                )
            scratch = new_server_context()
            try:
                pair.load_into(scratch)
            except TlsError:
                raise TlsError(
                    f"tls_key_file {self.key_file} is encrypted; give the key unencrypted"
                ) from None
            except ssl.SSLError as exc:
                raise TlsError(
                    f"tls_cert_file {self.cert_file} and tls_key_file {self.key_file} cannot be served "
                    f"together: {_ssl_reason(exc)}"
                ) from None
            if self.ca_file:
                ca_pem = self._read_ca()
                pair.ca_not_after = _first_certificate(ca_pem.encode(), "tls_ca_file", self.ca_file)
                error = _chain_error(scratch, ca_pem)
                if error is not None:
                    raise TlsError(
                        f"tls_cert_file {self.cert_file} does not verify against tls_ca_file "
                        f"{self.ca_file}: {error}"
                    )
        except BaseException:
            pair.close()
            raise
        return pair

    def _read_ca(self) -> str:
        fd = _open_public(self.ca_file or "", "tls_ca_file")
        try:
            return _read_all(fd).decode("ascii", "replace")
        finally:
            os.close(fd)


class HandshakeBoundSite(web.TCPSite):
    """aiohttp's TCPSite, whose TLS handshakes must finish within handshake_timeout_s.

    The connection guard (connections.py) sees a TLS connection only once its handshake is done: before
    that, asyncio holds it for ssl_handshake_timeout, 60 s by default, which TCPSite does not let one set.
    A socket that never sends a ClientHello is thus closed as soon as an idle plain-HTTP one would be.
    start() is TCPSite's own, with that one argument added.
    """

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext,
        handshake_timeout_s: float,
    ) -> None:
        super().__init__(runner, host, port, ssl_context=ssl_context)
        self.handshake_timeout_s = handshake_timeout_s

    async def start(self) -> None:
        self._runner._reg_site(self)  # what BaseSite.start does
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            server,
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
            ssl_handshake_timeout=self.handshake_timeout_s,
        )
        self._bound_port = self._server.sockets[0].getsockname()[1] if self._server.sockets else self._port


def load_server_tls(settings: Settings) -> ServerTls | None:
    """The checked HTTPS setup (None for plain_http); ConfigError, one line, when it cannot serve."""
    check_tls_settings(settings)
    if settings.plain_http:
        return None
    assert settings.tls_cert_file and settings.tls_key_file  # check_tls_settings made sure
    server_tls = ServerTls(settings.tls_cert_file, settings.tls_key_file, settings.tls_ca_file)
    try:
        server_tls.load()
    except TlsError as exc:
        raise ConfigError(str(exc)) from None
    return server_tls

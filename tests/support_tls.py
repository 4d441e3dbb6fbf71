"""TLS for the tests: throwaway certificates for 127.0.0.1 (a self-signed one, or a CA and a server
certificate it signs), orchestratord serving HTTPS itself (make_tls_daemon), and the byte relay that TLS
fronts put between a client and a plain-HTTP daemon."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from support import Daemon, Response, http, make_daemon

LOCALHOST = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])


def _builder(
    subject: str, issuer: x509.Name | None, public_key, not_after: datetime.datetime | None = None
) -> x509.CertificateBuilder:
    """A certificate valid from five minutes ago (or a day before `not_after`) for a day (or until
    `not_after`); issuer None: self-issued."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.UTC)
    not_after = not_after or now + datetime.timedelta(days=1)
    not_before = min(now - datetime.timedelta(minutes=5), not_after - datetime.timedelta(days=1))
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )


def _write(cert: x509.Certificate, cert_path: Path, key=None, key_path: Path | None = None) -> None:
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None and key_path is not None:
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        key_path.chmod(0o600)


def write_self_signed_certificate(cert_path: Path, key_path: Path) -> None:
    """A certificate for 127.0.0.1 that is its own CA (clients trust it by naming it as their CA)."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder("127.0.0.1", None, key.public_key())
        .add_extension(LOCALHOST, False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    _write(cert, cert_path, key, key_path)


def write_ca(cert_path: Path, common_name: str = "llorch test CA") -> Any:
    """A throwaway CA written to `cert_path`; returns (key, certificate) and never writes the key."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(common_name, None, key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(cert, cert_path)
    return key, cert


def write_server_certificate(
    ca: Any,
    cert_path: Path,
    key_path: Path,
    not_after: datetime.datetime | None = None,
    common_name: str = "llorch-control",
) -> x509.Certificate:
    """A server certificate for 127.0.0.1 signed by `ca` (what write_ca returned), not self-signed, valid
    for a day (or until `not_after`, which may be past); returns it."""
    ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(common_name, ca_cert.subject, key.public_key(), not_after)
        .add_extension(LOCALHOST, False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write(cert, cert_path, key, key_path)
    return cert


# --- orchestratord serving HTTPS itself ------------------------------------------------------------------


@dataclass
class TlsDaemon(Daemon):
    """A real orchestratord serving HTTPS on 127.0.0.1; requests trust `ca_file`."""

    ca_file: Path | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.config['listen_port']}"

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def _answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"orchestratord exited with {self.proc.returncode}:\n{self.log()}")
        try:
            return http("GET", self.url + "/health", timeout=1, context=self.client_context()).status == 200
        except OSError:
            return False

    def api(self, method: str, path: str, body: Any = None, token: Any = ..., **kw) -> Response:
        kw.setdefault("context", self.client_context())
        return super().api(method, path, body, token, **kw)


def make_tls_daemon(workdir: Path, ca: Any = None, **overrides: Any) -> TlsDaemon:
    """A daemon (not yet started) serving HTTPS with a certificate for 127.0.0.1 signed by `ca` (a fresh
    CA when None) in workdir/tls: ca.pem, server.pem, server-key.pem (0600); tls_ca_file is the CA."""
    tls = workdir / "tls"
    tls.mkdir(parents=True, exist_ok=True)
    if ca is None:
        ca = write_ca(tls / "ca.pem")
    else:
        (tls / "ca.pem").write_bytes(ca[1].public_bytes(serialization.Encoding.PEM))
    write_server_certificate(ca, tls / "server.pem", tls / "server-key.pem")
    plain = make_daemon(workdir, **overrides)
    config = {key: value for key, value in plain.config.items() if key != "plain_http"}
    config.update(
        tls_cert_file=str(tls / "server.pem"),
        tls_key_file=str(tls / "server-key.pem"),
        tls_ca_file=str(tls / "ca.pem"),
    )
    config.update(overrides)
    return TlsDaemon(workdir=workdir, config=config, ca_file=tls / "ca.pem")


async def relay_to(upstream_port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Pass bytes both ways between a (TLS) client and the plain-HTTP daemon on 127.0.0.1:upstream_port."""
    try:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", upstream_port)
    except OSError:
        writer.close()
        return

    async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while chunk := await source.read(65536):
                sink.write(chunk)
                await sink.drain()
        except (OSError, ssl.SSLError):
            pass
        finally:
            sink.close()

    await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))

"""TLS for the tests: throwaway certificates for 127.0.0.1 (a self-signed one, or a CA and a server
certificate it signs) and the byte relay that TLS fronts put between a client and a plain-HTTP daemon."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOCALHOST = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])


def _builder(subject: str, issuer: x509.Name | None, public_key) -> x509.CertificateBuilder:
    """A certificate valid from five minutes ago for a day; issuer None: self-issued."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
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


def write_server_certificate(ca: Any, cert_path: Path, key_path: Path) -> None:
    """A server certificate for 127.0.0.1 signed by `ca` (what write_ca returned), not self-signed."""
    ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder("llorch-control", ca_cert.subject, key.public_key())
        .add_extension(LOCALHOST, False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write(cert, cert_path, key, key_path)


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

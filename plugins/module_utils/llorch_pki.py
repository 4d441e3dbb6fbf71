# Copyright: llorch-kit contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""The cluster's certificates on the controller, behind the llorch_certificate module: what a certificate
holds, whether it must be (re)issued and why, issuing it with `cryptography` (ECDSA P-256, SHA-256), and
writing keys and certificates safely (keys 0600 in 0700 folders, every file created O_EXCL|O_NOFOLLOW under
a temporary name and renamed into place, so a reader never sees half a file and no link is followed).

`cryptography` is a dependency of ansible-core itself, so every controller has it; the import is guarded
only so that a missing one is a clear message instead of a traceback."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import secrets
import stat
import traceback

from ansible_collections.llorch.kit.plugins.module_utils.llorch_contract import (
    SecretFileError,
    days_left,
    open_owner_only,
)

try:
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
except ImportError:
    CRYPTOGRAPHY_IMPORT_ERROR: str | None = traceback.format_exc()
else:
    CRYPTOGRAPHY_IMPORT_ERROR = None

KINDS = ("ca", "server", "client")
REASONS = ("missing", "expiring", "names_changed", "other_ca", "none")
DEFAULT_VALID_DAYS = {"ca": 3650, "server": 90, "client": 90}
DEFAULT_CA_NAME = "llorch-kit cluster CA"
MAX_PEM_BYTES = 64 * 1024  # a certificate or an EC key is well under 2 KiB
BACKDATE = datetime.timedelta(minutes=5)  # a host whose clock is a little behind still accepts a new one


class PkiError(ValueError):
    """A certificate or key that cannot be used or written; the message names the file, never a key."""


def _now() -> datetime.datetime:
    # timezone.utc rather than the 3.11+ alias, as llorch_staging does: sanity compiles for older Pythons.
    return datetime.datetime.now(datetime.timezone.utc)  # noqa: UP017


# --- reading --------------------------------------------------------------------------------------------


def _read_bounded(path: str, what: str) -> bytes | None:
    """A public file's bytes (at most MAX_PEM_BYTES, no link followed), or None when it does not exist."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise PkiError(f"{what} {path} cannot be opened (a link is not followed): {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_PEM_BYTES:
            raise PkiError(f"{what} {path} is not a regular file of at most {MAX_PEM_BYTES} bytes")
        return os.read(fd, MAX_PEM_BYTES + 1)
    finally:
        os.close(fd)


def read_certificate(path: str, what: str = "path") -> x509.Certificate | None:
    """The first certificate in a PEM file, or None when the file does not exist."""
    data = _read_bounded(path, what)
    if data is None:
        return None
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise PkiError(f"{what} {path} holds no PEM certificate") from None


def read_private_key(path: str, what: str = "private_key_path"):
    """The EC private key in `path` (owner-only, no link, bounded), or None when it does not exist."""
    if not os.path.lexists(path):
        return None
    try:
        fd = open_owner_only(path, what, MAX_PEM_BYTES)
    except SecretFileError as exc:
        raise PkiError(str(exc)) from None
    try:
        data = os.read(fd, MAX_PEM_BYTES + 1)
    finally:
        os.close(fd)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise PkiError(f"{what} {path} holds no unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{what} {path} is not an EC key")
    return key


def _public_der(key) -> bytes:
    """The DER of a public key, or of a private key's public half (to tell whether two belong together)."""
    if hasattr(key, "private_bytes"):
        key = key.public_key()
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


# --- what a certificate says ------------------------------------------------------------------------------


def names_of(cert: x509.Certificate) -> tuple[str, list[str], list[str]]:
    """(common name, sorted DNS names, sorted IP addresses) of a certificate."""
    common = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    common_name = str(common[0].value) if common else ""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return common_name, [], []
    dns = sorted({name.lower() for name in san.get_values_for_type(x509.DNSName)})
    ips = sorted({str(address) for address in san.get_values_for_type(x509.IPAddress)})
    return common_name, dns, ips


def wanted_names(common_name: str, dns_names: list[str], ip_addresses: list[str]):
    """The names as names_of reports them; PkiError for an address that is not one."""
    ips = set()
    for address in ip_addresses:
        try:
            ips.add(str(ipaddress.ip_address(str(address).strip())))
        except ValueError:
            raise PkiError(f"ip_addresses: {address!r} is not an IP address") from None
    for name in dns_names:
        if not name or any(char.isspace() or char in "/\\@:" for char in str(name)):
            raise PkiError(f"dns_names: {name!r} is not a DNS name")
    return common_name, sorted({str(name).lower() for name in dns_names}), sorted(ips)


def facts(cert: x509.Certificate) -> dict:
    """What the module returns about a certificate; sha256 of a CA's certificate is the cluster's CA pin."""
    not_after = cert.not_valid_after_utc
    der = cert.public_bytes(serialization.Encoding.DER)
    return {
        "not_after": not_after.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "days_left": days_left(not_after.timestamp(), _now().timestamp()),
        "serial": format(cert.serial_number, "x"),
        "sha256": hashlib.sha256(der).hexdigest(),
    }


def signed_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def reason_to_issue(
    cert: x509.Certificate | None,
    key,
    names: tuple[str, list[str], list[str]] | None,
    ca_cert: x509.Certificate | None,
    renew_before_days: int,
    compare_common_name: bool = True,
) -> str:
    """Why the certificate must be (re)issued, one of REASONS ("none": it is fine). `key` None: not
    checked (llorch_certificate_info); `names` None: not compared; `ca_cert` None: the issuer is not
    checked. A common name the caller did not set (derived from the first DNS name) is not compared: the
    order of the names alone must not issue again."""
    if cert is None:
        return "missing"
    if key is not None and _public_der(key) != _public_der(cert.public_key()):
        return "missing"  # the key that goes with it is gone: a certificate nobody can serve
    if ca_cert is not None and not signed_by(cert, ca_cert):
        return "other_ca"
    if names is not None:
        have = names_of(cert)
        if have[1:] != names[1:] or (compare_common_name and have[0] != names[0]):
            return "names_changed"
    if cert.not_valid_after_utc - _now() < datetime.timedelta(days=renew_before_days):
        return "expiring"
    return "none"


# --- issuing ---------------------------------------------------------------------------------------------


def new_key():
    return ec.generate_private_key(ec.SECP256R1())


def issue(
    kind: str,
    key,
    names: tuple[str, list[str], list[str]],
    valid_days: int,
    ca_cert: x509.Certificate | None = None,
    ca_key=None,
) -> x509.Certificate:
    """A CA certificate (self-signed, for `key`) or a server/client certificate that the CA signs."""
    common_name, dns, ips = names
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    not_after = now + datetime.timedelta(days=valid_days)
    if ca_cert is not None:  # never outlive the CA: a client would refuse the chain from then on
        not_after = min(not_after, ca_cert.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject if kind == "ca" else ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if kind == "ca":
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)
        return builder.add_extension(usage, critical=True).sign(key, hashes.SHA256())
    usage = x509.KeyUsage(True, False, False, False, False, False, False, False, False)
    purpose = ExtendedKeyUsageOID.SERVER_AUTH if kind == "server" else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.ExtendedKeyUsage([purpose]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    alt_names = [x509.DNSName(name) for name in dns] + [
        x509.IPAddress(ipaddress.ip_address(address)) for address in ips
    ]
    if alt_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


# --- writing ---------------------------------------------------------------------------------------------


def ensure_private_folder(path: str, what: str, create: bool = True) -> None:
    """The folder of a key file: created 0700 when missing (unless not `create`: check mode writes
    nothing); refused when group or others may enter it."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        if not create:
            return
        os.makedirs(folder, mode=0o700, exist_ok=True)
    mode = stat.S_IMODE(os.stat(folder).st_mode)
    if mode & 0o077:
        raise PkiError(
            f"the folder {folder} of {what} is open to group or others (mode {mode:04o}): "
            f"run chmod 700 {folder}"
        )


def write_file(path: str, data: bytes, mode: int) -> None:
    """Put `data` at `path` whole or not at all: a new file (O_EXCL|O_NOFOLLOW, `mode`) beside it, synced,
    then renamed over it (a link at `path` is replaced, never followed)."""
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, mode=0o700, exist_ok=True)
    temporary = os.path.join(folder, f".{name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        try:
            os.fchmod(fd, mode)  # the umask may have narrowed it; a certificate must stay readable
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temporary, path)
    except BaseException:
        if os.path.lexists(temporary):
            os.unlink(temporary)
        raise


def key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


# --- the module's one job ---------------------------------------------------------------------------------

NO_FACTS = {"not_after": None, "days_left": None, "serial": None, "sha256": None}


def _names_wanted(params: dict) -> tuple[str, list[str], list[str]]:
    kind = params["kind"]
    dns, ips = params["dns_names"] or [], params["ip_addresses"] or []
    if kind == "ca":
        dns, ips = [], []
    common_name = params["common_name"] or (
        DEFAULT_CA_NAME if kind == "ca" else (dns[0] if dns else (str(ips[0]) if ips else ""))
    )
    if not common_name:
        raise PkiError(f"a {kind} certificate needs common_name, dns_names or ip_addresses")
    return wanted_names(common_name, dns, ips)


def _common_name_set(params: dict) -> bool:
    return bool(params["common_name"]) or params["kind"] == "ca"


def _ca_pair(params: dict):
    """The CA's certificate and key (both must exist and belong together) for a server or client cert."""
    ca_path, ca_key_path = params["ca_path"], params["ca_private_key_path"]
    if not ca_path or not ca_key_path:
        raise PkiError(f"kind={params['kind']} needs ca_path and ca_private_key_path (the CA that signs it)")
    ca_cert = read_certificate(ca_path, "ca_path")
    ca_key = read_private_key(ca_key_path, "ca_private_key_path")
    if ca_cert is None or ca_key is None:
        missing = ca_path if ca_cert is None else ca_key_path
        raise PkiError(f"{missing} not found: create the CA first (kind: ca)")
    if _public_der(ca_key) != _public_der(ca_cert.public_key()):
        raise PkiError(f"ca_private_key_path {ca_key_path} is not the key of ca_path {ca_path}")
    return ca_cert, ca_key


def ensure_certificate(params: dict, check_mode: bool) -> dict:
    """Read, and when needed (re)issue, one certificate; llorch_certificate's result. Raises PkiError."""
    kind, path = params["kind"], params["path"]
    valid_days = params["valid_days"] or DEFAULT_VALID_DAYS[kind]
    renew_before_days = params["renew_before_days"]
    if valid_days < 1 or renew_before_days < 0 or renew_before_days >= valid_days:
        raise PkiError(
            f"renew_before_days ({renew_before_days}) must be at least 0 and less than valid_days "
            f"({valid_days}), else every run would issue again"
        )
    cert = read_certificate(path)
    names = _names_wanted(params)
    if kind == "server" and not names[1] and not names[2]:
        raise PkiError(
            "a server certificate needs dns_names or ip_addresses: clients check the name they dial"
        )
    key_path = params["private_key_path"]
    ensure_private_folder(key_path, "private_key_path", create=not check_mode)
    key = read_private_key(key_path)
    ca_cert, ca_key = (None, None) if kind == "ca" else _ca_pair(params)
    reason = reason_to_issue(cert, key, names, ca_cert, renew_before_days, _common_name_set(params))
    if reason == "none":
        return {"changed": False, "reason": reason, **facts(cert)}
    if check_mode:
        return {"changed": True, "reason": reason, **(facts(cert) if cert is not None else NO_FACTS)}
    # A CA keeps its key when it is renewed, so the certificates it signed keep verifying; a server or
    # client certificate gets a fresh key each time it is issued (the old one may have been copied around).
    if kind != "ca" or key is None:
        key = new_key()
        write_file(key_path, key_pem(key), 0o600)
    new = issue(kind, key, names, valid_days, ca_cert, ca_key)
    write_file(path, cert_pem(new), 0o644)
    return {"changed": True, "reason": reason, **facts(new)}


def certificate_info(params: dict) -> dict:
    """Read one certificate, never write; llorch_certificate_info's result. Raises PkiError.

    Only the names the caller gave are compared, so status checks can ask "still for these names?" without
    restating every name."""
    renew_before_days = params["renew_before_days"]
    if renew_before_days < 0:
        raise PkiError(f"renew_before_days ({renew_before_days}) must be at least 0")
    cert = read_certificate(params["path"])
    asked = params["common_name"] or params["dns_names"] or params["ip_addresses"]
    names = _names_wanted(params) if asked else None
    reason = reason_to_issue(cert, None, names, None, renew_before_days, _common_name_set(params))
    return {
        "changed": False,
        "exists": cert is not None,
        "reason": reason,
        **(facts(cert) if cert is not None else NO_FACTS),
    }


# --- CA rotation: a next CA beside the current one, trusted together, then promoted -------------------------
#
# <pki_dir>/ca.crt, ca.key        the current CA (what every role uses)
# <pki_dir>/next/ca.crt, ca.key   the CA a rotation moves to (0700 folder, key 0600), made once
# <pki_dir>/next/bundle.crt       current + next: what every host trusts while the two overlap
# <pki_dir>/retired/ca-<date>-<pin12>.crt   a promoted-away CA certificate, for the record; its key is deleted
#
# Each step is idempotent and resumable: a run stopped anywhere is finished by running it again.

NEXT_DIR = "next"
RETIRED_DIR = "retired"


def rotation_paths(pki_dir: str) -> dict:
    next_dir = os.path.join(pki_dir, NEXT_DIR)
    return {
        "ca_path": os.path.join(pki_dir, "ca.crt"),
        "ca_private_key_path": os.path.join(pki_dir, "ca.key"),
        "next_dir": next_dir,
        "next_ca_path": os.path.join(next_dir, "ca.crt"),
        "next_ca_private_key_path": os.path.join(next_dir, "ca.key"),
        "bundle_path": os.path.join(next_dir, "bundle.crt"),
        "retired_dir": os.path.join(pki_dir, RETIRED_DIR),
    }


def _pin(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _belongs(key_path: str, cert: x509.Certificate, what: str) -> bool:
    """Whether the key at key_path (owner-only, never a vaulted one: see below) is cert's."""
    key = read_private_key(key_path, what)
    return key is not None and _public_der(key) == _public_der(cert.public_key())


def _finish_promotion(paths: dict, check_mode: bool) -> bool:
    """A promotion stopped between its two renames (ca.crt already the next CA, its key still in next/):
    finished now. True when there was one to finish."""
    next_key = paths["next_ca_private_key_path"]
    if os.path.lexists(paths["next_ca_path"]) or not os.path.lexists(next_key):
        return False
    current = read_certificate(paths["ca_path"], "ca_path")
    if current is None or not _belongs(next_key, current, "the next CA's key"):
        raise PkiError(
            f"{next_key} is left without its certificate and is not the key of {paths['ca_path']}: "
            f"move {paths['next_dir']} aside by hand and start the rotation again"
        )
    if not check_mode:
        os.replace(next_key, paths["ca_private_key_path"])
        _remove_next_dir(paths)
    return True


def _remove_next_dir(paths: dict) -> None:
    bundle = paths["bundle_path"]
    if os.path.lexists(bundle):
        os.unlink(bundle)
    if os.path.isdir(paths["next_dir"]) and not os.listdir(paths["next_dir"]):
        os.rmdir(paths["next_dir"])


def ca_overlap(pki_dir: str, valid_days: int, common_name: str, check_mode: bool) -> dict:
    """The next CA (made once, with the current CA's common name so that the roles' later runs find
    nothing to change) and the bundle current + next. Returns both pins and the bundle's PEM (public).

    `finished_previous`: a promotion of an earlier run had stopped half-way; it is finished and nothing
    else is done (the hosts already trust only that CA: the promotion is the rotation's last step)."""
    paths = rotation_paths(pki_dir)
    if _finish_promotion(paths, check_mode):
        current = read_certificate(paths["ca_path"], "ca_path")
        return {"changed": True, "finished_previous": True, "current_sha256": _pin(current), **paths}
    current = read_certificate(paths["ca_path"], "ca_path")
    if current is None:
        raise PkiError(f"no CA at {paths['ca_path']}: run site.yml first, it makes one")
    made = ensure_certificate(
        {
            "kind": "ca",
            "path": paths["next_ca_path"],
            "private_key_path": paths["next_ca_private_key_path"],
            "common_name": common_name,
            "dns_names": [],
            "ip_addresses": [],
            "valid_days": valid_days,
            "renew_before_days": 30,
            "ca_path": None,
            "ca_private_key_path": None,
        },
        check_mode,
    )
    following = read_certificate(paths["next_ca_path"], "next CA")
    if following is None:  # check mode before the next CA exists
        return {"changed": True, "finished_previous": False, "current_sha256": _pin(current), **paths}
    if _pin(following) == _pin(current):
        raise PkiError(f"{paths['next_ca_path']} is the current CA itself: move {paths['next_dir']} aside")
    bundle = cert_pem(current) + cert_pem(following)
    changed = made["changed"] or _read_bounded(paths["bundle_path"], "bundle") != bundle
    if changed and not check_mode:
        write_file(paths["bundle_path"], bundle, 0o644)
    return {
        "changed": changed,
        "finished_previous": False,
        "current_sha256": _pin(current),
        "next_sha256": _pin(following),
        "bundle": bundle.decode("ascii"),
        **paths,
    }


def ca_promote(pki_dir: str, check_mode: bool) -> dict:
    """The next CA becomes the CA (ca.crt, ca.key). The current CA's certificate is kept under retired/
    (dated, for the record); its key is deleted: once no host trusts that CA it can sign nothing anyone
    accepts, and a key kept is a key that can leak (a rotation is often made because one did).

    The order makes a stop anywhere resumable: the record first, then ca.crt, then ca.key (a stop between
    the two is what _finish_promotion completes)."""
    paths = rotation_paths(pki_dir)
    if _finish_promotion(paths, check_mode):
        current = read_certificate(paths["ca_path"], "ca_path")
        return {"changed": True, "sha256": _pin(current), "retired": None, **paths}
    following = read_certificate(paths["next_ca_path"], "next CA")
    current = read_certificate(paths["ca_path"], "ca_path")
    if following is None:
        if current is None:
            raise PkiError(f"no CA at {paths['ca_path']} and none at {paths['next_ca_path']}")
        return {"changed": False, "sha256": _pin(current), "retired": None, **paths}  # nothing pending
    if not _belongs(paths["next_ca_private_key_path"], following, "the next CA's key"):
        raise PkiError(f"{paths['next_ca_private_key_path']} is not the key of {paths['next_ca_path']}")
    retired = None
    if current is not None:
        stamp = _now().strftime("%Y%m%d")
        retired = os.path.join(paths["retired_dir"], f"ca-{stamp}-{_pin(current)[:12]}.crt")
    if not check_mode:
        if retired is not None:
            write_file(retired, cert_pem(current), 0o644)
        os.replace(paths["next_ca_path"], paths["ca_path"])
        # Over the old key, plain or vaulted alike, in one rename.
        os.replace(paths["next_ca_private_key_path"], paths["ca_private_key_path"])
        _remove_next_dir(paths)
    return {"changed": True, "sha256": _pin(following), "retired": retired, **paths}

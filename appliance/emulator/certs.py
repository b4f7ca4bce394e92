"""A private test CA and a server certificate for the emulator, generated on first start.

The google-genai SDK always connects with ``wss://`` (FACTS), so the emulator must speak TLS with a
certificate the client can be told to trust. ``cryptography`` builds both in a few milliseconds; the CA
key never leaves the state directory and the server certificate is re-issued when the host changes.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_VALID_DAYS = 3650


@dataclass(frozen=True)
class CertPaths:
    """Files in the state directory: the CA clients must trust, and the server's certificate and key."""

    ca_file: Path
    cert_file: Path
    key_file: Path


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _names(hosts: list[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for host in dict.fromkeys(["localhost", "127.0.0.1", "::1", *hosts]):
        if not host or host in ("0.0.0.0", "::"):
            continue
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            out.append(x509.DNSName(host))
    return out


def ensure_certs(state_dir: str | os.PathLike[str], hosts: list[str] | None = None) -> CertPaths:
    """Create (once) the test CA and (when missing or for other hosts) the server certificate.

    A lock file serialises processes (the emulator and a client that needs the CA) so they never write a
    CA certificate and key from two different generations.
    """
    d = Path(state_dir)
    d.mkdir(parents=True, exist_ok=True)
    with open(d / ".certs.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return _ensure_locked(d, hosts)
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(lock, fcntl.LOCK_UN)


def _ensure_locked(d: Path, hosts: list[str] | None) -> CertPaths:
    paths = CertPaths(d / "emulator-ca.pem", d / "emulator-server.pem", d / "emulator-server.key")
    ca_key_file = d / "emulator-ca.key"
    now = dt.datetime.now(dt.UTC)
    if paths.ca_file.exists() and ca_key_file.exists():
        ca_cert = x509.load_pem_x509_certificate(paths.ca_file.read_bytes())
        ca_key = serialization.load_pem_private_key(ca_key_file.read_bytes(), password=None)
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "voice-appliance emulator test CA")])
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=_VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        _write_private(
            ca_key_file,
            ca_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
        )
        _write_public(paths.ca_file, ca_cert.public_bytes(serialization.Encoding.PEM))
        for stale in (paths.cert_file, paths.key_file):
            stale.unlink(missing_ok=True)
    wanted = _names(hosts or [])
    if paths.cert_file.exists() and paths.key_file.exists():
        cert = x509.load_pem_x509_certificate(paths.cert_file.read_bytes())
        try:
            have = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            if (
                all(n in have for n in wanted)
                and cert.issuer == ca_cert.subject
                and cert.not_valid_after_utc > now + dt.timedelta(days=1)
            ):
                return paths
        except x509.ExtensionNotFound:
            pass
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "voice-appliance emulator")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=_VALID_DAYS - 1))
        .add_extension(x509.SubjectAlternativeName(wanted), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    _write_private(
        paths.key_file,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )
    _write_public(paths.cert_file, cert.public_bytes(serialization.Encoding.PEM))
    return paths

"""TLS for daemons and pinned clients.

Each daemon makes a self-signed certificate at ``init``. Clients do not trust any CA: they
pin the SHA-256 fingerprint of that certificate (printed by ``init``). On first contact a
client fetches the server's certificate, checks its fingerprint, and from then on uses that
very certificate as the only trust anchor of its SSL context, so the TLS handshake itself
refuses any other server before a token is ever sent.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import ssl
import threading
from pathlib import Path
from urllib.parse import urlsplit

from tandem.errors import CertificateMismatch, Unreachable


def make_self_signed(cert_path: Path, key_path: Path, name: str, hosts: list[str]) -> str:
    """Write a new key and self-signed certificate; returns the certificate's fingerprint."""
    # Imported here: only `init` makes certificates, and every CLI call imports this module.
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"tandem {name}")])
    sans: list[x509.GeneralName] = []
    for h in {*hosts, "localhost", "127.0.0.1"}:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return fingerprint_of_pem(cert_path.read_text())


def fingerprint_of_der(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def fingerprint_of_pem(pem: str) -> str:
    return fingerprint_of_der(ssl.PEM_cert_to_DER_cert(pem))


def normalize_fingerprint(fp: str) -> str:
    """Accept 'AB:CD:…' or 'abcd…' forms."""
    return fp.replace(":", "").strip().lower()


_contexts: dict[tuple[str, int, str], ssl.SSLContext] = {}
_lock = threading.Lock()


def pinned_context(url: str, fingerprint: str, timeout: float = 10.0) -> ssl.SSLContext:
    """An SSL context that accepts only the server certificate with ``fingerprint``."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 443
    fp = normalize_fingerprint(fingerprint)
    key = (host, port, fp)
    with _lock:
        ctx = _contexts.get(key)
    if ctx is not None:
        return ctx
    try:
        pem = ssl.get_server_certificate((host, port), timeout=timeout)
    except (OSError, ssl.SSLError) as exc:
        raise Unreachable(what="server", name=host, url=url, reason=str(exc)) from exc
    actual = fingerprint_of_pem(pem)
    if actual != fp:
        raise CertificateMismatch(url=url, actual=actual, expected=fp)
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=pem)
    ctx.check_hostname = False  # the pinned certificate itself is the identity
    ctx.verify_mode = ssl.CERT_REQUIRED
    with _lock:
        _contexts[key] = ctx
    return ctx


def forget_pins() -> None:
    """Drop cached contexts (after a peer is re-paired with a new certificate)."""
    with _lock:
        _contexts.clear()

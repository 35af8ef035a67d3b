"""TLS for daemons and pinned clients.

Each daemon makes a self-signed certificate at ``init``. Clients do not trust any CA: they
pin the SHA-256 fingerprint of that certificate (printed by ``init``). The pin is checked
inside the one handshake a connection makes (``pinned_context``): once the server has proven
it holds the key of the certificate it presented, the client compares that certificate's
fingerprint with the pin and drops the connection on a mismatch, before a single byte of a
request (and so the token) is written. No extra connection fetches the certificate first.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import ssl
import threading
from pathlib import Path
from urllib.parse import urlsplit

from tandem.errors import CertificateMismatch


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


class _PinnedSocket(ssl.SSLSocket):
    """A client TLS socket that checks its context's pin as the handshake completes."""

    def do_handshake(self, block: bool = False) -> None:
        super().do_handshake(block)
        context = self.context
        if isinstance(context, PinnedContext):
            try:
                context.check(self.getpeercert(binary_form=True))
            except CertificateMismatch:
                self.close()
                raise


class _PinnedObject(ssl.SSLObject):
    """The same check for TLS over memory buffers (asyncio's transports)."""

    def do_handshake(self) -> None:
        super().do_handshake()
        context = self.context
        if isinstance(context, PinnedContext):
            context.check(self.getpeercert(binary_form=True))


class PinnedContext(ssl.SSLContext):
    """A client SSL context that accepts exactly one server certificate: the one whose
    SHA-256 fingerprint is the pin. The chain is not verified against any CA (there is
    none: the daemons' certificates are self-signed); the handshake still proves that the
    server holds the certificate's private key (its signature over the handshake), and the
    pin check runs as the handshake completes, before the caller can send anything."""

    sslsocket_class = _PinnedSocket
    sslobject_class = _PinnedObject
    pin_url: str
    pin: str

    def check(self, der: bytes | None) -> None:
        """Raise CertificateMismatch unless ``der`` is the pinned certificate."""
        actual = fingerprint_of_der(der) if der else "(none)"
        if actual != self.pin:
            raise CertificateMismatch(url=self.pin_url, actual=actual, expected=self.pin)


_contexts: dict[tuple[str, int, str], PinnedContext] = {}
_lock = threading.Lock()


def pinned_context(url: str, fingerprint: str) -> ssl.SSLContext:
    """An SSL context that accepts only the server certificate with ``fingerprint``.

    Making it contacts no one: the check happens in the handshake of each connection made
    with it (see ``PinnedContext``), which raises CertificateMismatch on another server."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 443
    fp = normalize_fingerprint(fingerprint)
    key = (host, port, fp)
    with _lock:
        ctx = _contexts.get(key)
        if ctx is None:
            ctx = PinnedContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False  # the pinned certificate itself is the identity
            ctx.verify_mode = ssl.CERT_NONE  # no CA to verify against: the pin decides
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.pin_url, ctx.pin = url, fp
            _contexts[key] = ctx
    return ctx


def forget_pins() -> None:
    """Drop cached contexts (after a peer is re-paired with a new certificate)."""
    with _lock:
        _contexts.clear()

"""Self-signed TLS certificates (ECDSA P-256) and SHA-256 fingerprint pinning.

A board's cert is self-signed; clients pin its fingerprint from the join URL
(``https://HOST:PORT/#sha256=<hex>``) or from a LAN peer's TXT record, so no CA is needed. A join URL
may also carry an admission token (``#sha256=<hex>&token=<token>``, hub/tokens.py): in the fragment,
which HTTP clients never send, so it reaches the hub only in the registration's header.

TLS 1.2 is limited to AEAD suites with forward secrecy (ECDHE + AES-GCM or ChaCha20-Poly1305): the CBC
suites OpenSSL enables by default are refused (Lucky13-style padding oracles; no client of panal needs
them). TLS 1.3's suites are all AEAD and stay as OpenSSL sets them.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from security.errors import BadRequest

__all__ = ["TLS12_CIPHERS", "BoardAddress", "cert_dns_names", "cert_fingerprint", "join_token", "make_self_signed",
           "server_context"]

#: the TLS 1.2 suites a board offers: ECDHE key exchange, AEAD only (no CBC, no static RSA)
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


def make_self_signed(cert_path: Path, key_path: Path, hosts: list[str], days: int = 3650,
                     include_hostname: bool = True) -> str:
    """Write a self-signed ECDSA P-256 cert for ``hosts``; return its SHA-256 fingerprint (hex).

    ``include_hostname=False`` leaves this machine's hostname out: a volunteer's LAN board shows its
    certificate to every peer, and a hostname often carries its owner's name (clients pin the
    fingerprint, so no client needs the name)."""
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    local = [socket.gethostname()] if include_hostname else []
    for host in dict.fromkeys([*hosts, "localhost", "127.0.0.1", *local]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"panal board {hosts[0]}")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))
    return cert_fingerprint(cert_path)


def cert_dns_names(cert_path: Path) -> list[str]:
    """The DNS names a certificate's subjectAltName lists (what it tells anyone who connects)."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    try:
        alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(alt.get_values_for_type(x509.DNSName))


def cert_fingerprint(cert_path: Path) -> str:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def server_context(cert_path: Path, key_path: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)   # TLS 1.2 only: TLS 1.3 suites are set apart (all AEAD)
    ctx.load_cert_chain(cert_path, key_path)
    return ctx


@dataclass(frozen=True)
class BoardAddress:
    """Where a board is and how to trust it: its base URL and, for HTTPS, the pinned fingerprint.

    A board served by several hubs on one database (an active one and standbys, hub/election.py) has
    one address per hub: ``alternates`` are the others, each pinned to its own certificate. The join
    URL carries them as ``&also=HOST:PORT@<sha256 hex>`` (same scheme; no ``@...`` for plain HTTP)."""

    url: str
    fingerprint: str | None = None
    alternates: tuple[BoardAddress, ...] = ()

    @property
    def is_tls(self) -> bool:
        return self.url.startswith("https://")

    @classmethod
    def parse(cls, text: str) -> BoardAddress:
        """Parse a join URL ``https://host:port/#sha256=<hex>[&also=host2:port@<hex>...]`` or a plain
        ``http(s)://`` URL."""
        try:
            parts = urlsplit(text.strip())
            _port = parts.port   # (read to check it: ValueError when out of range)
        except ValueError:   # an unclosed "[" (IPv6), a port out of range: a clear 400, never a traceback
            raise BadRequest(f"not a board URL (expected https://HOST:PORT/#sha256=...): {text!r}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BadRequest(f"not a board URL (expected https://HOST:PORT/#sha256=...): {text!r}")
        fingerprint = _fragment(parts.fragment).get("sha256")
        base = urlunsplit((parts.scheme, parts.netloc, "", "", ""))
        alternates = tuple(_alternate(parts.scheme, value) for value in _also(parts.fragment))
        return cls(base, fingerprint, alternates)

    def hubs(self) -> tuple[BoardAddress, ...]:
        """Every hub of this board, this address's own first (each without alternates)."""
        return (BoardAddress(self.url, self.fingerprint), *self.alternates)

    def join_url(self, token: str | None = None) -> str:
        """``https://HOST:PORT/#sha256=<hex>`` (and ``&token=<token>`` when given, then ``&also=...``)."""
        params = [f"sha256={self.fingerprint}"] if self.fingerprint else []
        params += [f"token={token}"] if token else []
        for other in self.alternates:
            netloc = urlsplit(other.url).netloc
            params.append(f"also={netloc}@{other.fingerprint}" if other.fingerprint else f"also={netloc}")
        return f"{self.url}/#{'&'.join(params)}" if params else self.url

    def check_transport(self, insecure: bool = False) -> None:
        """Plain HTTP is allowed only to loopback or with an explicit ``--insecure`` (for every hub)."""
        for other in self.alternates:
            other.check_transport(insecure)
        if self.is_tls:
            if not self.fingerprint:
                raise BadRequest(f"{self.url}: an https board needs a pinned fingerprint (#sha256=...)")
            return
        host = urlsplit(self.url).hostname or ""
        if not insecure and not _is_loopback(host):
            raise BadRequest(f"{self.url}: plain HTTP is only allowed to loopback; use the https join "
                             "URL or pass --insecure")


def join_token(text: str) -> str | None:
    """The admission token a join URL carries (``#...&token=<token>``), if any."""
    return _fragment(urlsplit(text.strip()).fragment).get("token")


def _fragment(fragment: str) -> dict[str, str]:
    """A join URL's fragment: ``sha256=<64 hex>`` and optionally ``token=<token>``, joined by ``&``."""
    values: dict[str, str] = {}
    for part in filter(None, fragment.split("&")):
        key, _, value = part.partition("=")
        if key == "sha256":
            value = value.replace(":", "").lower()
            if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
                raise BadRequest(f"join URL fragment must be #sha256=<64 hex digits>, got #{fragment}")
        elif key == "also":
            continue   # checked by _also
        elif key == "token":
            if not value or not all(c.isascii() and (c.isalnum() or c in "._-") for c in value):
                raise BadRequest(f"join URL token must be the text `panal hub tokens create` printed, got {value!r}")
        else:
            raise BadRequest(f"join URL fragment must be #sha256=<64 hex digits>[&token=...][&also=...], "
                             f"got #{fragment}")
        values[key] = value
    return values


def _also(fragment: str) -> list[str]:
    """The ``also=`` values of a join URL's fragment (other hubs of the same board), in order."""
    return [part.partition("=")[2] for part in filter(None, fragment.split("&")) if part.startswith("also=")]


def _alternate(scheme: str, value: str) -> BoardAddress:
    """``HOST:PORT@<sha256 hex>`` (https) or ``HOST:PORT`` (http) -> the address of another hub."""
    netloc, at, pin = value.partition("@")
    try:
        parts = urlsplit(f"{scheme}://{netloc}")
        port = parts.port
    except ValueError:   # an unclosed "[", a port out of range
        parts, port = urlsplit(f"{scheme}://"), None
    if not parts.hostname or port is None or parts.path or parts.query or parts.fragment or parts.username \
            or (scheme == "https") != bool(at):
        raise BadRequest(f"join URL: also= names another hub as HOST:PORT@<sha256 hex> (https) or HOST:PORT "
                         f"(http), got {value!r}")
    try:
        fingerprint = _fragment(f"sha256={pin}")["sha256"] if at else None
    except BadRequest:
        raise BadRequest(f"join URL: also={value!r} must end in @<64 hex digits> (that hub's certificate "
                         "fingerprint)") from None
    return BoardAddress(f"{scheme}://{netloc}", fingerprint)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

"""A throwaway PKI for the sandbox: a test CA, the certificates it signs, an untrusted one."""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from eobblast._files import file_lock, write_whole

CA_VALIDITY = dt.timedelta(days=3650)
LEAF_VALIDITY = dt.timedelta(days=825)
# Files that expire within this margin are re-issued, so a long demo run never crosses expiry.
RENEW_BEFORE = dt.timedelta(days=30)
# Clocks of the client and a freshly issued certificate may disagree by a little.
BACKDATE = dt.timedelta(hours=1)
# The expired certificate ended this long ago: far beyond any clock skew a client tolerates.
EXPIRED_FOR = dt.timedelta(days=1)
# The only name on the wrong-host certificate; .invalid (RFC 2606) can never be a real domain.
WRONG_HOST_NAME = "wrong-host.sandbox.invalid"

_CA_NAME = "eobblast sandbox test CA"
_UNTRUSTED_NAME = "eobblast sandbox untrusted server"

_PrivateKey = ec.EllipticCurvePrivateKey


@dataclass(frozen=True, slots=True)
class TestPki:
    """Paths of the PEM files written by make_test_pki."""

    __test__ = False  # not a pytest test class, despite the name

    directory: Path
    ca: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    untrusted_cert: Path
    untrusted_key: Path
    expired_cert: Path
    expired_key: Path
    wrong_host_cert: Path
    wrong_host_key: Path


def make_test_pki(directory: Path, hostnames: Sequence[str]) -> TestPki:
    """Write (or reuse) a test CA, its valid, expired and wrong-host leaves, a self-signed one."""
    if not hostnames:
        raise ValueError("make_test_pki needs at least one hostname")
    directory.mkdir(parents=True, exist_ok=True)
    pki = TestPki(
        directory=directory,
        ca=directory / "ca.pem",
        ca_key=directory / "ca.key",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        untrusted_cert=directory / "untrusted.pem",
        untrusted_key=directory / "untrusted.key",
        expired_cert=directory / "expired.pem",
        expired_key=directory / "expired.key",
        wrong_host_cert=directory / "wrong-host.pem",
        wrong_host_key=directory / "wrong-host.key",
    )
    wanted = _san_entries(hostnames)
    wrong = _san_entries([WRONG_HOST_NAME])
    if set(wrong) & set(wanted):
        raise ValueError(f"{WRONG_HOST_NAME} is reserved for the wrong-host certificate")
    now = dt.datetime.now(dt.UTC)
    expired_window = (now - 2 * EXPIRED_FOR, now - EXPIRED_FOR)
    # Several processes (tests, the demo, a sandbox CLI) may share one directory.
    with file_lock(directory / ".pki.lock"):
        ca = _load_valid_ca(pki, now)
        if ca is None:
            # Every CA-signed leaf below then fails its issuer check and is re-issued.
            ca = _issue_ca(now)
            _write_pair(pki.ca, pki.ca_key, ca)
        if not _reusable_leaf(pki.server_cert, pki.server_key, wanted, ca[0], now):
            _write_pair(pki.server_cert, pki.server_key, _issue_leaf(wanted, ca, now))
        if not _reusable_leaf(pki.untrusted_cert, pki.untrusted_key, wanted, None, now):
            _write_pair(pki.untrusted_cert, pki.untrusted_key, _issue_leaf(wanted, None, now))
        # It names every host, so expiry is the only reason a client rejects it.
        if not _reusable_leaf(pki.expired_cert, pki.expired_key, wanted, ca[0], now, expired=True):
            leaf = _issue_leaf(wanted, ca, now, window=expired_window)
            _write_pair(pki.expired_cert, pki.expired_key, leaf)
        # Valid and CA-signed, so the host name is the only reason a client rejects it.
        if not _reusable_leaf(
            pki.wrong_host_cert, pki.wrong_host_key, wrong, ca[0], now, avoid=wanted
        ):
            _write_pair(pki.wrong_host_cert, pki.wrong_host_key, _issue_leaf(wrong, ca, now))
    return pki


def certificate_verifies(cert_path: Path, ca_path: Path, hostname: str) -> bool:
    """Whether a client trusting only the CA in ca_path accepts cert_path for hostname now."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
    except (OSError, ValueError):
        return False
    names = _san_entries([hostname])
    name = names[0] if names else None
    if not isinstance(name, x509.DNSName | x509.IPAddress):
        return False
    try:
        verifier = PolicyBuilder().store(Store([ca])).build_server_verifier(name)
        verifier.verify(cert, [])
    except (VerificationError, ValueError):
        return False
    return True


def certificate_dns_names(cert_path: Path) -> frozenset[str]:
    """The DNS names (lower case) a PEM certificate's SubjectAlternativeName lists."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return frozenset()
    return frozenset(name.lower() for name in san.get_values_for_type(x509.DNSName))


def _san_entries(hostnames: Sequence[str]) -> list[x509.GeneralName]:
    entries: list[x509.GeneralName] = []
    seen: set[str] = set()
    for raw in hostnames:
        name = raw.strip().lower().rstrip(".")
        if not name or name in seen:
            continue
        seen.add(name)
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return entries


def _issue_ca(now: dt.datetime) -> tuple[x509.Certificate, _PrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, _CA_NAME)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _issue_leaf(
    sans: list[x509.GeneralName],
    ca: tuple[x509.Certificate, _PrivateKey] | None,
    now: dt.datetime,
    *,
    window: tuple[dt.datetime, dt.datetime] | None = None,
) -> tuple[x509.Certificate, _PrivateKey]:
    """A server certificate signed by ca (self-signed when None), valid now or over window."""
    key = ec.generate_private_key(ec.SECP256R1())
    first = sans[0]
    common_name = str(first.value) if isinstance(first, x509.DNSName) else _UNTRUSTED_NAME
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    if ca is None:
        issuer_name, signing_key = subject, key
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key())
    else:
        issuer_name, signing_key = ca[0].subject, ca[1]
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca[1].public_key())
    not_before, not_after = window or (now - BACKDATE, now + LEAF_VALIDITY)
    if ca is not None:
        not_after = min(not_after, ca[0].not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(aki, critical=False)
        .sign(signing_key, hashes.SHA256())
    )
    return cert, key


def _load_pair(cert_path: Path, key_path: Path) -> tuple[x509.Certificate, _PrivateKey] | None:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return None
    if not isinstance(key, _PrivateKey) or key.public_key() != cert.public_key():
        return None
    return cert, key


def _fresh(cert: x509.Certificate, now: dt.datetime) -> bool:
    return cert.not_valid_before_utc <= now and now + RENEW_BEFORE < cert.not_valid_after_utc


def _load_valid_ca(pki: TestPki, now: dt.datetime) -> tuple[x509.Certificate, _PrivateKey] | None:
    pair = _load_pair(pki.ca, pki.ca_key)
    if pair is None or not _fresh(pair[0], now):
        return None
    try:
        constraints = pair[0].extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return None
    return pair if constraints.ca else None


def _reusable_leaf(
    cert_path: Path,
    key_path: Path,
    wanted: list[x509.GeneralName],
    issuer: x509.Certificate | None,
    now: dt.datetime,
    *,
    expired: bool = False,
    avoid: list[x509.GeneralName] | None = None,
) -> bool:
    """Whether the existing leaf is fresh (or expired), names wanted but not avoid, has issuer."""
    pair = _load_pair(cert_path, key_path)
    if pair is None:
        return False
    cert = pair[0]
    if expired:
        if not cert.not_valid_after_utc < now:
            return False
    elif not _fresh(cert, now):
        return False
    try:
        san = set(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return False
    if not set(wanted) <= san or san & set(avoid or ()):
        return False
    try:
        # The untrusted certificate must stay self-signed: a CA-signed one would verify.
        cert.verify_directly_issued_by(issuer if issuer is not None else cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _write_pair(
    cert_path: Path, key_path: Path, pair: tuple[x509.Certificate, _PrivateKey]
) -> None:
    cert, key = pair
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # A reader (a server starting up) never sees a half-written PEM file.
    write_whole(key_path, key_pem, mode=0o600)
    write_whole(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)

"""S/MIME certificates for synthetic members (demo and tests): key and certificate on disk."""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


class MemberCertificates:
    """Issues self-signed S/MIME certificates and keeps each member's key for decryption."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    def paths(self, address: str) -> tuple[Path, Path]:
        """(key, certificate) files of an address; named by a hash, never by the address."""
        stem = hashlib.sha256(address.lower().encode()).hexdigest()[:24]
        return self._directory / f"{stem}.key.pem", self._directory / f"{stem}.cert.pem"

    def __call__(self, address: str) -> str:
        """The certificate PEM for `address`, issued on first use."""
        key_path, cert_path = self.paths(address)
        if cert_path.exists():
            return cert_path.read_text("ascii")
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        now = dt.datetime.now(dt.UTC)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "eobblast demo member")])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=365))
            .add_extension(x509.SubjectAlternativeName([x509.RFC822Name(address)]), False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), False)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=True,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                True,
            )
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
        pem = cert.public_bytes(serialization.Encoding.PEM).decode("ascii")
        cert_path.write_text(pem, "ascii")
        return pem

"""S/MIME: a rendered EOB encrypted to the member, checked with `openssl cms` and dkimpy.

The verifiers are ones we did not write: OpenSSL's CMS decryption recovers the inner
entity byte for byte, and dkimpy verifies the DKIM signature over the encrypted message.
"""

from __future__ import annotations

import base64
import datetime as dt
import email
import email.policy
import re
import shutil
import subprocess
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import dkim
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from eobblast.errors import EobblastError
from eobblast.events import EobIssued, validate_event
from eobblast.events.synthetic import Mix, generate_events
from eobblast.protect.dkim import DkimSigner, generate_keys, load_signer
from eobblast.protect.policy import RecipientFacts, certificate_usable
from eobblast.protect.smime import SmimeError, encrypt_entity, mime_entity, smime_message
from eobblast.render import RenderedMessage, Renderer

OPENSSL = shutil.which("openssl")
pytestmark = pytest.mark.skipif(OPENSSL is None, reason="openssl CLI not installed")

NOW = dt.datetime(2026, 11, 26, 9, 0, tzinfo=dt.UTC)
CLEAN = Mix(no_consent=0, invalid_address=0, malformed=0, unknown_user=0, busy_mailbox=0, gone=0)
SELECTOR = "eob1"


@dataclass(frozen=True, slots=True)
class Member:
    key: rsa.RSAPrivateKey
    cert: x509.Certificate
    cert_pem: Path
    key_pem: Path


def issue_member(directory: Path, address: str, name: str) -> Member:
    """An RSA key and a self-signed S/MIME certificate for `address`, written as PEM files."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName([x509.RFC822Name(address)]), critical=False)
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
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_pem = directory / "cert.pem"
    key_pem = directory / "key.pem"
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return Member(key, cert, cert_pem, key_pem)


@pytest.fixture(scope="module")
def events() -> list[EobIssued]:
    # Three events: English and Spanish renderings both get through.
    out = []
    for raw in generate_events(3, seed=11, mix=CLEAN, now=NOW):
        event = validate_event(raw, allow_test_domains=True)
        assert isinstance(event, EobIssued)
        out.append(event)
    return out


@pytest.fixture(scope="module")
def event(events: list[EobIssued]) -> EobIssued:
    return events[0]


@pytest.fixture(scope="module")
def rendered(event: EobIssued) -> RenderedMessage:
    return Renderer().render(event, now=NOW)


@pytest.fixture(scope="module")
def member(tmp_path_factory: pytest.TempPathFactory, event: EobIssued) -> Member:
    return issue_member(tmp_path_factory.mktemp("member"), event.member.email, event.member.name)


@pytest.fixture(scope="module")
def stranger(tmp_path_factory: pytest.TempPathFactory) -> Member:
    return issue_member(tmp_path_factory.mktemp("stranger"), "b@other.example", "Someone Else")


@pytest.fixture(scope="module")
def dkim_setup(
    tmp_path_factory: pytest.TempPathFactory, event: EobIssued
) -> tuple[DkimSigner, dict[bytes, bytes]]:
    key_dir = tmp_path_factory.mktemp("dkim")
    domain = event.payer.sending_domain
    records = {
        (r.name + ".").encode(): r.value.encode()
        for r in generate_keys(key_dir, domain, SELECTOR, ed25519=False)
    }
    return load_signer(key_dir, domain, SELECTOR, ed25519=False), records


def openssl_decrypt(
    message: bytes, member: Member, tmp_path: Path, *, with_recip: bool = True
) -> subprocess.CompletedProcess[bytes]:
    msg = tmp_path / "msg.eml"
    msg.write_bytes(message)
    out = tmp_path / "out.bin"
    out.unlink(missing_ok=True)
    args = [str(OPENSSL), "cms", "-decrypt", "-in", str(msg), "-inkey", str(member.key_pem)]
    if with_recip:
        args += ["-recip", str(member.cert_pem)]
    result = subprocess.run([*args, "-out", str(out)], capture_output=True, timeout=30, check=False)
    return subprocess.CompletedProcess(
        result.args, result.returncode, out.read_bytes() if out.exists() else b"", result.stderr
    )


def phi_strings(event: EobIssued) -> list[str]:
    """Values that must never appear outside the encryption."""
    claim = event.claim
    values = [
        event.member.name,
        event.member.id,
        claim.id,
        claim.patient_name,
        claim.provider.name,
        claim.provider.npi,
    ]
    for line in claim.lines:
        for field in ("billed", "allowed", "plan_paid", "member_owes"):
            amount = Decimal(getattr(line, field))
            if amount >= 1:  # "0.00"-like amounts are not identifying, and too generic
                values += [str(getattr(line, field)), f"{amount:,.2f}"]
    return values


def test_openssl_recovers_the_entity_byte_for_byte(
    rendered: RenderedMessage, member: Member, tmp_path: Path, event: EobIssued
) -> None:
    entity = mime_entity(rendered)
    protected = smime_message(rendered, member.cert)
    result = openssl_decrypt(protected.to_bytes(), member, tmp_path)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    # Binary mode: no canonicalisation on either side, so the bytes are exactly ours.
    assert result.stdout == entity
    assert event.member.name in plain_text(result.stdout)


def plain_text(entity: bytes) -> str:
    """The decoded text/plain part of a MIME entity (quoted-printable undone)."""
    parsed = email.message_from_bytes(entity, policy=email.policy.default)
    assert isinstance(parsed, email.message.EmailMessage)
    plain = parsed.get_body(("plain",))
    assert plain is not None
    content: str = plain.get_content()
    return content


def test_inner_entity_is_the_eob_and_outer_message_carries_no_phi(
    events: list[EobIssued], member: Member
) -> None:
    renderer = Renderer()
    for event in events:
        rendered = renderer.render(event, now=NOW)
        entity = mime_entity(rendered)
        assert entity.startswith(b"Content-Type: multipart/alternative; boundary=")
        assert b"\r\nContent-Language: " in entity.split(b"\r\n\r\n", 1)[0]
        assert entity.endswith(rendered.body)
        inner = plain_text(entity)
        outer = smime_message(rendered, member.cert).to_bytes()
        for value in phi_strings(event):
            # The member id is not printed in the EOB; everything else must be inside,
            # or its absence outside would prove nothing.
            assert value == event.member.id or value in inner
            assert value.encode() not in outer, "PHI found outside the encryption"
        head = outer.split(b"\r\n\r\n", 1)[0].decode("ascii")
        for token in re.findall(r"\w{3,}", event.member.name):
            assert token.lower() not in head.lower()


def test_outer_message_shape(rendered: RenderedMessage, member: Member) -> None:
    protected = smime_message(rendered, member.cert)
    names = [n.decode().lower() for n, _ in protected.headers]
    assert names == [
        "from",
        "to",
        "subject",
        "date",
        "message-id",
        "mime-version",
        "x-eob-event-id",
        "content-type",
        "content-disposition",
        "content-transfer-encoding",
    ]
    values = dict(protected.headers)
    kept = dict(rendered.headers)
    for name in (b"From", b"To", b"Subject", b"Date", b"Message-ID", b"X-EOB-Event-ID"):
        assert values[name] == kept[name]
    assert values[b"Content-Type"] == (
        b"application/pkcs7-mime; smime-type=enveloped-data; name=smime.p7m"
    )
    assert values[b"Content-Disposition"] == b"attachment; filename=smime.p7m"
    assert values[b"Content-Transfer-Encoding"] == b"base64"
    assert (protected.mail_from, protected.rcpt_to) == (rendered.mail_from, rendered.rcpt_to)

    body = protected.body
    assert body.endswith(b"\r\n") and b"\n" not in body.replace(b"\r\n", b"")
    lines = body.split(b"\r\n")[:-1]
    assert all(len(line) <= 76 for line in lines) and len(lines[0]) == 76
    der = base64.b64decode(body)
    # A CMS EnvelopedData that cryptography itself decrypts back to the entity.
    assert pkcs7.pkcs7_decrypt_der(der, member.cert, member.key, []) == mime_entity(rendered)
    # The stdlib reads it as one pkcs7-mime attachment.
    parsed = email.message_from_bytes(protected.to_bytes(), policy=email.policy.default)
    assert parsed.get_content_type() == "application/pkcs7-mime"
    assert parsed.get_param("smime-type") == "enveloped-data"
    assert parsed.get_content() == der


def test_aes256_is_the_content_cipher(
    rendered: RenderedMessage, member: Member, tmp_path: Path
) -> None:
    der_file = tmp_path / "env.der"
    der_file.write_bytes(encrypt_entity(mime_entity(rendered), member.cert))
    result = subprocess.run(
        [str(OPENSSL), "cms", "-cmsout", "-print", "-inform", "DER", "-in", str(der_file)],
        capture_output=True,
        timeout=30,
        check=True,
    )
    dump = result.stdout.decode()
    assert "aes-256-cbc" in dump
    assert "rsaEncryption" in dump


def test_signed_smime_message_verifies_with_dkimpy_and_decrypts(
    rendered: RenderedMessage,
    member: Member,
    dkim_setup: tuple[DkimSigner, dict[bytes, bytes]],
    tmp_path: Path,
) -> None:
    signer, records = dkim_setup
    protected = smime_message(rendered, member.cert)
    lines = signer.sign(protected.headers, protected.body)
    signed = protected.to_bytes(lines)
    assert dkim.verify(signed, dnsfunc=lambda name, timeout=5: records.get(name))
    # The signature covers the S/MIME Content-Type, and the ciphertext through the body hash.
    tag_h = re.search(rb"h=([^;]*);", signed.replace(b"\r\n ", b""))
    assert tag_h is not None and b"content-type" in tag_h.group(1)
    tampered = signed.replace(protected.body[:20], b"A" * 20, 1)
    assert not dkim.verify(tampered, dnsfunc=lambda name, timeout=5: records.get(name))
    # The signed message, DKIM header on top, still decrypts with openssl.
    result = openssl_decrypt(signed, member, tmp_path)
    assert result.returncode == 0 and result.stdout == mime_entity(rendered)


def test_another_key_cannot_decrypt(
    rendered: RenderedMessage, member: Member, stranger: Member, tmp_path: Path, event: EobIssued
) -> None:
    message = smime_message(rendered, member.cert).to_bytes()
    # Naming B as the recipient: OpenSSL finds no matching RecipientInfo.
    named = openssl_decrypt(message, stranger, tmp_path)
    assert named.returncode != 0
    assert named.stdout == b""
    # Key B alone: OpenSSL tries it on every RecipientInfo and must fail (or, because of
    # its Bleichenbacher countermeasure, produce garbage that is never the EOB).
    keyed = openssl_decrypt(message, stranger, tmp_path, with_recip=False)
    assert keyed.returncode != 0 or keyed.stdout != mime_entity(rendered)
    assert event.member.name.encode() not in keyed.stdout


def test_member_certificate_is_usable_per_policy(member: Member, event: EobIssued) -> None:
    pem = member.cert_pem.read_text()
    facts = RecipientFacts.for_member(event.member.email, pem)
    assert facts.certificate == member.cert
    assert certificate_usable(member.cert, event.member.email, NOW) is None


def test_non_rsa_certificate_raises_and_returns_nothing(rendered: RenderedMessage) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ec member")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(SmimeError) as err:
        smime_message(rendered, cert)
    assert isinstance(err.value, EobblastError)
    assert str(err.value) == "internal_error: S/MIME encryption failed (TypeError)"


def test_message_without_content_type_is_refused(member: Member) -> None:
    bare = RenderedMessage(((b"From", b"a@payer.test"),), b"secret\r\n", "a@payer.test", "b@x")
    with pytest.raises(SmimeError, match="no Content-Type"):
        smime_message(bare, member.cert)


def test_single_part_entity_keeps_its_transfer_encoding(member: Member, tmp_path: Path) -> None:
    message = RenderedMessage(
        (
            (b"From", b"eob@payer.test"),
            (b"To", b"b@member.example"),
            (b"Content-Type", b"text/plain; charset=utf-8"),
            (b"Content-Transfer-Encoding", b"quoted-printable"),
        ),
        b"Gr=C3=BC=C3=9Fe\r\nline two\r\n",
        "eob@payer.test",
        "b@member.example",
    )
    entity = mime_entity(message)
    assert entity == (
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
        b"Gr=C3=BC=C3=9Fe\r\nline two\r\n"
    )
    protected = smime_message(message, member.cert)
    assert [n for n, _ in protected.headers][:2] == [b"From", b"To"]
    assert b"MIME-Version" in dict(protected.headers)  # added when the input lacked it
    result = openssl_decrypt(protected.to_bytes(), member, tmp_path)
    assert result.returncode == 0 and result.stdout == entity

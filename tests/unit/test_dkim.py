"""DKIM signing round-trips through dkimpy's verifier; key files and DNS records are right."""

from __future__ import annotations

import base64
import hashlib
import re
import stat
from collections.abc import Callable
from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path

import dkim
import orjson
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from dkim.canonicalization import CanonicalizationPolicy

from eobblast.errors import ConfigError, EobblastError
from eobblast.events import EobIssued, validate_event
from eobblast.events.synthetic import generate_events
from eobblast.pipeline import MISSING_KEY_RETRY, MISSING_KEYS_KEPT, SignerStore
from eobblast.protect.dkim import (
    DkimSigner,
    DnsRecord,
    _fold_at_spaces,
    _relaxed_value,
    _signed_header_data,
    generate_keys,
    load_signer,
    relaxed_body,
    signing_domains,
)
from eobblast.render import Renderer
from tests.conftest import CLEAN

DOMAIN = "payer.test"
SELECTOR = "eob1"
NOW = 1_717_000_000


@pytest.fixture(scope="module")
def key_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("keys")


@pytest.fixture(scope="module")
def records(key_dir: Path) -> dict[bytes, bytes]:
    return {
        (r.name + ".").encode(): r.value.encode()
        for r in generate_keys(key_dir, DOMAIN, SELECTOR, ed25519=True)
    }


@pytest.fixture(scope="module")
def signer(key_dir: Path, records: dict[bytes, bytes]) -> DkimSigner:
    rsa_key = load_pem(key_dir / "payer.test.eob1.rsa.pem")
    ed_key = load_pem(key_dir / "payer.test.eob1e.ed25519.pem")
    assert isinstance(rsa_key, rsa.RSAPrivateKey) and isinstance(ed_key, Ed25519PrivateKey)
    # The generated keys with a fixed clock: t= must come from the injected clock.
    return DkimSigner(DOMAIN, SELECTOR, rsa_key, ed25519_key=ed_key, clock=lambda: NOW + 0.9)


def load_pem(path: Path) -> PrivateKeyTypes:
    return serialization.load_pem_private_key(path.read_bytes(), password=None)


def eob_message() -> bytes:
    """A multipart/alternative EOB notice as the stdlib writes it for SMTP (CRLF, folded)."""
    msg = EmailMessage(policy=SMTP)
    msg["From"] = "Contoso Health Plan <eob@payer.test>"
    msg["To"] = "Zoë Müller-Lüdenscheidt <zoe.mueller@member.example>"
    msg["Subject"] = (
        "Your Explanation of Benefits for claim 2024-000123 — Überweisung "
        "and Résumé of services received at Hôpital Saint-Éloi is ready"
    )
    msg["Date"] = "Tue, 28 May 2024 14:00:00 +0000"
    msg["Message-ID"] = "<eob-2024-000123.1@payer.test>"
    msg["List-Unsubscribe"] = "<https://payer.test/unsubscribe/opaque-token>"
    msg["X-Eob-Trace"] = "opaque-0001"
    text = "Grüße Zoë,\n\nyour claim was processed: you owe €12.50.   \n" * 60
    msg.set_content(text, charset="utf-8")
    msg.add_alternative(f"<html><body><p>{text}</p></body></html>", subtype="html")
    return msg.as_bytes()


def split(message: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """(name, value) pairs as written, folding kept, and the body."""
    head, _, body = message.partition(b"\r\n\r\n")
    headers: list[tuple[bytes, bytes]] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            name, value = headers[-1]
            headers[-1] = (name, value + b"\r\n" + line)
        else:
            name, _, value = line.partition(b":")
            headers.append((name, value))
    return headers, body


def sign_message(signer: DkimSigner, message: bytes) -> bytes:
    headers, body = split(message)
    return b"".join(signer.sign(headers, body)) + message


def verify_rsa(message: bytes, records: dict[bytes, bytes]) -> bool:
    result: bool = dkim.verify(message, dnsfunc=lambda name, timeout=5: records.get(name))
    return result


def verify_ed25519(message: bytes, records: dict[bytes, bytes], idx: int = 1) -> bool:
    """dkimpy's verification steps for signature `idx`, with cryptography's Ed25519.

    dkimpy needs PyNaCl for ed25519, which is not installed; its parsing, canonicalisation
    and header selection are used as in `DKIM.verify_sig_process`.
    """
    d = dkim.DKIM(message)
    sig, include, sigheaders = d.verify_headerprep(idx=idx)
    assert sig[b"a"] == b"ed25519-sha256"
    policy = CanonicalizationPolicy.from_c_value(sig[b"c"])
    body_hash = hashlib.sha256(policy.canonicalize_body(d.body)).digest()
    if body_hash != base64.b64decode(re.sub(rb"\s+", b"", sig[b"bh"])):
        return False
    include.append(b"from")  # as dkimpy does: an extra From must break the signature
    hasher = hashlib.sha256()
    dkim.hash_headers(
        hasher, policy, policy.canonicalize_headers(d.headers), include, sigheaders[idx], sig
    )
    record = dkim.util.parse_tag_value(records[sig[b"s"] + b"._domainkey." + sig[b"d"] + b"."])
    assert record[b"k"] == b"ed25519"
    key = Ed25519PublicKey.from_public_bytes(base64.b64decode(record[b"p"]))
    try:
        key.verify(base64.b64decode(re.sub(rb"\s+", b"", sig[b"b"])), hasher.digest())
    except InvalidSignature:
        return False
    return True


def test_message_under_test_has_folded_headers_and_utf8() -> None:
    message = eob_message()
    head, _, body = message.partition(b"\r\n\r\n")
    assert b"\r\n " in head
    assert b"multipart/alternative" in head
    assert b"utf-8" in body


def test_rsa_signature_verifies_with_dkimpy(
    signer: DkimSigner, records: dict[bytes, bytes]
) -> None:
    signed = sign_message(signer, eob_message())
    assert verify_rsa(signed, records)


def test_ed25519_signature_verifies(signer: DkimSigner, records: dict[bytes, bytes]) -> None:
    signed = sign_message(signer, eob_message())
    assert verify_ed25519(signed, records)


def test_signatures_order_tags_and_fold(signer: DkimSigner) -> None:
    headers, body = split(eob_message())
    lines = signer.sign(headers, body)
    assert len(lines) == 2
    tags = [
        dkim.util.parse_tag_value(line.split(b":", 1)[1].replace(b"\r\n", b"")) for line in lines
    ]
    assert [t[b"a"] for t in tags] == [b"rsa-sha256", b"ed25519-sha256"]
    assert [t[b"s"] for t in tags] == [b"eob1", b"eob1e"]
    assert all(t[b"c"] == b"relaxed/relaxed" and t[b"d"] == b"payer.test" for t in tags)
    assert all(t[b"t"] == str(NOW).encode() for t in tags)
    signed = [h.strip() for h in tags[0][b"h"].split(b":")]
    for name in (b"from", b"to", b"subject", b"date", b"message-id", b"mime-version"):
        assert name in signed
    assert b"content-type" in signed and b"list-unsubscribe" in signed
    assert b"x-eob-trace" not in signed
    assert signed.count(b"from") == 2  # oversigned
    for line in lines:
        assert line.startswith(b"DKIM-Signature: ") and line.endswith(b"\r\n")
        assert all(len(row) <= 78 for row in line.split(b"\r\n"))


def test_ed25519_alone_on_top_verifies(signer: DkimSigner, records: dict[bytes, bytes]) -> None:
    message = eob_message()
    headers, body = split(message)
    _, ed_line = signer.sign(headers, body)
    assert verify_ed25519(ed_line + message, records, idx=0)
    # the signature really is ed25519, not rsa in disguise
    assert b"a=ed25519-sha256" in ed_line and b"a=rsa" not in ed_line


def test_changed_body_fails(signer: DkimSigner, records: dict[bytes, bytes]) -> None:
    signed = sign_message(signer, eob_message())
    tampered = signed.replace(b"<html>", b"<html><p>pay here</p>", 1)
    assert tampered != signed
    assert not verify_rsa(tampered, records)
    assert not verify_ed25519(tampered, records)


def test_changed_subject_fails(signer: DkimSigner, records: dict[bytes, bytes]) -> None:
    signed = sign_message(signer, eob_message())
    tampered = re.sub(rb"\r\nSubject: [^\r]*", b"\r\nSubject: Urgent: verify your account", signed)
    assert tampered != signed
    assert not verify_rsa(tampered, records)
    assert not verify_ed25519(tampered, records)


def test_added_from_or_subject_fails(signer: DkimSigner, records: dict[bytes, bytes]) -> None:
    signed = sign_message(signer, eob_message())
    # Added on top, the extra copy is not the one verifiers pick (they pick bottom-up):
    # only oversigning (one more h= entry than copies) makes it break the signature.
    for extra in (b"From: attacker@evil.example\r\n", b"Subject: Urgent\r\n"):
        assert not verify_rsa(extra + signed, records)
        assert not verify_ed25519(extra + signed, records)
    assert verify_rsa(b"X-Added: harmless\r\n" + signed, records)


def test_relaxed_survives_refolding_and_whitespace(
    signer: DkimSigner, records: dict[bytes, bytes]
) -> None:
    headers = [
        (b"From", b"  EOB   <eob@payer.test>  "),
        (b"To", b" member@member.example"),
        (b"Subject", b" Your Explanation\r\n\tof Benefits"),
        (b"Date", b" Tue, 28 May 2024 14:00:00 +0000"),
        (b"Message-ID", b" <x@payer.test>"),
        (b"MIME-Version", b" 1.0"),
        (b"Content-Type", b" text/plain; charset=utf-8"),
    ]
    body = "Grüße \t\r\nline two  \r\n\r\n\r\n".encode()
    message = b"".join(n + b":" + v + b"\r\n" for n, v in headers) + b"\r\n" + body
    signed = b"".join(signer.sign(headers, body)) + message
    assert verify_rsa(signed, records)
    assert verify_ed25519(signed, records)
    # an MTA that refolds a header or trims trailing blank lines keeps a relaxed signature valid
    refolded = signed.replace(
        b" Your Explanation\r\n\tof Benefits", b" Your  Explanation of Benefits"
    )
    assert refolded != signed
    assert verify_rsa(refolded.removesuffix(b"\r\n\r\n") + b"\r\n", records)


def test_empty_body_verifies(signer: DkimSigner, records: dict[bytes, bytes]) -> None:
    headers = [(b"From", b" eob@payer.test"), (b"Subject", b" empty")]
    message = b"From: eob@payer.test\r\nSubject: empty\r\n\r\n"
    assert verify_rsa(b"".join(signer.sign(headers, b"")) + message, records)


def test_rsa_only_signer_returns_one_line(key_dir: Path, records: dict[bytes, bytes]) -> None:
    rsa_only = load_signer(key_dir, DOMAIN, SELECTOR, ed25519=False)
    message = eob_message()
    headers, body = split(message)
    lines = rsa_only.sign(headers, body)
    assert len(lines) == 1
    assert verify_rsa(lines[0] + message, records)


def test_sign_without_from_is_refused(signer: DkimSigner) -> None:
    with pytest.raises(EobblastError, match="From"):
        signer.sign([(b"Subject", b" no sender")], b"body\r\n")


def test_generate_keys_files_modes_and_idempotence(tmp_path: Path) -> None:
    key_dir = tmp_path / "keys"
    first = generate_keys(key_dir, DOMAIN, SELECTOR)
    rsa_file = key_dir / "payer.test.eob1.rsa.pem"
    ed_file = key_dir / "payer.test.eob1e.ed25519.pem"
    assert sorted(p.name for p in key_dir.iterdir()) == sorted([rsa_file.name, ed_file.name])
    for path in (rsa_file, ed_file):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_dir.stat().st_mode) == 0o700
    before = (rsa_file.read_bytes(), ed_file.read_bytes())

    again = generate_keys(key_dir, DOMAIN, SELECTOR)
    assert again == first
    assert (rsa_file.read_bytes(), ed_file.read_bytes()) == before

    rsa_record, ed_record = first
    assert rsa_record.name == "eob1._domainkey.payer.test"
    assert re.fullmatch(r"v=DKIM1; k=rsa; p=[A-Za-z0-9+/]+=*", rsa_record.value)
    assert ed_record.name == "eob1e._domainkey.payer.test"
    assert ed_record.value.startswith("v=DKIM1; k=ed25519; p=")
    assert len(base64.b64decode(ed_record.value.split("p=")[1])) == 32
    key = load_pem(rsa_file)
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 2048
    assert isinstance(load_pem(ed_file), Ed25519PrivateKey)


def test_generate_keys_without_ed25519_then_with(tmp_path: Path) -> None:
    (rsa_only,) = generate_keys(tmp_path, DOMAIN, SELECTOR, ed25519=False)
    assert [p.name for p in tmp_path.iterdir()] == ["payer.test.eob1.rsa.pem"]
    rsa_record, ed_record = generate_keys(tmp_path, DOMAIN, SELECTOR, ed25519=True)
    assert rsa_record == rsa_only
    assert (tmp_path / "payer.test.eob1e.ed25519.pem").exists()
    assert "k=ed25519" in ed_record.value


def test_zone_line_chunks_long_strings() -> None:
    long_key = "A" * 600
    record = DnsRecord("eob1._domainkey.payer.test", f"v=DKIM1; k=rsa; p={long_key}")
    line = record.zone_line()
    assert line.startswith('eob1._domainkey.payer.test. 3600 IN TXT ( "v=DKIM1; k=rsa; " "p=')
    assert line.endswith('" )')
    strings = re.findall(r'"([^"]*)"', line)
    assert all(len(s) <= 255 for s in strings)
    assert len(strings) == 4  # the tags, then 602 characters of p= in 255-character pieces
    assert "".join(strings) == record.value
    assert record.zone_line(ttl=300).startswith("eob1._domainkey.payer.test. 300 IN TXT")


def test_zone_line_of_generated_rsa_key(records: dict[bytes, bytes]) -> None:
    name, value = next((k, v) for k, v in records.items() if b"k=rsa" in v)
    line = DnsRecord(name.decode().rstrip("."), value.decode()).zone_line()
    strings = re.findall(r'"([^"]*)"', line)
    assert len(strings) == 3 and all(len(s) <= 255 for s in strings)
    assert "".join(strings).encode() == value


def test_opendkim_line() -> None:
    record = DnsRecord("eob1._domainkey.payer.test", "v=DKIM1; k=rsa; p=QUJD")
    assert record.opendkim_line() == "eob1._domainkey.payer.test v=DKIM1; k=rsa; p=QUJD"


def test_load_signer_missing_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="rsa key not found") as err:
        load_signer(tmp_path, DOMAIN, SELECTOR, ed25519=False)
    assert str(tmp_path) in str(err.value)
    generate_keys(tmp_path, DOMAIN, SELECTOR, ed25519=False)
    with pytest.raises(ConfigError, match="ed25519 key not found"):
        load_signer(tmp_path, DOMAIN, SELECTOR, ed25519=True)


def test_load_signer_garbage_key_does_not_echo_it(tmp_path: Path) -> None:
    secret = "-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWJ1dC1icm9rZW4=\n-----END PRIVATE KEY-----\n"
    (tmp_path / "payer.test.eob1.rsa.pem").write_text(secret)
    with pytest.raises(ConfigError, match="not an unencrypted PEM private key") as err:
        load_signer(tmp_path, DOMAIN, SELECTOR, ed25519=False)
    assert "c2VjcmV0" not in str(err.value) and "PRIVATE KEY" not in str(err.value)


def test_wrong_key_type_is_refused(tmp_path: Path) -> None:
    generate_keys(tmp_path, DOMAIN, SELECTOR)
    ed_pem = (tmp_path / "payer.test.eob1e.ed25519.pem").read_bytes()
    (tmp_path / "payer.test.eob1.rsa.pem").write_bytes(ed_pem)
    with pytest.raises(ConfigError, match="not an RSA key"):
        load_signer(tmp_path, DOMAIN, SELECTOR, ed25519=True)


@pytest.mark.parametrize(
    ("domain", "selector"),
    [("payer.test", "../etc"), ("payer.test", "a/b"), ("../payer", "eob1"), ("", "eob1")],
)
def test_names_that_are_not_dns_names_are_refused(
    tmp_path: Path, domain: str, selector: str
) -> None:
    with pytest.raises(ConfigError, match="not an ASCII DNS name"):
        generate_keys(tmp_path, domain, selector)
    assert list(tmp_path.iterdir()) == []


def test_a_long_sending_domain_is_never_cut_in_two(tmp_path: Path) -> None:
    # dkimpy's fold cut a token longer than a line: d= of a 70-character domain named no
    # domain once the verifier unfolded it, and every signature failed.
    domain = ("a" * 60) + ".payer-example.test"
    records = {
        (r.name + ".").encode(): r.value.encode()
        for r in generate_keys(tmp_path, domain, SELECTOR, ed25519=True)
    }
    long_signer = load_signer(tmp_path, domain, SELECTOR, ed25519=True)
    message = eob_message().replace(b"payer.test", domain.encode())
    signed = sign_message(long_signer, message)
    assert f"d={domain};".encode() in signed
    assert verify_rsa(signed, records) and verify_ed25519(signed, records)


def rendered(language: str, name: str) -> bytes:
    """An EOB as the renderer writes it, in `language`, for a member called `name`."""
    doc = orjson.loads(next(generate_events(1, seed=3, mix=CLEAN)))
    doc["member"]["preferred_language"] = language
    doc["member"]["name"] = name
    event = validate_event(orjson.dumps(doc), allow_test_domains=True)
    assert isinstance(event, EobIssued)
    return Renderer().render(event).to_bytes()


@pytest.mark.parametrize(
    ("language", "name", "encoding"),
    [("en", "Chris Curtis", b"7bit"), ("es", "Zoë Müller", b"quoted-printable")],
)
def test_rendered_eobs_verify_in_either_transfer_encoding(
    signer: DkimSigner, records: dict[bytes, bytes], language: str, name: str, encoding: bytes
) -> None:
    message = rendered(language, name)
    assert b"Content-Transfer-Encoding: " + encoding + b"\r\n" in message
    signed = sign_message(signer, message)
    assert verify_rsa(signed, records)
    assert verify_ed25519(signed, records)


def reference_line(
    domain: bytes,
    selector: bytes,
    algorithm: bytes,
    timestamp: bytes,
    include: list[bytes],
    signed: bytes,
    body_hash: bytes,
    sign_digest: Callable[[bytes], bytes],
) -> bytes:
    """A DKIM-Signature line folded and canonicalised for itself alone, nothing reused."""
    tags = [
        (b"v", b"1"),
        (b"a", algorithm),
        (b"c", b"relaxed/relaxed"),
        (b"d", domain),
        (b"s", selector),
        (b"t", timestamp),
        (b"h", b" : ".join(include)),
        (b"bh", body_hash),
    ]
    text = b"; ".join(b"=".join(tag) for tag in tags) + b";"
    unsigned = _fold_at_spaces(text, first_line=len(b"DKIM-Signature: ")) + b"\r\n b="
    own = b"dkim-signature:" + _relaxed_value(b" " + unsigned)
    b64 = base64.b64encode(sign_digest(hashlib.sha256(signed + own).digest()))
    wrapped = b"\r\n ".join(b64[i : i + 69] for i in range(0, len(b64), 69))
    return b"DKIM-Signature: " + unsigned + wrapped + b"\r\n"


@pytest.mark.parametrize("domain", ["payer.test", ("a" * 60) + ".payer-example.test"])
@pytest.mark.parametrize("now", [7, 999_999_999, NOW, 10**11 + 0.5])
def test_signature_lines_are_those_folded_for_each_message_alone(
    key_dir: Path, records: dict[bytes, bytes], domain: str, now: float
) -> None:
    # The signer lays each kind of field out once and fills in t= and bh=: the lines
    # (RSA PKCS#1 v1.5 and Ed25519 are deterministic) must be byte for byte the same.
    rsa_key = load_pem(key_dir / "payer.test.eob1.rsa.pem")  # written by `records`
    ed_key = load_pem(key_dir / "payer.test.eob1e.ed25519.pem")
    assert isinstance(rsa_key, rsa.RSAPrivateKey) and isinstance(ed_key, Ed25519PrivateKey)
    signer = DkimSigner(domain, SELECTOR, rsa_key, ed25519_key=ed_key, clock=lambda: now)
    messages = [
        eob_message(),
        rendered("en", "Chris Curtis"),
        rendered("es", "Zoë Müller"),
        b"From: a@payer.test\r\nX-Other: 1\r\n\r\n",
    ]
    for message in messages:
        headers, body = split(message)
        names = [name.lower().rstrip() for name, _ in headers]
        include = [n for n in names if n in signer._sign] + list(signer._oversign)
        signed = _signed_header_data(names, headers, include)
        body_hash = base64.b64encode(hashlib.sha256(relaxed_body(body)).digest())
        timestamp = str(int(now)).encode()
        expected = [
            reference_line(
                domain.encode(),
                SELECTOR.encode(),
                b"rsa-sha256",
                timestamp,
                include,
                signed,
                body_hash,
                lambda digest: rsa_key.sign(
                    digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256())
                ),
            ),
            reference_line(
                domain.encode(),
                (SELECTOR + "e").encode(),
                b"ed25519-sha256",
                timestamp,
                include,
                signed,
                body_hash,
                ed_key.sign,
            ),
        ]
        assert signer.sign(headers, body) == expected


@pytest.mark.parametrize("name", ["x y", "a:b", "", "tab\tname", "nul\x00"])
def test_sign_headers_must_be_field_names(
    key_dir: Path, records: dict[bytes, bytes], name: str
) -> None:
    rsa_key = load_pem(key_dir / "payer.test.eob1.rsa.pem")  # written by `records`
    assert isinstance(rsa_key, rsa.RSAPrivateKey)
    with pytest.raises(ConfigError, match="field names"):
        DkimSigner(DOMAIN, SELECTOR, rsa_key, sign_headers=("from", name))


def test_a_missing_key_is_looked_for_again_after_a_while(tmp_path: Path) -> None:
    now = [0.0]
    store = SignerStore(tmp_path, "eob1", ed25519=False, clock=lambda: now[0])
    assert store.get("payer.example") is None
    generate_keys(tmp_path, "payer.example", "eob1", ed25519=False)
    # Known as keyless until the retry time: the directory is not read on every notice.
    now[0] = MISSING_KEY_RETRY - 1
    assert store.get("payer.example") is None
    now[0] = MISSING_KEY_RETRY
    signer = store.get("payer.example")
    assert signer is not None and store.get("payer.example") is signer
    # Once loaded, a key stays: removing the file does not stop the domain's mail.
    (tmp_path / "payer.example.eob1.rsa.pem").unlink()
    now[0] += 10 * MISSING_KEY_RETRY
    assert store.get("payer.example") is signer


def test_keyless_domains_remembered_are_bounded_and_the_oldest_goes_first(
    tmp_path: Path,
) -> None:
    store = SignerStore(tmp_path, "eob1", ed25519=False, clock=lambda: 0.0)
    for n in range(MISSING_KEYS_KEPT + 1):
        assert store.get(f"d{n}.example") is None
    assert len(store._missing) == MISSING_KEYS_KEPT
    # Within the retry time: the first domain was let go and is read again; the last is
    # still known as keyless (one line in the log a minute, not one per notice).
    for n in (0, MISSING_KEYS_KEPT):
        generate_keys(tmp_path, f"d{n}.example", "eob1", ed25519=False)
    assert store.get("d0.example") is not None
    assert store.get(f"d{MISSING_KEYS_KEPT}.example") is None


def test_signing_domains_are_read_from_the_key_file_names(tmp_path: Path) -> None:
    assert signing_domains(tmp_path / "absent", "eob1") == []
    generate_keys(tmp_path, "b.example", "eob1", ed25519=True)
    generate_keys(tmp_path, "a.example", "eob1", ed25519=False)
    generate_keys(tmp_path, "c.example", "other", ed25519=False)
    assert signing_domains(tmp_path, "eob1") == ["a.example", "b.example"]
    not_a_directory = tmp_path / "a.example.eob1.rsa.pem"
    with pytest.raises(ConfigError, match="cannot be read"):
        signing_domains(not_a_directory, "eob1")

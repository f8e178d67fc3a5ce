"""OpenDKIM, an independent C verifier, accepts our rsa-sha256 and ed25519-sha256 signatures."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import orjson
import pytest

from eobblast.events import EobIssued, validate_event
from eobblast.events.synthetic import generate_events
from eobblast.protect.dkim import DkimSigner, generate_keys, load_signer
from eobblast.render import Renderer
from tests.conftest import CLEAN

OPENDKIM = shutil.which("opendkim") or (
    "/usr/sbin/opendkim" if Path("/usr/sbin/opendkim").exists() else None
)
pytestmark = pytest.mark.skipif(
    OPENDKIM is None, reason="opendkim not installed (Debian package opendkim; `make system-deps`)"
)

DOMAIN = "payer.test"
SELECTOR = "eob1"

HEADERS = [
    (b"From", b" Contoso Health Plan <eob@payer.test>"),
    (b"To", b" =?utf-8?q?Zo=C3=AB_M=C3=BCller?= <zoe@member.example>"),
    (b"Subject", b" Your Explanation of Benefits for claim 2024-000123\r\n is ready"),
    (b"Date", b" Tue, 28 May 2024 14:00:00 +0000"),
    (b"Message-ID", b" <eob-2024-000123.1@payer.test>"),
    (b"MIME-Version", b" 1.0"),
    (b"Content-Type", b' multipart/alternative;\r\n boundary="b1"'),
]
BODY = (
    b"--b1\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    + "Grüße Zoë, you owe €12.50.  \t\r\n".encode() * 200
    + b"\r\n--b1\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
    + b"<html><body><p>Your EOB is ready.</p></body></html>\r\n--b1--\r\n"
)
UNSIGNED = b"".join(n + b":" + v + b"\r\n" for n, v in HEADERS) + b"\r\n" + BODY


@pytest.fixture
def signer_and_conf(tmp_path: Path) -> tuple[DkimSigner, Path]:
    records = generate_keys(tmp_path / "keys", DOMAIN, SELECTOR, ed25519=True)
    keys = tmp_path / "test-public-keys"
    keys.write_text("".join(r.opendkim_line() + "\n" for r in records))
    conf = tmp_path / "opendkim.conf"
    conf.write_text(f"Mode v\nSyslog no\nTestPublicKeys {keys}\n")
    return load_signer(tmp_path / "keys", DOMAIN, SELECTOR, ed25519=True), conf


def opendkim_verify(conf: Path, message: bytes, tmp_path: Path) -> str:
    eml = tmp_path / "message.eml"
    eml.write_bytes(message)
    assert OPENDKIM is not None
    done = subprocess.run(
        [OPENDKIM, "-x", str(conf), "-t", str(eml)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    # opendkim exits 0 whether or not the signature verified: the verdict is in the text.
    return done.stdout + done.stderr


def test_rsa_signature_on_top_verifies(
    signer_and_conf: tuple[DkimSigner, Path], tmp_path: Path
) -> None:
    signer, conf = signer_and_conf
    out = opendkim_verify(conf, b"".join(signer.sign(HEADERS, BODY)) + UNSIGNED, tmp_path)
    assert "verification (s=eob1, d=payer.test, 2048-bit key) succeeded" in out, out


def test_ed25519_signature_verifies(
    signer_and_conf: tuple[DkimSigner, Path], tmp_path: Path
) -> None:
    signer, conf = signer_and_conf
    _, ed_line = signer.sign(HEADERS, BODY)
    out = opendkim_verify(conf, ed_line + UNSIGNED, tmp_path)
    assert "verification (s=eob1e, d=payer.test" in out and "succeeded" in out, out


@pytest.mark.parametrize(
    ("language", "name", "encoding"),
    [("en", "Chris Curtis", b"7bit"), ("es", "Zoë Müller", b"quoted-printable")],
)
def test_rendered_eobs_verify_in_either_transfer_encoding(
    signer_and_conf: tuple[DkimSigner, Path],
    tmp_path: Path,
    language: str,
    name: str,
    encoding: bytes,
) -> None:
    signer, conf = signer_and_conf
    doc = orjson.loads(next(generate_events(1, seed=3, mix=CLEAN)))
    doc["member"]["preferred_language"] = language
    doc["member"]["name"] = name
    event = validate_event(orjson.dumps(doc), allow_test_domains=True)
    assert isinstance(event, EobIssued)
    message = Renderer().render(event)
    assert b"Content-Transfer-Encoding: " + encoding + b"\r\n" in message.body
    rsa_line, ed_line = signer.sign(message.headers, message.body)
    out = opendkim_verify(conf, message.to_bytes([rsa_line]), tmp_path)
    assert "verification (s=eob1, d=payer.test, 2048-bit key) succeeded" in out, out
    out = opendkim_verify(conf, message.to_bytes([ed_line]), tmp_path)
    assert "verification (s=eob1e, d=payer.test" in out and "succeeded" in out, out


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("you owe €12.50".encode(), "you owe €1250".encode()),
        (b"Subject: Your Explanation", b"Subject: Our Explanation"),
    ],
    ids=["body", "subject"],
)
def test_tampered_message_fails(
    signer_and_conf: tuple[DkimSigner, Path], tmp_path: Path, old: bytes, new: bytes
) -> None:
    signer, conf = signer_and_conf
    rsa_line, ed_line = signer.sign(HEADERS, BODY)
    tampered = UNSIGNED.replace(old, new, 1)
    assert tampered != UNSIGNED
    for line in (rsa_line, ed_line):
        out = opendkim_verify(conf, line + tampered, tmp_path)
        assert "verification" in out and "failed" in out, out
        assert "succeeded" not in out, out

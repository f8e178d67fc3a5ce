"""S/MIME enveloped-data (RFC 8551): the whole EOB encrypted to the member's certificate.

The inner entity is the rendered message's content (its Content-* header fields and the
body); the outer message keeps the envelope header fields (From, To, the generic Subject,
Date, Message-ID, MIME-Version, opaque ids) and carries the encrypted entity as a base64
`application/pkcs7-mime` body. The outer headers are built here, CRLF throughout, rather
than taken from cryptography's SMIME encoding (LF line ends, its own header order), so the
result is a RenderedMessage the DKIM signer takes as it is.

Content encryption is AES-256-CBC with RSA PKCS#1 v1.5 key transport: what cryptography's
PKCS7EnvelopeBuilder offers (no AES-GCM AuthEnvelopedData, no RSA-OAEP). Any failure raises
SmimeError; there is never a plaintext fallback.
"""

from __future__ import annotations

import base64
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7

from eobblast.errors import EobblastError, ReasonCode
from eobblast.render.mime import RenderedMessage

__all__ = ["SmimeError", "encrypt_entity", "mime_entity", "smime_message"]

# Header fields that describe the content: they move inside the encrypted entity and are
# not repeated outside, where they would describe the pkcs7-mime body instead. The
# content's language moves in too; outside it would say nothing true of the ciphertext.
_ENTITY_FIELDS: Final = frozenset(
    {
        b"content-type",
        b"content-transfer-encoding",
        b"content-language",
        b"content-disposition",
        b"content-description",
        b"content-id",
    }
)

_OUTER_CONTENT: Final[tuple[tuple[bytes, bytes], ...]] = (
    (b"Content-Type", b"application/pkcs7-mime; smime-type=enveloped-data; name=smime.p7m"),
    (b"Content-Disposition", b"attachment; filename=smime.p7m"),
    (b"Content-Transfer-Encoding", b"base64"),
)


class SmimeError(EobblastError):
    """A message could not be S/MIME-encrypted; it must not be sent in any other form."""

    def __init__(self, detail: str) -> None:
        # detail is a fixed string or an exception class name: never the content.
        super().__init__(ReasonCode.INTERNAL_ERROR, detail)


def _field_name(name: bytes) -> bytes:
    return name.strip().lower()


def mime_entity(message: RenderedMessage) -> bytes:
    """The message's content as a MIME entity: its Content-* header fields, CRLF, the body."""
    fields = [(n, v) for n, v in message.headers if _field_name(n) in _ENTITY_FIELDS]
    if not any(_field_name(n) == b"content-type" for n, _ in fields):
        raise SmimeError("message has no Content-Type to encrypt")
    head = b"".join(name + b": " + value + b"\r\n" for name, value in fields)
    return head + b"\r\n" + message.body


def encrypt_entity(entity: bytes, certificate: x509.Certificate) -> bytes:
    """`entity` as DER CMS enveloped-data for `certificate`'s RSA key, AES-256-CBC."""
    try:
        return (
            pkcs7.PKCS7EnvelopeBuilder()
            .set_data(entity)
            .add_recipient(certificate)
            .set_content_encryption_algorithm(algorithms.AES256)
            # Binary: the entity is already canonical CRLF MIME; no text-mode rewriting.
            .encrypt(Encoding.DER, [pkcs7.PKCS7Options.Binary])
        )
    except Exception as exc:
        # Whatever went wrong (a non-RSA key, an OpenSSL error), the caller must learn that
        # this message cannot go out, not crash elsewhere. The class name is enough to
        # diagnose and carries no PHI.
        raise SmimeError(f"S/MIME encryption failed ({type(exc).__name__})") from exc


def _base64_lines(data: bytes) -> bytes:
    # encodebytes writes 76-character lines (RFC 2045 section 6.8), LF-terminated.
    return base64.encodebytes(data).replace(b"\n", b"\r\n")


def smime_message(message: RenderedMessage, certificate: x509.Certificate) -> RenderedMessage:
    """`message` with its content replaced by an S/MIME enveloped-data body for `certificate`."""
    envelope = encrypt_entity(mime_entity(message), certificate)
    outer = [(n, v) for n, v in message.headers if _field_name(n) not in _ENTITY_FIELDS]
    if not any(_field_name(n) == b"mime-version" for n, _ in outer):
        outer.append((b"MIME-Version", b"1.0"))
    outer.extend(_OUTER_CONTENT)
    return RenderedMessage(
        headers=tuple(outer),
        body=_base64_lines(envelope),
        mail_from=message.mail_from,
        rcpt_to=message.rcpt_to,
    )

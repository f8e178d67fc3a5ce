"""VERP return paths: bounces+<token>@<bounce domain>, the token an opaque, tamper-proof event id.

Token layout (then base32, lowercase, unpadded: only [a-z2-7], and case-insensitive, because
some MTAs lower-case the addresses they bounce to):

    header (1 byte: key id << 2 | kind) + tag (10 bytes) + encrypted payload (0..24 bytes)

The payload is the event id itself when it fits, so a bounce maps back to its event without
any lookup:

* kind UUID: a canonical lower-case UUID (what eobblast's producers use) as its 16 bytes;
* kind TEXT: any other id of up to 31 characters of [A-Za-z0-9._:-], as a bijective
  base-66 number (at most 24 bytes);
* kind REF: longer ids (up to 64 characters) as a reference, the first 96 bits of the id's
  SHA-256. The bounce store keeps event_reference(event_id) beside each id that is
  `carried_by_reference` (whatever the prefix) and resolves a reference by that index (pass
  `resolve_reference` to parse_return_path).

The tag is HMAC-SHA256 over (header, payload) truncated to 80 bits, checked in constant
time; the payload is then encrypted with a keystream derived from the tag (an SIV
construction: deterministic, so one event always has one return path). Encryption keeps
the event id out of sight of every MTA on the way, so nothing in the address says anything
about the member or the claim. The key id (0..63) lets keys rotate: new mail is signed
with the newest key while bounces signed with older ones still verify until retired.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import re
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache

__all__ = [
    "ReturnPathToken",
    "TokenKind",
    "VerpKey",
    "carried_by_reference",
    "event_reference",
    "make_return_path",
    "parse_return_path",
    "read_return_path",
]

MAX_LOCAL_PART = 64
TAG_BYTES = 10
REFERENCE_BYTES = 12
MAX_PAYLOAD = 24
MAX_KEY_ID = 63
MAX_PREFIX = 16

_EVENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
_DOMAIN = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z][a-z0-9-]{0,62}$")
_PREFIX = re.compile(rf"^[a-z0-9][a-z0-9-]{{0,{MAX_PREFIX - 1}}}$")
_TOKEN = re.compile(r"^[a-z2-7]{18,60}$")
_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz._:-"
_BASE = len(_ALPHABET)
_MAC_LABEL = b"eobblast/verp/v1/mac"
_ENC_LABEL = b"eobblast/verp/v1/enc"


class TokenKind(enum.IntEnum):
    """How the event id is carried in the token."""

    UUID = 0
    TEXT = 1
    REF = 2


@dataclass(frozen=True, slots=True)
class VerpKey:
    """A VERP signing key and its id (0..63); the secret never appears in repr."""

    key_id: int
    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.key_id <= MAX_KEY_ID:
            raise ValueError("VERP key id must be 0..63")
        if len(self.secret) < 16:
            raise ValueError("VERP secret must be at least 16 bytes")


@dataclass(frozen=True, slots=True)
class ReturnPathToken:
    """A verified token: the event id, or for long ids the reference the ledger resolves."""

    key_id: int
    kind: TokenKind
    event_id: str | None
    reference: str | None


def event_reference(event_id: str) -> str:
    """The ledger's lookup key for an event id carried by reference (24 hex digits)."""
    return hashlib.sha256(event_id.encode("ascii")).digest()[:REFERENCE_BYTES].hex()


def carried_by_reference(event_id: str) -> bool:
    """Whether a return path may carry the event by reference: true of every id whose own
    token does not fit beside the longest prefix, so whatever the prefix, a store that keeps
    references of these ids only can resolve every reference it is sent."""
    room = MAX_LOCAL_PART - MAX_PREFIX - 1
    return all(
        _token_length(len(payload)) > room
        for kind, payload in _payloads(event_id)
        if kind is not TokenKind.REF
    )


def _token_length(payload_size: int) -> int:
    return -(-(1 + TAG_BYTES + payload_size) * 8 // 5)  # base32 characters, unpadded


def make_return_path(
    event_id: str, secret: VerpKey, bounce_domain: str, *, prefix: str = "bounces"
) -> str:
    """The envelope sender for one event's message: prefix+token@bounce_domain."""
    if not _EVENT_ID.match(event_id):
        raise ValueError("event id must be 1-64 characters of [A-Za-z0-9._:-]")
    domain = _checked_domain(bounce_domain, prefix)
    room = MAX_LOCAL_PART - len(prefix) - 1
    for kind, payload in _payloads(event_id):
        token = _seal(secret, kind, payload)
        if len(token) <= room:
            return f"{prefix}+{token}@{domain}"
    raise ValueError("VERP prefix too long for a token within 64 characters")


@lru_cache(maxsize=16)
def _checked_domain(bounce_domain: str, prefix: str) -> str:
    # The same few (domain, prefix) pairs for every message: checked once each.
    domain = bounce_domain.strip().lower().rstrip(".")
    if not _DOMAIN.match(domain):
        raise ValueError("bounce domain is not a valid host name")
    if not _PREFIX.match(prefix):
        raise ValueError("VERP prefix must be a short lower-case word")
    return domain


def read_return_path(
    address: str,
    secrets: Iterable[VerpKey],
    *,
    bounce_domain: str | None = None,
    prefix: str = "bounces",
) -> ReturnPathToken | None:
    """Verify a return path and open its token; None for anything not ours or tampered."""
    try:
        return _read(address, secrets, bounce_domain, prefix)
    except (ValueError, TypeError, UnicodeError, binascii.Error):
        return None


def parse_return_path(
    address: str,
    secrets: Iterable[VerpKey],
    *,
    bounce_domain: str | None = None,
    prefix: str = "bounces",
    resolve_reference: Callable[[str], str | None] | None = None,
) -> str | None:
    """The event id a bounce address stands for, or None (not ours, tampered, unresolved)."""
    token = read_return_path(address, secrets, bounce_domain=bounce_domain, prefix=prefix)
    if token is None:
        return None
    if token.event_id is not None:
        return token.event_id
    if token.reference is not None and resolve_reference is not None:
        return resolve_reference(token.reference)
    return None


# --------------------------------------------------------------------------- internals


def _payloads(event_id: str) -> Iterable[tuple[TokenKind, bytes]]:
    # Most compact first; the caller takes the first that fits the local part.
    try:
        parsed = uuid.UUID(event_id)
    except ValueError:
        parsed = None
    if parsed is not None and str(parsed) == event_id:
        yield TokenKind.UUID, parsed.bytes
    packed = _pack_text(event_id)
    if packed is not None:
        yield TokenKind.TEXT, packed
    yield TokenKind.REF, bytes.fromhex(event_reference(event_id))


def _pack_text(text: str) -> bytes | None:
    # Bijective base-66: every string maps to a distinct number, no length field needed.
    number = 0
    for char in text:
        number = number * _BASE + _ALPHABET.index(char) + 1
    size = (number.bit_length() + 7) // 8
    return number.to_bytes(size, "big") if size <= MAX_PAYLOAD else None


def _unpack_text(data: bytes) -> str:
    number = int.from_bytes(data, "big")
    chars: list[str] = []
    while number > 0:
        number -= 1
        number, digit = divmod(number, _BASE)
        chars.append(_ALPHABET[digit])
    return "".join(reversed(chars))


@lru_cache(maxsize=16)
def _keys(secret: bytes) -> tuple[bytes, bytes]:
    # Derived once per key, not per message (the secret is held by its VerpKey anyway).
    mac_key = hmac.new(secret, _MAC_LABEL, hashlib.sha256).digest()
    enc_key = hmac.new(secret, _ENC_LABEL, hashlib.sha256).digest()
    return mac_key, enc_key


def _tag(mac_key: bytes, header: bytes, payload: bytes) -> bytes:
    return hmac.new(mac_key, header + payload, hashlib.sha256).digest()[:TAG_BYTES]


def _keystream(enc_key: bytes, header: bytes, tag: bytes, size: int) -> bytes:
    # size <= 24 < 32: one HMAC block is enough.
    return hmac.new(enc_key, header + tag, hashlib.sha256).digest()[:size]


def _xor(left: bytes, right: bytes) -> bytes:
    if len(left) != len(right):
        raise ValueError("xor of unequal lengths")
    mixed = int.from_bytes(left, "big") ^ int.from_bytes(right, "big")
    return mixed.to_bytes(len(left), "big")


def _seal(key: VerpKey, kind: TokenKind, payload: bytes) -> str:
    mac_key, enc_key = _keys(key.secret)
    header = bytes([(key.key_id << 2) | int(kind)])
    tag = _tag(mac_key, header, payload)
    sealed = _xor(payload, _keystream(enc_key, header, tag, len(payload)))
    return _b32(header + tag + sealed)


def _b32(data: bytes) -> str:
    return base64.b32encode(data).decode("ascii").rstrip("=").lower()


def _read(
    address: str, secrets: Iterable[VerpKey], bounce_domain: str | None, prefix: str
) -> ReturnPathToken | None:
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    local, at, domain = address.rpartition("@")
    if not at or len(local) > MAX_LOCAL_PART:
        return None
    if bounce_domain is not None and domain.lower().rstrip(".") != bounce_domain.lower():
        return None
    head, plus, token = local.lower().partition("+")
    if not plus or head != prefix or not _TOKEN.match(token):
        return None
    raw = base64.b32decode(token.upper() + "=" * (-len(token) % 8))
    if len(raw) < 1 + TAG_BYTES or _b32(raw) != token:
        # Non-canonical spellings (padding bits set) would give one event many addresses.
        return None
    header, tag, sealed = raw[:1], raw[1 : 1 + TAG_BYTES], raw[1 + TAG_BYTES :]
    key_id, kind_value = header[0] >> 2, header[0] & 0b11
    if kind_value not in TokenKind._value2member_map_:
        return None
    kind = TokenKind(kind_value)
    for key in secrets:
        if key.key_id != key_id:
            continue
        mac_key, enc_key = _keys(key.secret)
        payload = _xor(sealed, _keystream(enc_key, header, tag, len(sealed)))
        if hmac.compare_digest(tag, _tag(mac_key, header, payload)):
            return _open(key_id, kind, payload)
    return None


def _open(key_id: int, kind: TokenKind, payload: bytes) -> ReturnPathToken | None:
    if kind is TokenKind.UUID:
        if len(payload) != 16:
            return None
        return ReturnPathToken(key_id, kind, str(uuid.UUID(bytes=payload)), None)
    if kind is TokenKind.TEXT:
        event_id = _unpack_text(payload)
        if not _EVENT_ID.match(event_id):
            return None
        return ReturnPathToken(key_id, kind, event_id, None)
    if len(payload) != REFERENCE_BYTES:
        return None
    return ReturnPathToken(key_id, kind, None, payload.hex())

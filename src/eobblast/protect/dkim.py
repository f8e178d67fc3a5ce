"""DKIM keys and signatures: relaxed canonicalisation, `cryptography`'s RSA and Ed25519.

dkimpy's own signing parses the PEM key on every call and does RSA in pure Python
(~140 signatures/s). Here the keys are parsed once, the message's headers and body come
from the renderer (nothing is re-parsed) and the private-key operation is OpenSSL's.
Relaxed canonicalisation (RFC 6376 section 3.4.2 and 3.4.4) is done here with bytes
methods: dkimpy's regular expressions cost more than the RSA signature on an 8 KB body.
tests/unit/test_canon.py checks it against dkimpy's on arbitrary input, and
tests/unit/test_dkim.py round-trips signatures through `dkim.verify`. The signature's tags
are folded here too: dkimpy's `fold` cuts a token longer than a line (the d= of a long
domain) in two.
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from eobblast._files import write_whole
from eobblast.errors import ConfigError, EobblastError, ReasonCode

__all__ = [
    "DEFAULT_OVERSIGN_HEADERS",
    "DEFAULT_SIGN_HEADERS",
    "DkimSigner",
    "DnsRecord",
    "ed25519_selector",
    "generate_keys",
    "load_signer",
    "relaxed_body",
    "relaxed_header",
]

RSA_KEY_BITS: Final = 2048
# RFC 8301: verifiers must reject RSA keys under 1024 bits, so loading one is a config error.
MIN_RSA_KEY_BITS: Final = 1024

#: Header fields signed when present (RFC 6376 section 5.4.1 plus the bulk-sender ones:
#: RFC 8058 one-click unsubscribe only counts when List-Unsubscribe(-Post) are signed).
DEFAULT_SIGN_HEADERS: Final[tuple[str, ...]] = (
    "from",
    "sender",
    "reply-to",
    "to",
    "cc",
    "subject",
    "date",
    "message-id",
    "in-reply-to",
    "references",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "list-id",
    "list-unsubscribe",
    "list-unsubscribe-post",
    "feedback-id",
)

#: Header fields signed once more than they occur, present or not, so that a replayer cannot
#: add a second copy (which many clients display instead of the signed one).
DEFAULT_OVERSIGN_HEADERS: Final[tuple[str, ...]] = (
    "from",
    "reply-to",
    "to",
    "cc",
    "subject",
    "date",
    "message-id",
    "mime-version",
    "content-type",
    "list-unsubscribe",
    "list-unsubscribe-post",
)

_HEADER_NAME: Final = b"DKIM-Signature"
_SIGNATURE_FIELD: Final = b"dkim-signature"
_SPACE_RUN: Final = re.compile(rb"  +")
# RFC 5322 section 2.2: a field name is printable US-ASCII other than ":".
_FIELD_NAME: Final = re.compile(rb"[!-9;-~]+")
# A DNS label: selectors and domains become file names too, so nothing else may pass.
_LABEL: Final = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")
# b= continuation lines: " b=" + 69 characters keeps every line within 72 columns.
_B_CHUNK: Final = 69
_TXT_CHUNK: Final = 255


@dataclass(frozen=True, slots=True)
class DnsRecord:
    """A DKIM public-key TXT record to publish at `name`."""

    name: str
    value: str

    def zone_line(self, ttl: int = 3600) -> str:
        """The record as a zone-file line, its value split into <=255-character strings."""
        # A TXT character-string holds at most 255 octets; the tags and the key go in
        # separate strings, as opendkim-genkey writes them, so the line reads well.
        head, sep, key = self.value.partition("p=")
        chunks = [
            piece[i : i + _TXT_CHUNK]
            for piece in (head, sep + key)
            if piece
            for i in range(0, len(piece), _TXT_CHUNK)
        ]
        quoted = " ".join('"' + c.replace("\\", "\\\\").replace('"', '\\"') + '"' for c in chunks)
        return f"{self.name}. {ttl} IN TXT ( {quoted} )"

    def opendkim_line(self) -> str:
        """The record as a line of OpenDKIM's TestPublicKeys file."""
        return f"{self.name} {self.value}"


def ed25519_selector(selector: str) -> str:
    """The selector of the Ed25519 key that accompanies the RSA key of `selector`."""
    # Distinct selectors let both keys be published at once (RFC 8463 dual signing).
    return selector + "e"


def generate_keys(
    key_dir: Path, domain: str, selector: str, *, ed25519: bool = True
) -> list[DnsRecord]:
    """Create the domain's signing keys unless they exist, and return their DNS records."""
    _check_names(domain, selector)
    key_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    rsa_path = _rsa_path(key_dir, domain, selector)
    if not rsa_path.exists():
        _publish_key(
            rsa_path, rsa.generate_private_key(public_exponent=65537, key_size=RSA_KEY_BITS)
        )
    records = [_rsa_record(domain, selector, _load_rsa(rsa_path))]
    if ed25519:
        ed_path = _ed25519_path(key_dir, domain, selector)
        if not ed_path.exists():
            _publish_key(ed_path, Ed25519PrivateKey.generate())
        records.append(_ed25519_record(domain, selector, _load_ed25519(ed_path)))
    return records


def load_signer(
    key_dir: Path,
    domain: str,
    selector: str,
    *,
    ed25519: bool,
    sign_headers: Sequence[str] = DEFAULT_SIGN_HEADERS,
    oversign_headers: Sequence[str] = DEFAULT_OVERSIGN_HEADERS,
) -> DkimSigner:
    """A signer for `domain` with the keys `generate_keys` wrote to `key_dir`."""
    _check_names(domain, selector)
    return DkimSigner(
        domain,
        selector,
        _load_rsa(_rsa_path(key_dir, domain, selector)),
        ed25519_key=_load_ed25519(_ed25519_path(key_dir, domain, selector)) if ed25519 else None,
        sign_headers=sign_headers,
        oversign_headers=oversign_headers,
    )


class DkimSigner:
    """Signs messages of one domain: rsa-sha256, plus ed25519-sha256 when it has that key.

    Immutable after construction and safe to share between threads; the RSA operation
    releases the GIL.
    """

    __slots__ = ("_clock", "_domain", "_ed25519_key", "_oversign", "_rsa_key", "_selector", "_sign")

    def __init__(
        self,
        domain: str,
        selector: str,
        rsa_key: rsa.RSAPrivateKey,
        *,
        ed25519_key: Ed25519PrivateKey | None = None,
        sign_headers: Sequence[str] = DEFAULT_SIGN_HEADERS,
        oversign_headers: Sequence[str] = DEFAULT_OVERSIGN_HEADERS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        _check_names(domain, selector)
        if rsa_key.key_size < MIN_RSA_KEY_BITS:
            raise ConfigError(f"DKIM RSA key for selector {selector!r} is under 1024 bits")
        sign = frozenset(h.strip().lower().encode("ascii") for h in sign_headers)
        # RFC 6376 section 5.4: From is the one field that must be signed.
        if b"from" not in sign:
            raise ConfigError("DKIM sign_headers must include From")
        if not all(_FIELD_NAME.fullmatch(name) for name in sign):
            raise ConfigError("DKIM sign_headers must be header field names")
        self._domain = domain.encode("ascii")
        self._selector = selector.encode("ascii")
        self._rsa_key = rsa_key
        self._ed25519_key = ed25519_key
        self._sign = sign
        oversign = (h.strip().lower().encode("ascii") for h in oversign_headers)
        self._oversign = tuple(name for name in oversign if name in sign)
        self._clock = clock

    def sign(self, headers: Sequence[tuple[bytes, bytes]], body: bytes) -> list[bytes]:
        """DKIM-Signature lines to write, in this order, above the message's header fields.

        `headers` are the message's (name, value) pairs as written, values possibly folded
        and without their final CRLF; `body` is the CRLF body. The rsa-sha256 signature
        comes first, so it is the topmost one, the one single-signature verifiers check.
        """
        names = [name.lower().rstrip() for name, _ in headers]
        present = [name for name in names if name in self._sign]
        if b"from" not in present:
            raise EobblastError(ReasonCode.INTERNAL_ERROR, "cannot DKIM-sign without a From field")
        include = [*present, *self._oversign]
        # Canonicalised once, shared by both signatures: only the DKIM-Signature field differs.
        signed = _signed_header_data(names, headers, include)
        body_hash = base64.b64encode(hashlib.sha256(relaxed_body(body)).digest())
        timestamp = str(int(self._clock())).encode("ascii")

        rsa_key = self._rsa_key
        lines = [
            self._signature(
                b"rsa-sha256",
                self._selector,
                timestamp,
                include,
                signed,
                body_hash,
                lambda digest: rsa_key.sign(
                    digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256())
                ),
            )
        ]
        if self._ed25519_key is not None:
            # RFC 8463: PureEdDSA over the SHA-256 digest of the canonical header data.
            lines.append(
                self._signature(
                    b"ed25519-sha256",
                    ed25519_selector(self._selector.decode()).encode("ascii"),
                    timestamp,
                    include,
                    signed,
                    body_hash,
                    self._ed25519_key.sign,
                )
            )
        return lines

    def _signature(
        self,
        algorithm: bytes,
        selector: bytes,
        timestamp: bytes,
        include: list[bytes],
        signed: bytes,
        body_hash: bytes,
        sign_digest: Callable[[bytes], bytes],
    ) -> bytes:
        written, hashed = _signature_layout(
            self._domain, algorithm, selector, tuple(include), len(timestamp), len(body_hash)
        )
        unsigned = written[0] + timestamp + written[1] + body_hash + written[2]
        # RFC 6376 section 3.7: the signature's own field comes last, b= empty, no CRLF.
        own = hashed[0] + timestamp + hashed[1] + body_hash + hashed[2]
        b64 = base64.b64encode(sign_digest(hashlib.sha256(signed + own).digest()))
        wrapped = b"\r\n ".join(b64[i : i + _B_CHUNK] for i in range(0, len(b64), _B_CHUNK))
        return _HEADER_NAME + b": " + unsigned + wrapped + b"\r\n"


# Stand-ins for the t= and bh= values while a layout is worked out: bytes that no tag
# holds (domain and selector are DNS names, h= lists field names).
_T_STAND_IN: Final = b"\x01"
_BH_STAND_IN: Final = b"\x02"


@lru_cache(maxsize=256)
def _signature_layout(
    domain: bytes,
    algorithm: bytes,
    selector: bytes,
    include: tuple[bytes, ...],
    timestamp_length: int,
    body_hash_length: int,
) -> tuple[tuple[bytes, bytes, bytes], tuple[bytes, bytes, bytes]]:
    """A DKIM-Signature field up to its empty b=, as written (after the field name) and as
    hashed (relaxed), each cut in three around the values of t= and bh=."""
    # Only t= and bh= change from one message to the next, and neither value holds a
    # space: where the tags fold, and what relaxed canonicalisation makes of them, depend
    # on their lengths alone. So the field is laid out once, with stand-ins of the same
    # lengths, and each signature puts its own values in their place.
    timestamp = _T_STAND_IN * timestamp_length
    body_hash = _BH_STAND_IN * body_hash_length
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
    # b= goes on lines of its own after the folded tags, so the text before it is the
    # same when hashed (b= empty) and when written (b= filled): fold never has to
    # re-decide where to break.
    folded = _fold_at_spaces(
        b"; ".join(b"=".join(t) for t in tags) + b";", first_line=len(_HEADER_NAME) + 2
    )
    written = folded + b"\r\n b="
    hashed = _SIGNATURE_FIELD + b":" + _relaxed_value(b" " + written)
    return _cut(written, timestamp, body_hash), _cut(hashed, timestamp, body_hash)


def _cut(text: bytes, first: bytes, second: bytes) -> tuple[bytes, bytes, bytes]:
    """`text` without `first` and then `second`, each found exactly once, as three pieces."""
    if text.count(first[:1]) != len(first) or text.count(second[:1]) != len(second):
        raise EobblastError(ReasonCode.INTERNAL_ERROR, "DKIM tag stand-ins are not unique")
    before, _, rest = text.partition(first)
    middle, _, after = rest.partition(second)
    return before, middle, after


def _fold_at_spaces(text: bytes, *, first_line: int, width: int = 74) -> bytes:
    """Fold a header value at its spaces only: lines of at most `width` where the tokens
    allow, a longer token (d= of a long domain) whole on a line of its own. dkimpy's fold
    cuts such a token in two, and the signature's d= then names no domain."""
    lines: list[bytes] = []
    line = b""
    room = width - first_line
    for token in text.split(b" "):
        if line and len(line) + 1 + len(token) > room:
            lines.append(line)
            line, room = token, width - 1
        else:
            line = line + b" " + token if line else token
    lines.append(line)
    return b"\r\n ".join(lines)


def relaxed_body(body: bytes) -> bytes:
    """`body` (CRLF lines) in relaxed canonical form (RFC 6376 section 3.4.4)."""
    # Each run of SP/HTAB becomes one SP: tabs become spaces, then runs of two or more
    # spaces one. dkimpy's `[\t ]+` pays a match for every single space of the text;
    # `  +` starts with a literal, so the regex engine skips ahead at C speed.
    if b"\t" in body:
        body = body.replace(b"\t", b" ")
    body = _SPACE_RUN.sub(b" ", body)
    # Every run is now a single SP, so one pass drops the WSP that ends each line.
    if b" \r\n" in body:
        body = body.replace(b" \r\n", b"\r\n")
    if not body.endswith(b"\r\n"):
        # An unterminated last line: it loses its trailing WSP too, and gets its CRLF (as
        # it will on the wire, which is what the verifier canonicalises).
        body = body.rstrip(b" ")
        if not body:
            return b""
        body += b"\r\n"
    # Empty lines at the end are ignored; a body of empty lines only is the empty body.
    end = len(body)
    while body.endswith(b"\r\n\r\n", 0, end):
        end -= 2
    if end == 2:
        return b""
    return body if end == len(body) else body[:end]


def relaxed_header(name: bytes, value: bytes) -> bytes:
    """One header field in relaxed canonical form (RFC 6376 section 3.4.2), CRLF-terminated."""
    return name.lower().rstrip() + b":" + _relaxed_value(value) + b"\r\n"


def _relaxed_value(value: bytes) -> bytes:
    # Unfold, collapse WSP runs to one SP, strip both ends. The ends are stripped of all
    # ASCII whitespace, not only WSP, exactly as dkimpy's verifier does.
    if b"\n" in value:
        value = value.replace(b"\r\n", b"").replace(b"\n", b"")
    if b"\t" in value:
        value = value.replace(b"\t", b" ")
    if b"  " in value:  # rare in a header field; a regex call costs more than the test
        value = _SPACE_RUN.sub(b" ", value)
    return value.strip()


def _signed_header_data(
    names: Sequence[bytes], headers: Sequence[tuple[bytes, bytes]], include: Sequence[bytes]
) -> bytes:
    """The canonical fields that h= lists, each name taken bottom-up as verifiers pick them."""
    # RFC 6376 section 5.4.2: repeated names take occurrences from the bottom up; a name
    # with no occurrence left (the oversigned copies) contributes nothing.
    occurrences: dict[bytes, list[int]] = {}
    for index, name in enumerate(names):
        occurrences.setdefault(name, []).append(index)
    fields: list[tuple[bytes, bytes]] = []
    for wanted in include:
        left = occurrences.get(wanted)
        if left:
            fields.append((wanted, headers[left.pop()][1]))
    # One look at all the values at once: without a line break, a tab or a run of spaces
    # in any of them (the usual case), relaxing a value only strips its ends.
    values = b"".join([value for _, value in fields])
    relax: Callable[[bytes], bytes] = (
        _relaxed_value if b"\n" in values or b"\t" in values or b"  " in values else bytes.strip
    )
    return b"".join([name + b":" + relax(value) + b"\r\n" for name, value in fields])


def _check_names(domain: str, selector: str) -> None:
    for what, name in (("domain", domain), ("selector", ed25519_selector(selector))):
        labels = name.split(".")
        if not all(_LABEL.fullmatch(label) for label in labels) or len(name) > 253:
            raise ConfigError(f"DKIM {what} {name!r} is not an ASCII DNS name")


def signing_domains(key_dir: Path, selector: str) -> list[str]:
    """The domains that have an RSA key file for `selector` in `key_dir`, by file name
    (none if the directory does not exist); ConfigError if it cannot be listed."""
    suffix = f".{selector}.rsa.pem"
    try:
        names = [path.name for path in key_dir.iterdir()]
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise ConfigError(f"DKIM key directory {key_dir} cannot be read ({exc.strerror})") from None
    return sorted(name[: -len(suffix)] for name in names if name.endswith(suffix))


def _rsa_path(key_dir: Path, domain: str, selector: str) -> Path:
    return key_dir / f"{domain}.{selector}.rsa.pem"


def _ed25519_path(key_dir: Path, domain: str, selector: str) -> Path:
    return key_dir / f"{domain}.{ed25519_selector(selector)}.ed25519.pem"


def _publish_key(path: Path, key: rsa.RSAPrivateKey | Ed25519PrivateKey) -> None:
    """Write `key` to `path` with mode 0600 unless a key is already there."""
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Never readable by others, never half-written, and a key created meanwhile by another
    # process is never replaced: theirs is the one to load and publish.
    write_whole(path, pem, mode=0o600, replace=False)


def _read_key(path: Path, kind: str) -> PrivateKeyTypes:
    try:
        pem = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"DKIM {kind} key not found at {path}: generate it first") from None
    except OSError as exc:
        raise ConfigError(f"DKIM {kind} key at {path} is unreadable ({exc.strerror})") from None
    try:
        return serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        # The parser's message is dropped: it could quote the file's content.
        raise ConfigError(
            f"DKIM {kind} key at {path} is not an unencrypted PEM private key"
        ) from None


def _load_rsa(path: Path) -> rsa.RSAPrivateKey:
    key = _read_key(path, "rsa")
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ConfigError(f"DKIM key at {path} is not an RSA key")
    if key.key_size < MIN_RSA_KEY_BITS:
        raise ConfigError(f"DKIM RSA key at {path} is under 1024 bits")
    return key


def _load_ed25519(path: Path) -> Ed25519PrivateKey:
    key = _read_key(path, "ed25519")
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"DKIM key at {path} is not an Ed25519 key")
    return key


def _rsa_record(domain: str, selector: str, key: rsa.RSAPrivateKey) -> DnsRecord:
    # RFC 6376 section 3.6.1: p= is the SubjectPublicKeyInfo DER, base64.
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return DnsRecord(
        f"{selector}._domainkey.{domain}", f"v=DKIM1; k=rsa; p={base64.b64encode(spki).decode()}"
    )


def _ed25519_record(domain: str, selector: str, key: Ed25519PrivateKey) -> DnsRecord:
    # RFC 8463 section 4.2: p= is the raw 32-byte public key, base64 (no SPKI wrapper).
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return DnsRecord(
        f"{ed25519_selector(selector)}._domainkey.{domain}",
        f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode()}",
    )

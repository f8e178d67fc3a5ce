"""Turn a validated event into a multipart/alternative message, headers kept free of PHI.

The MIME is assembled by hand rather than through `email.message`: we generate every byte
ourselves, so we know the headers and body the DKIM signer needs without re-parsing, and
it costs a fraction of the stdlib's generator. Header values come only from validated
addresses, fixed per-language strings and opaque ids, so no field can create a header.
A part that is already 7bit data goes out as it is; any other is quoted-printable.
"""

from __future__ import annotations

import binascii
import datetime as dt
import email.charset
import email.utils
import hashlib
import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from email.header import Header
from functools import lru_cache
from operator import attrgetter
from typing import Any

from jinja2 import BaseLoader, Environment, PackageLoader, StrictUndefined, Template, nodes
from jinja2.visitor import NodeTransformer

from eobblast.events.schema import EobIssued
from eobblast.render.strings import STRINGS, language_key

# Every message's MIME boundary starts with this (then 32 hex digits): what lies between a
# notice's first and closing boundary is its body, which the bounce listener cuts out of a
# returned copy before keeping a report for review.
BOUNDARY_PREFIX = "=_eob_"
_BOUNDARY_BYTES = BOUNDARY_PREFIX.encode("ascii")

_MONEY_FIELDS = (
    "billed",
    "allowed",
    "deductible",
    "copay",
    "coinsurance",
    "plan_paid",
    "member_owes",
)
_line_amounts = attrgetter(*_MONEY_FIELDS)

# RFC 2045 section 2.7: 7bit data is short lines of US-ASCII without NUL, and CR and LF
# only as CRLF. Text made only of these bytes (LF becomes CRLF) goes out as it is.
_7BIT_TEXT = bytes([0x09, 0x0A, *range(0x20, 0x7F)])
_MAX_LINE = 998  # octets, without the CRLF (RFC 5322 section 2.1.1)


@dataclass(frozen=True, slots=True)
class RenderedMessage:
    """A complete message: header fields in order, the CRLF body, and its envelope."""

    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    mail_from: str
    rcpt_to: str

    def to_bytes(self, prefix: list[bytes] | None = None) -> bytes:
        """The wire form, with `prefix` header lines (e.g. DKIM-Signature) on top."""
        parts = list(prefix or ())
        parts.extend(name + b": " + value + b"\r\n" for name, value in self.headers)
        parts.append(b"\r\n")
        parts.append(self.body)
        return b"".join(parts)


def _money(value: Decimal) -> str:
    # The sign before the currency symbol (-$12.50), and no "-$0.00".
    text = f"${abs(value):,.2f}"
    return f"-{text}" if value < 0 and text != "$0.00" else text


def _money_text(amount: str) -> str:
    """`_money` of an amount as the schema lets it through (-?[0-9]{1,10}.[0-9]{2})."""
    # Most amounts (up to 999.99, no sign, no leading zero as in "012.50") print as they
    # are written: parsing and formatting them cost more than the rest of a line's row.
    if (
        len(amount) <= 6
        and amount[-3:-2] == "."
        and amount[0] != "-"
        and (amount[0] != "0" or len(amount) == 4)
    ):
        return "$" + amount
    return _money(Decimal(amount))


# A Message-ID's left part is a dot-atom: event ids may hold ":" or ".." (urn:uuid:...).
_DOT_ATOM = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")


def message_id(event_id: str, domain: str, suffix: str = "") -> str:
    """The Message-ID of an event's message: the event id itself when it is a dot-atom,
    else its hex form (`h` + hex), so the field always parses."""
    left = event_id if _DOT_ATOM.fullmatch(event_id) else "h" + event_id.encode().hex()
    return f"<eob.{left}{suffix}@{domain}>"


def _quoted_printable(text: str) -> bytes:
    # b2a_qp keeps lines under 76 characters; CRLF line ends as SMTP wants.
    data = text.replace("\r\n", "\n").encode("utf-8")
    return binascii.b2a_qp(data, quotetabs=False, istext=True).replace(b"\n", b"\r\n")


def _short_lines(data: bytes) -> bool:
    """Whether every line of `data` (LF-separated) is at most 998 octets long."""
    # Jump to the last LF within reach of each line start: a few steps for a whole part.
    start = 0
    while len(data) - start > _MAX_LINE:
        end = data.rfind(b"\n", start, start + _MAX_LINE + 1)
        if end < 0:
            return False
        start = end + 1
    return True


def _transfer_encoded(text: str) -> tuple[bytes, bytes]:
    """A text part's Content-Transfer-Encoding and its CRLF body.

    Text that already is 7bit data is sent as it is: no encoding to do, and none for the
    receiver to undo. Anything else (non-ASCII, control characters, a CR of its own, an
    overlong line, or our boundary prefix) goes quoted-printable.
    """
    if text.isascii():
        data = text.encode("ascii")
        # A boundary must not occur in the parts it delimits (RFC 2046 section 5.1.1);
        # quoted-printable writes "=" as "=3D", so it cannot occur there.
        if (
            not data.translate(None, _7BIT_TEXT)
            and _BOUNDARY_BYTES not in data
            and _short_lines(data)
        ):
            return b"7bit", data.replace(b"\n", b"\r\n")
    return b"quoted-printable", _quoted_printable(text)


@lru_cache(maxsize=8)
def _date_field(second: dt.datetime, offset: dt.timedelta | None) -> bytes:
    """The Date field of `second` (no microseconds) at UTC offset `offset`."""
    # Cached: messages sent in the same second share it, and formatting costs ~3 us. The
    # offset is part of the key because datetimes of one instant in two zones are equal.
    return email.utils.format_datetime(second).encode("ascii")


@lru_cache(maxsize=64)
def _subject(language: str, key: str = "subject") -> bytes:
    return Header(STRINGS[language][key], "utf-8").encode().encode("ascii")


@lru_cache(maxsize=256)
def _from_header(payer_name: str, address: str) -> bytes:
    # An ASCII name that holds "=?" goes encoded too: as it is, a reader would decode what
    # looks like an encoded word in it and show whatever text that carries.
    if payer_name.isascii() and "=?" not in payer_name:
        return email.utils.formataddr((payer_name, address)).encode("ascii")
    return f"{_folded(_phrase_words(payer_name), len('From: '))}\r\n <{address}>".encode("ascii")


# RFC 5322 atext: a word of only these stands in a display name as it is. At most 70
# characters, as an encoded word: the first line holds "From: " too, and a line with
# encoded words has at most 76 (RFC 2047).
_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]{1,70}")
_UTF8 = email.charset.Charset("utf-8")
_ENCODED_WORD = 70


def _phrase_words(name: str) -> list[str]:
    """A display name (non-ASCII, or holding "=?") as the words of an RFC 2047 phrase:
    ASCII words as they are, each run of the others as encoded words.

    Encoded words meet only inside a run too long for one: RFC 2047 says the space between
    two encoded words is no part of the text, but Python's email parser (CPython
    gh-128110), for one, keeps a space there and showed "Compañía" split as "Compa ñía".
    The standard library's own folding splits runs anywhere, so the words are chosen here
    and only encoded by it. A run that needs more than one encoded word still reads in such
    a parser with a space doubled (split after a space) or added (a long word split).
    """
    if name != " ".join(name.split()):
        return _encoded_words(name)  # spaces of its own (doubled, leading): kept encoded
    words: list[str] = []
    run: list[str] = []
    for word in name.split():
        if _ATOM.fullmatch(word) and "=?" not in word:
            if run:
                words += _encoded_words(" ".join(run))
                run.clear()
            words.append(word)
        else:
            run.append(word)
    if run:
        words += _encoded_words(" ".join(run))
    return words


def _encoded_words(text: str) -> list[str]:
    """`text` as encoded words of at most 70 characters, split after a space where one is
    not enough (the space goes with the word before it), within a word only where that
    word alone is too long."""
    encoded: list[str] = []
    pending = ""
    for piece in re.findall(r"\S+\s*|\s+", text):  # each word with the spaces after it
        if len(_UTF8.header_encode(pending + piece)) <= _ENCODED_WORD:
            pending += piece
            continue
        if pending:
            encoded.append(_UTF8.header_encode(pending))
            pending = ""
        if len(_UTF8.header_encode(piece)) <= _ENCODED_WORD:
            pending = piece
        else:
            lines = _UTF8.header_encode_lines(piece, itertools.repeat(_ENCODED_WORD))
            encoded += [line for line in lines if line]
    if pending:
        encoded.append(_UTF8.header_encode(pending))
    return encoded


def _folded(words: list[str], start: int) -> str:
    """The words on lines of at most 76 characters (a line's first character counted
    from `start`), folded with CRLF and a space."""
    lines = [words[0]]
    width = start + len(words[0])
    for word in words[1:]:
        if width + 1 + len(word) > 76:
            lines.append(word)
            width = 1 + len(word)
        else:
            lines[-1] += " " + word
            width += 1 + len(word)
    return "\r\n ".join(lines)


class _WordsInliner(NodeTransformer):
    """Turns `t["key"]` with a literal key into the language's string itself.

    Jinja renders a constant as template text, escaped once at compile time: the ~60
    per-message lookups (and, in HTML, escapes) of fixed words disappear. Every other use
    of `t` is left alone and still finds the `t` of the context.
    """

    def __init__(self, words: Mapping[str, str]) -> None:
        self._words = words

    def visit_Getitem(self, node: nodes.Getitem) -> nodes.Node:
        """Replace a lookup of a known word by its text."""
        key = node.arg
        if (
            isinstance(node.node, nodes.Name)
            and node.node.name == "t"
            and isinstance(key, nodes.Const)
            and key.value in self._words
        ):
            return nodes.Const(self._words[key.value], lineno=node.lineno)
        result: nodes.Node = self.generic_visit(node)
        return result


def _compile_for(
    env: Environment, loader: BaseLoader, name: str, words: Mapping[str, str]
) -> Template:
    """Template `name` with one language's words compiled in."""
    # The templates never rebind `t`, which is what makes inlining its words sound.
    source, filename, _ = loader.get_source(env, name)
    tree = _WordsInliner(words).visit(env.parse(source, name, filename))
    return env.from_string(tree)


def _render(template: Template, context: dict[str, Any]) -> str:
    """`template.render(context)` for templates that use no Jinja globals."""
    # Template.render copies the variables into a fresh dict merged with the globals
    # (iterating a ChainMap in Python): a quarter of a small template's cost. A shared
    # context takes the dict as it is; the templates use no globals (range, dict, ...).
    return "".join(template.root_render_func(template.new_context(context, shared=True)))


class Renderer:
    """Renders EOB events in the member's language into signed-ready messages."""

    def __init__(self, *, from_local_part: str = "eob-notices") -> None:
        self._from_local_part = from_local_part
        loader = PackageLoader("eobblast.render", "templates")
        common: dict[str, Any] = {
            "loader": loader,
            "undefined": StrictUndefined,
            "trim_blocks": True,
            "lstrip_blocks": True,
        }
        html = Environment(autoescape=True, **common)
        text = Environment(autoescape=False, **common)  # noqa: S701 - plain text part
        # One (text, HTML) pair per language, its words compiled in (see _WordsInliner).
        self._templates = {
            language: (
                _compile_for(text, loader, "eob.txt.j2", words),
                _compile_for(html, loader, "eob.html.j2", words),
            )
            for language, words in STRINGS.items()
        }
        self._notices = {
            language: (
                _compile_for(text, loader, "notice.txt.j2", words),
                _compile_for(html, loader, "notice.html.j2", words),
            )
            for language, words in STRINGS.items()
        }

    def context(self, event: EobIssued) -> dict[str, Any]:
        """The template variables for one event."""
        return self._context(event, language_key(event.member.preferred_language))

    def _context(self, event: EobIssued, language: str) -> dict[str, Any]:
        claim = event.claim
        lines: list[dict[str, str]] = []
        amount_rows: list[tuple[str, ...]] = []
        for line in claim.lines:
            amounts: tuple[str, ...] = _line_amounts(line)
            amount_rows.append(amounts)
            row = dict(zip(_MONEY_FIELDS, map(_money_text, amounts), strict=True))
            row["code"] = line.code
            row["description"] = line.description
            row["remark_codes"] = ", ".join(line.remark_codes)
            lines.append(row)
        acc = event.accumulators
        words = STRINGS[language]
        member_name = event.member.name
        payer = event.payer.name
        appeal_deadline = event.appeal.deadline.isoformat()
        return {
            "t": words,
            # The language the words are in (English where the member's is not served).
            "lang": language,
            "payer": payer,
            "member_name": member_name,
            # Filled in here, not in the templates: a method call from a template goes
            # through Jinja's call wrapper, which costs more than the formatting itself.
            "greeting": words["greeting"].format(name=member_name),
            "intro": words["intro"].format(payer=payer),
            "appeal_sentence": words["appeal_deadline"].format(date=appeal_deadline),
            "patient": claim.patient_name,
            "claim_id": claim.id,
            "provider": claim.provider.name,
            "npi": claim.provider.npi,
            "service_start": claim.service_period.start.isoformat(),
            "service_end": claim.service_period.end.isoformat(),
            "processed": claim.processed_date.isoformat(),
            "lines": lines,
            # Each column summed exactly, as Decimals.
            "totals": {
                name: _money(sum(map(Decimal, column), Decimal(0)))
                for name, *column in zip(_MONEY_FIELDS, *amount_rows, strict=True)
            },
            "ded_met": _money_text(acc.deductible.met),
            "ded_limit": _money_text(acc.deductible.limit),
            "oop_met": _money_text(acc.out_of_pocket.met),
            "oop_limit": _money_text(acc.out_of_pocket.limit),
            "appeal_deadline": appeal_deadline,
            "appeal_instructions": event.appeal.instructions,
        }

    def render(self, event: EobIssued, *, now: dt.datetime | None = None) -> RenderedMessage:
        """Render one event into a multipart/alternative message (text + HTML)."""
        language = language_key(event.member.preferred_language)
        ctx = self._context(event, language)
        text_template, html_template = self._templates[language]
        return self._assemble(
            event,
            language,
            _render(text_template, ctx),
            _render(html_template, ctx),
            subject=_subject(language),
            message_id=message_id(event.event_id, event.payer.sending_domain),
            now=now,
        )

    def render_html(self, event: EobIssued) -> str:
        """The EOB as a standalone HTML page (what the secure portal shows after pickup)."""
        language = language_key(event.member.preferred_language)
        return _render(self._templates[language][1], self._context(event, language))

    def render_notice(
        self, event: EobIssued, *, link: str, expires: dt.date, now: dt.datetime | None = None
    ) -> RenderedMessage:
        """A secure-portal notice: no PHI, only the payer's name and a single-use link."""
        language = language_key(event.member.preferred_language)
        words = STRINGS[language]
        ctx = {
            "lang": language,
            "link": link,
            "body": words["notice_body"].format(payer=event.payer.name),
            "identity": words["notice_identity"].format(date=expires.isoformat()),
        }
        text_template, html_template = self._notices[language]
        return self._assemble(
            event,
            language,
            _render(text_template, ctx),
            _render(html_template, ctx),
            subject=_subject(language, "notice_subject"),
            message_id=message_id(event.event_id, event.payer.sending_domain, ".portal"),
            now=now,
        )

    def _assemble(
        self,
        event: EobIssued,
        language: str,
        text: str,
        html: str,
        *,
        subject: bytes,
        message_id: str,
        now: dt.datetime | None,
    ) -> RenderedMessage:
        domain = event.payer.sending_domain
        sender = f"{self._from_local_part}@{domain}"
        # The boundary is derived from the message id: unique per message, never PHI.
        boundary = BOUNDARY_PREFIX + hashlib.sha256(message_id.encode()).hexdigest()[:32]
        delimiter = b"--" + boundary.encode()
        text_encoding, text_body = _transfer_encoded(text)
        html_encoding, html_body = _transfer_encoded(html)
        body = b"".join(
            (
                delimiter + b"\r\n",
                b"Content-Type: text/plain; charset=utf-8\r\n",
                b"Content-Transfer-Encoding: " + text_encoding + b"\r\n\r\n",
                text_body,
                b"\r\n" + delimiter + b"\r\n",
                b"Content-Type: text/html; charset=utf-8\r\n",
                b"Content-Transfer-Encoding: " + html_encoding + b"\r\n\r\n",
                html_body,
                b"\r\n" + delimiter + b"--\r\n",
            )
        )
        when = now or dt.datetime.now(dt.UTC)
        headers = (
            (b"From", _from_header(event.payer.name, sender)),
            (b"To", event.member.email.encode("ascii")),
            (b"Subject", subject),
            (b"Date", _date_field(when.replace(microsecond=0), when.utcoffset())),
            (b"Message-ID", message_id.encode("ascii")),
            (b"MIME-Version", b"1.0"),
            (b"Content-Type", f'multipart/alternative; boundary="{boundary}"'.encode("ascii")),
            (b"Content-Language", language.encode("ascii")),
            (b"X-EOB-Event-ID", event.event_id.encode("ascii")),
        )
        return RenderedMessage(headers, body, sender, event.member.email)

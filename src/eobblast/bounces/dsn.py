"""Parse asynchronous bounces: RFC 3464 DSNs and the non-standard notices real MTAs send.

No maintained PyPI library does this job: flufl.bounce (maintained, Mailman's) returns
addresses only, without status, diagnostic or remote MTA; sisimai has no Python port;
flanker's bounce detection last shipped in 2019. So this is a careful parser over the
standard library's `email` package, measured against the sisimai corpus in the tests.

The parser never raises: whatever it cannot read comes back as kind UNKNOWN, category
OTHER, is_bounce None and needs_review True, so that the I/O shell can park it for a person.
"""

from __future__ import annotations

import base64
import binascii
import email
import email.policy
import enum
import html
import json
import quopri
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from email.message import Message
from email.parser import HeaderParser
from email.policy import Policy
from typing import Any

from eobblast.bounces.category import BounceCategory
from eobblast.bounces.classify import classify_reply, find_enhanced_status, find_reply_code
from eobblast.bounces.rules import BounceRules

__all__ = [
    "TOO_MANY_PARTS",
    "UNREADABLE",
    "BounceKind",
    "FailedRecipient",
    "ParsedBounce",
    "ReturnedHeaders",
    "TooManyParts",
    "parse_bounce",
    "read_mime",
]

# Bounds on the work one message can cause, whatever a stranger sends to the bounce address.
MAX_INPUT = 4 * 1024 * 1024
MAX_PARTS = 200
MAX_DEPTH = 12
MAX_NOTICE = 64 * 1024
MAX_DIAGNOSTIC = 1000
MAX_RECIPIENTS = 100
# Real reports have a handful of MIME parts, a returned notice's own included (at most 18
# in the 632 of the sisimai corpus). The standard library's parser spends seconds on a few
# megabytes of tiny parts, so it is stopped past this many: such a message is no report.
MAX_MIME_PARTS = 100
# ParsedBounce.problem of such a message.
TOO_MANY_PARTS = "too many MIME parts"
UNREADABLE = "unreadable message"


class BounceKind(enum.StrEnum):
    """What sort of message arrived at the bounce address."""

    DSN = "dsn"  # RFC 3464 delivery-status fields (in a report part or inline)
    VENDOR = "vendor"  # a non-standard bounce notice (Exim, qmail, Gmail, Yahoo ...)
    AUTOREPLY = "autoreply"  # vacation or other RFC 3834 auto-reply: the mail was delivered
    FEEDBACK = "feedback"  # ARF (RFC 5965) complaint or opt-out report
    UNKNOWN = "unknown"  # none of these, or unreadable


@dataclass(frozen=True, slots=True)
class FailedRecipient:
    """One recipient a bounce reports on, with what the remote side said and its category."""

    address: str
    status: str | None
    diagnostic: str | None
    action: str | None
    remote_mta: str | None
    category: BounceCategory
    reply_code: int | None = None
    matched_rule: str = "default"
    permanent: bool = False
    original_recipient: str | None = None
    # Where the address came from: dsn, x-failed-recipients, text or original-to.
    source: str = "dsn"


@dataclass(frozen=True, slots=True)
class ReturnedHeaders:
    """What identifies the original message: for VERP and X-EOB-Event-ID lookup."""

    message_id: str | None = None
    eob_event_id: str | None = None
    # The returned message's own Return-Path: our VERP address when the MTA kept it.
    return_path: str | None = None
    # Where the bounce itself was delivered (envelope RCPT TO, To, Delivered-To ...).
    envelope_to: str | None = None
    # RFC 3461 ENVID echoed as Original-Envelope-Id.
    envelope_id: str | None = None
    # Every address worth trying with verp.parse_return_path, most reliable first.
    verp_candidates: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ParsedBounce:
    """The parser's reading of one message that arrived at the bounce address."""

    kind: BounceKind
    is_bounce: bool | None
    recipients: tuple[FailedRecipient, ...] = ()
    original_message_id: str | None = None
    original_headers: ReturnedHeaders = field(default_factory=ReturnedHeaders)
    # The first failed recipient's category (or the notice's, when no recipient was found).
    category: BounceCategory = BounceCategory.OTHER
    needs_review: bool = False
    # Why a person should look: a fixed phrase, never message content.
    problem: str | None = None
    feedback_type: str | None = None


def parse_bounce(
    raw: bytes | str,
    *,
    envelope_to: str | None = None,
    rules: BounceRules | None = None,
) -> ParsedBounce:
    """Read one message from the bounce listener; never raises."""
    try:
        return _parse(raw, envelope_to, rules)
    except TooManyParts:
        return _unread(envelope_to, TOO_MANY_PARTS)
    except Exception:  # the contract is "never raises"; the shell parks it
        return _unread(envelope_to, UNREADABLE)


def _unread(envelope_to: str | None, problem: str) -> ParsedBounce:
    """A message not read to the end, for a person to look at."""
    return ParsedBounce(
        kind=BounceKind.UNKNOWN,
        is_bounce=None,
        original_headers=ReturnedHeaders(
            envelope_to=envelope_to, verp_candidates=(envelope_to,) if envelope_to else ()
        ),
        needs_review=True,
        problem=problem,
    )


# --------------------------------------------------------------------------- parsing


class TooManyParts(ValueError):
    """A message has more MIME parts than any bounce report: it was not read further."""


def read_mime(data: bytes, *, policy: Policy = email.policy.compat32) -> Message:
    """Parse a message as `email.message_from_bytes` does, but raise TooManyParts as soon
    as the parser makes more than MAX_MIME_PARTS parts (nesting is bounded with them)."""
    make = policy.message_factory or Message
    made = 0

    def factory(policy: Policy = policy) -> Message:
        nonlocal made
        made += 1
        if made > MAX_MIME_PARTS + 1:  # the parser makes one first to try the factory out
            raise TooManyParts("more MIME parts than a bounce report has")
        return make(policy=policy)

    return email.message_from_bytes(data, _class=factory, policy=policy)


def _parse(raw: bytes | str, envelope_to: str | None, rules: BounceRules | None) -> ParsedBounce:
    data = raw.encode("utf-8", "surrogateescape") if isinstance(raw, str) else bytes(raw)
    data = data[:MAX_INPUT]
    msg = _repair_boundary(_message_from_bytes(data))
    parts = list(_walk(msg))
    reader = _Reader(msg, parts, envelope_to, rules)
    return reader.read()


def _message_from_bytes(data: bytes) -> Message:
    # compat32 shrugs at almost any garbage; the modern policy is the second opinion, and a
    # headers-only parse is the last resort (e.g. multiparts nested past the recursion limit).
    for policy in (email.policy.compat32, email.policy.default):
        try:
            return read_mime(data, policy=policy)
        except TooManyParts:
            raise  # the other reading makes as many parts
        except Exception:  # noqa: S112 - try the next, more forgiving reading
            continue
    text = data.decode("latin-1")
    head, _, body = text.partition("\n\n")
    msg = HeaderParser(policy=email.policy.compat32).parsestr(head + "\n\n", headersonly=True)
    msg.set_payload(body)
    return msg


_BOUNDARY_TRIES = 16


def _repair_boundary(msg: Message) -> Message:
    """Re-read a multipart whose declared boundary never occurs (anonymisers, broken MTAs)."""
    payload = msg.get_payload()
    if not isinstance(payload, str) or not _ctype(msg).startswith("multipart/"):
        return msg
    lines = payload[:MAX_NOTICE].splitlines()
    tried: set[str] = set()
    for line in lines:
        match = re.fullmatch(r"--([0-9A-Za-z'()+_,./:=? -]{1,70}?)\s*", line)
        if match is None or match[1].endswith("--") or match[1] in tried:
            continue
        if len(tried) == _BOUNDARY_TRIES:
            # Each try scans the whole payload: a message of thousands of "--x" lines must
            # not hold the listener's event loop for minutes.
            return msg
        boundary = match[1]
        tried.add(boundary)
        if f"--{boundary}--" not in payload and payload.count(f"--{boundary}") < 2:
            continue
        try:
            msg.set_boundary(boundary)
            repaired = read_mime(msg.as_bytes())
        except TooManyParts:
            raise
        except Exception:  # keep the unrepaired reading
            return msg
        return repaired if isinstance(repaired.get_payload(), list) else msg
    return msg


@dataclass(frozen=True, slots=True)
class _Part:
    part: Message
    depth: int
    # Inside a returned original message (message/rfc822): not the bounce's own words.
    inside_original: bool


def _walk(msg: Message) -> Iterator[_Part]:
    # Iterative and bounded: Message.walk() recurses and trusts the sender's nesting.
    stack: list[_Part] = [_Part(msg, 0, False)]
    seen = 0
    while stack and seen < MAX_PARTS:
        item = stack.pop()
        seen += 1
        yield item
        if item.depth >= MAX_DEPTH:
            continue
        payload = item.part.get_payload()
        if not isinstance(payload, list):
            continue
        ctype = _ctype(item.part)
        is_original = ctype in _ORIGINAL_TYPES
        children = [
            _Part(child, item.depth + 1, item.inside_original or is_original)
            for child in payload
            if isinstance(child, Message)
        ]
        stack.extend(reversed(children))


def _ctype(part: Message) -> str:
    try:
        return part.get_content_type()
    except Exception:  # a broken Content-Type header
        return "text/plain"


def _header(msg: Message, name: str) -> str | None:
    try:
        value = msg.get(name)
    except Exception:  # undecodable header bytes
        return None
    if value is None:
        return None
    text = str(value)
    if "=?" in text:
        text = _decode_words(text)
    return " ".join(text.split())[:2000] or None


def _decode_words(text: str) -> str:
    try:
        pieces = email.header.decode_header(text)
    except Exception:  # malformed encoded-words stay as they are
        return text
    out: list[str] = []
    for chunk, charset in pieces:
        if isinstance(chunk, bytes):
            out.append(_decode_bytes(chunk, charset))
        else:
            out.append(chunk)
    return "".join(out)


def _decode_bytes(data: bytes, charset: str | None) -> str:
    for candidate in (charset, "utf-8"):
        if not candidate:
            continue
        try:
            return data.decode(candidate, "replace")
        except (LookupError, ValueError):
            continue
    return data.decode("latin-1")


def _part_text(part: Message) -> str:
    """The decoded body of a leaf (or of a message/* part, as its source text)."""
    payload = part.get_payload()
    cte = (_header(part, "Content-Transfer-Encoding") or "").strip().lower()
    if isinstance(payload, list):
        # message/delivery-status comes pre-split into header blocks: put the text back.
        blocks = []
        for block in payload:
            if isinstance(block, Message):
                blocks.append(_block_source(block))
        source = "\n".join(blocks)
        return _decode_transfer(source, cte, part.get_content_charset())
    if not isinstance(payload, str):
        return ""
    return _decode_transfer(payload, cte, _charset(part))


def _charset(part: Message) -> str | None:
    try:
        return part.get_content_charset()
    except Exception:  # a broken charset parameter
        return None


def _block_source(block: Message) -> str:
    lines = [f"{k}: {v}" for k, v in block.items()]
    inner = block.get_payload()
    if isinstance(inner, str) and inner.strip():
        lines.append("")
        lines.append(inner)
    return "\n".join(lines) + "\n"


def _decode_transfer(text: str, cte: str, charset: str | None) -> str:
    data: bytes
    raw = text.encode("latin-1", "replace") if not text.isascii() else text.encode("ascii")
    if cte == "base64":
        try:
            data = base64.b64decode(re.sub(rb"[^A-Za-z0-9+/=]", b"", raw) + b"===")
        except (binascii.Error, ValueError):
            data = raw
    elif cte == "quoted-printable":
        data = quopri.decodestring(raw)
    else:
        if not text.isascii():
            # Already text (8bit body read as latin-1 by compat32 or str by the default policy).
            try:
                return text.encode("latin-1").decode(charset or "utf-8", "replace")
            except (LookupError, UnicodeEncodeError):
                return text
        data = raw
    return _decode_bytes(data, charset)


# --------------------------------------------------------------------------- patterns

_ORIGINAL_TYPES = frozenset(
    {"message/rfc822", "text/rfc822-headers", "message/rfc822-headers", "message/global"}
)
_HEADER_TYPES = frozenset(
    {"text/rfc822-headers", "message/rfc822-headers", "message/global-headers"}
)
_DSN_TYPES = frozenset({"message/delivery-status", "message/global-delivery-status"})

# An address, with bounded quantifiers and a start boundary so that long runs of word
# characters cost linear time.
_ADDRESS = re.compile(
    r"(?<![\w.+=/!#$%&'*?^`{|}~-])"
    r"(\"[^\"\r\n]{1,64}\"|[\w.+=/!#$%&'*?^`{|}~-]{1,64})"
    r"@((?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?\.){1,10}[A-Za-z][A-Za-z0-9-]{0,62})"
    r"(?![\w-]|\.[A-Za-z0-9])"
)
_DAEMON = re.compile(
    r"^(mailer-daemon|mailer_daemon|maildaemon|mail-daemon|mailerdaemon|postmaster|"
    r"mdaemon|mail\.daemon|double-bounce|nobody)$",
    re.IGNORECASE,
)
# Mail systems, never a member's mailbox (postmaster can be: some bounces are to postmaster).
_NOT_A_RECIPIENT = re.compile(
    r"^(mailer-daemon|mailer_daemon|maildaemon|mail-daemon|mailerdaemon|mdaemon|double-bounce)$",
    re.IGNORECASE,
)
_BOUNCE_FROM = re.compile(
    r"mailer-daemon|post_?master|mail ?delivery|mail-?daemon|mail ?administrator|"
    r"delivery ?(status|subsystem|system)|\bmdaemon\b",
    re.IGNORECASE,
)
_BOUNCE_SUBJECT = re.compile(
    r"undeliver|undelivered|deliver(y|ed)? (status|fail|problem|report|notification|error|has "
    r"failed|incomplete|delayed)|failure notice|returned mail|mail delivery failed|"
    r"(could|can)( ?no|')t be delivered|non ?remis|unzustellbar|mail system error|"
    r"returned to sender|nondeliverable|non-?delivery|message not delivered|delayed mail|"
    r"mail failure|delivery failure|unable to deliver|rejected:|mail could not be delivered|"
    r"failed delivery|delivery notification|warning: could not send|error sending message|"
    r"message you sent|sistema de correo|echec|returned message|bounce",
    re.IGNORECASE,
)
_BOUNCE_BODY = re.compile(
    r"created automatically by mail delivery software|this is the qmail-send program|"
    r"could not be delivered|couldn't be delivered|can ?not be delivered|could not deliver|"
    r"following address(es)? failed|delivery to the following recipient|delivery has failed|"
    r"wasn't able to deliver|transcript of session follows|permanent fatal error|"
    r"unable to deliver|error delivering|unable to be delivered|"
    r"message (was|could) not (be )?(delivered|sent)|delivery (status notification|failed|"
    r"failure)|undeliverable|returned to sender|not delivered|failed to deliver|"
    r"did not reach the following|rejected your message|your message was (rejected|bounced)|"
    r"following recipients? (failed|could not)|mail delivery failed|delivery problem|"
    r"undelivered mail|permanent error|temporary error|delivery attempts? (will continue|failed)|"
    r"invalid user address|^\s*rcpt to:",
    re.IGNORECASE | re.MULTILINE,
)
_AUTOREPLY_SUBJECT = re.compile(
    r"^(auto(matic)?[ -]?(reply|response|antwort|respuesta)|auto:|out of (the )?office|"
    r"vacation|away from|abwesenheit|absence|r[ée]ponse automatique|自動応答|"
    r"i am (currently )?(out|away))",
    re.IGNORECASE,
)
# Where a returned original message starts in a plain-text notice: a separator line with a
# phrase, a phrase specific enough to stand anywhere early in a line, or (last) the first
# header line of a copied message.
_CUT = re.compile(
    r"^[ \t>|]*(?:[-=*_|]{2,}[ \t]*(?:original message|returned message|original mail|"
    r"message text|returned mail|undelivered message|original headers)"
    r"|.{0,60}?(?:this is a copy of (the|your) message|below this line is a copy|"
    r"copy of the (original )?message|(unsent|original|returned) message follows|"
    r"message headers follow|headers? of the original message|original message headers|"
    r"message text follows|copy of the message header|bounced e-?mail\s*:|"
    r"text of the (original|returned) message|the headers of your message|"
    r"content-type: message/rfc822))",
    re.IGNORECASE | re.MULTILINE,
)
_HEADER_BLOCK = re.compile(
    r"^(?:Received: from |Return-Path: ?<|DKIM-Signature: |X-Received: |ARC-Seal: )",
    re.MULTILINE,
)
# A warning that the reporting MTA is still trying: not a failure (yet).
_DELAYED = re.compile(
    r"warning message only|do not need to resend|will (continue|keep) (trying|to try)|"
    r"delivery (is |has been )?delayed|has been delayed|still (trying|retrying)",
    re.IGNORECASE,
)
_DSN_FIELD = re.compile(
    r"^(final-recipient|original-recipient|x-actual-recipient)\s*:", re.I | re.M
)
_EVENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
_EVENT_HEADER = re.compile(r"^X-EOB-Event-ID:[ \t]*([^\s]{1,80})", re.IGNORECASE | re.MULTILINE)
_TAG = re.compile(r"<[^<>]{0,2000}>")
# A mention that is somebody's sender, not a failed recipient.
_SENDER_CONTEXT = re.compile(
    r"(mail from|from|sender|sent by|envelope-from|return-path|reply-to|errors-to|contact|"
    r"send mail to|mailto|write to|generated from|expanded from|forwarded from|alias)"
    r"\s*[:=]?\s*[<(\"\[]?$",
    re.IGNORECASE,
)
# A header-like summary line ("To: ...") in the notice: a fallback candidate only.
_SUMMARY_LINE = re.compile(r"^\s*(to|cc|bcc|an|para|à)\s*:", re.IGNORECASE)
_ID_LINE = re.compile(r"message-id|msgid|in-reply-to|references|\bid[=:<]", re.IGNORECASE)


def _addresses(text: str) -> Iterator[re.Match[str]]:
    return _ADDRESS.finditer(text)


def _address_in(value: str | None) -> str | None:
    if not value:
        return None
    match = _ADDRESS.search(value[:2000])
    return f"{match[1]}@{match[2]}" if match else None


def _norm(address: str) -> str:
    return address.strip().strip("<>").lower()


# --------------------------------------------------------------------------- the reader


class _Reader:
    """One parse: the message, its parts and the decisions taken so far."""

    def __init__(
        self,
        msg: Message,
        parts: list[_Part],
        envelope_to: str | None,
        rules: BounceRules | None,
    ) -> None:
        self.msg = msg
        self.parts = parts
        self.envelope_to = envelope_to
        self.rules = rules
        self.subject = _header(msg, "Subject") or ""
        self.from_ = _header(msg, "From") or ""
        self.original: Message | None = None
        self.notice = ""
        self._split: tuple[str, str] | None = None

    def read(self) -> ParsedBounce:
        """Decide what the message is and extract what the shell needs."""
        self.notice = self._notice_text()
        self.original = self._original_message()
        headers = self._returned_headers()
        ctype = _ctype(self.msg)
        report_type = (
            (self.msg.get_param("report-type") or "") if ctype == "multipart/report" else ""
        )
        report_type = str(report_type).lower()

        ses = _ses_notification(self.notice)
        if ses is not None:
            return self._ses(ses, headers)

        feedback = self._part_of("message/feedback-report")
        if report_type == "feedback-report" or feedback is not None:
            return self._feedback(feedback, headers)
        if self.subject.lower().startswith("complaint about message from"):
            # Microsoft's JMRP: the complained-about message, no report part.
            return self._feedback(None, headers, feedback_type="abuse")
        if (_header(self.msg, "X-Apple-Unsubscribe") or "").lower() == "true":
            # A mailto: unsubscribe sent by the member's mail client.
            sender = _address_in(self.from_)
            return self._feedback(None, headers, feedback_type="opt-out", sender=sender)

        dsn_blocks = self._dsn_blocks()
        if dsn_blocks is not None:
            per_message, per_recipient = dsn_blocks
            recipients = self._dsn_recipients(per_recipient)
            if per_message.get("original-envelope-id"):
                envid = per_message["original-envelope-id"].strip()[:200]
                headers = _replace_headers(headers, envelope_id=envid)
            if per_recipient and not recipients and not self._only_successes(per_recipient):
                # Final-Recipient was a file, a pipe or "@host": the notice text names someone,
                # and the report's own Status and Diagnostic-Code still say why.
                recipients = self._with_block_reason(self._text_recipients(), per_recipient)
            if recipients or per_recipient:
                return self._result(BounceKind.DSN, recipients, headers)

        looks_bounce = self._looks_like_bounce()
        if looks_bounce:
            recipients = self._text_recipients()
            return self._result(BounceKind.VENDOR, recipients, headers)

        if self._looks_like_autoreply():
            return ParsedBounce(
                kind=BounceKind.AUTOREPLY,
                is_bounce=False,
                original_message_id=headers.message_id,
                original_headers=headers,
            )
        return ParsedBounce(
            kind=BounceKind.UNKNOWN,
            is_bounce=None,
            original_message_id=headers.message_id,
            original_headers=headers,
            needs_review=True,
            problem="not recognised as a bounce",
        )

    # ------------------------------------------------------------------ pieces

    def _part_of(self, ctype: str) -> Message | None:
        for item in self.parts:
            if not item.inside_original and _ctype(item.part) == ctype:
                return item.part
        return None

    def _notice_text(self) -> str:
        """The bounce's own human-readable words, without the returned original."""
        plain: list[str] = []
        markup: list[str] = []
        for item in self.parts:
            if item.inside_original:
                continue
            ctype = _ctype(item.part)
            broken_multipart = ctype.startswith("multipart/") and isinstance(
                item.part.get_payload(), str
            )
            if (
                ctype == "text/plain"
                or broken_multipart
                or (ctype.startswith("text/") and ctype not in _HTML_OR_HEADERS)
            ):
                plain.append(_part_text(item.part))
            elif ctype == "text/html":
                markup.append(_html_to_text(_part_text(item.part)))
            if sum(map(len, plain)) > MAX_NOTICE:
                break
        text = "\n".join(plain) if any(p.strip() for p in plain) else "\n".join(markup)
        return text[:MAX_NOTICE].replace("\r\n", "\n").replace("\r", "\n")

    def _cut_notice(self) -> tuple[str, str]:
        """The notice split at the line where an inline copy of the original begins."""
        if self._split is None:
            match = _CUT.search(self.notice)
            block = None if match else _HEADER_BLOCK.search(self.notice)
            if match is not None:
                self._split = self.notice[: match.start()], self.notice[match.end() :]
            elif block is not None:
                self._split = self.notice[: block.start()], self.notice[block.start() :]
            else:
                self._split = self.notice, ""
        return self._split

    def _original_message(self) -> Message | None:
        for item in self.parts:
            ctype = _ctype(item.part)
            if item.depth == 0:
                continue
            if ctype in ("message/rfc822", "message/global"):
                payload = item.part.get_payload()
                if isinstance(payload, list) and payload and isinstance(payload[0], Message):
                    return payload[0]
                if isinstance(payload, str):
                    return _headers_from_text(payload)
            if ctype in _HEADER_TYPES:
                return _headers_from_text(_part_text(item.part))
        _, tail = self._cut_notice()
        if tail:
            return _headers_from_text(tail.lstrip("-= \t\n"))
        return None

    def _returned_headers(self) -> ReturnedHeaders:
        original = self.original
        message_id = event_id = return_path = None
        if original is not None:
            message_id = _message_id(_header(original, "Message-ID"))
            event_id = _event_id(_header(original, "X-EOB-Event-ID"))
            return_path = _address_in(_header(original, "Return-Path"))
        if event_id is None:
            # Some MTAs return the headers as prose or mangle the attachment: look anywhere.
            match = _EVENT_HEADER.search(self._raw_text())
            if match:
                event_id = _event_id(match[1])
        delivered = [
            _address_in(self.envelope_to),
            _address_in(_header(self.msg, "X-Original-To")),
            _address_in(_header(self.msg, "Delivered-To")),
            _address_in(_header(self.msg, "To")),
            return_path,
        ]
        candidates = tuple(dict.fromkeys(a for a in delivered if a))
        return ReturnedHeaders(
            message_id=message_id,
            eob_event_id=event_id,
            return_path=return_path,
            envelope_to=next((a for a in delivered[:4] if a), None),
            verp_candidates=candidates,
        )

    def _raw_text(self) -> str:
        chunks: list[str] = []
        size = 0
        for item in self.parts:
            payload = item.part.get_payload()
            if isinstance(payload, str):
                chunks.append(payload[:MAX_NOTICE])
                size += len(chunks[-1])
            for key, value in item.part.items():
                if key.lower() == "x-eob-event-id":
                    chunks.append(f"X-EOB-Event-ID: {value}")
            if size > 4 * MAX_NOTICE:
                break
        return "\n".join(chunks)

    # ------------------------------------------------------------------ DSN

    def _dsn_blocks(self) -> tuple[dict[str, str], list[dict[str, str]]] | None:
        texts: list[str] = []
        for item in self.parts:
            if not item.inside_original and _ctype(item.part) in _DSN_TYPES:
                texts.append(_part_text(item.part))
        if not texts:
            # Some MTAs put the delivery-status fields in the text part itself.
            head, _ = self._cut_notice()
            inline = _DSN_FIELD.search(head)
            if inline is not None:
                texts.append(head[inline.start() :])
        if not texts:
            return None
        per_message: dict[str, str] = {}
        per_recipient: list[dict[str, str]] = []
        for text in texts:
            for block in _field_blocks(text):
                if any(k in block for k in _RECIPIENT_FIELDS):
                    per_recipient.append(block)
                else:
                    for key, value in block.items():
                        per_message.setdefault(key, value)
        return per_message, per_recipient

    @staticmethod
    def _only_successes(blocks: list[dict[str, str]]) -> bool:
        actions = {_action(b) for b in blocks}
        return bool(actions) and actions <= _SUCCESS_ACTIONS

    def _dsn_recipients(self, blocks: list[dict[str, str]]) -> list[FailedRecipient]:
        out: list[FailedRecipient] = []
        seen: set[tuple[str, str]] = set()
        head, _ = self._cut_notice()
        for block in blocks:
            final = _dsn_address(block.get("final-recipient"))
            original = _dsn_address(block.get("original-recipient"))
            actual = _dsn_address(block.get("x-actual-recipient"))
            address = final or original or actual
            if not address:
                continue
            action = _action(block)
            if action in _SUCCESS_ACTIONS:
                continue
            status = _status_field(block.get("status"))
            diagnostic = _unwrap(_strip_type(block.get("diagnostic-code")))
            if not diagnostic:
                # Some MTAs leave the reason to the human-readable part only.
                diagnostic = _segment_for(head, address)
            if action is None and status is None and not diagnostic:
                continue
            key = (_norm(address), action or "")
            if key in seen:
                continue
            seen.add(key)
            # The remote server's own code (in its words) beats the reporting MTA's summary.
            enhanced = _status_text(diagnostic or "") or status
            verdict = classify_reply(None, enhanced, diagnostic or "", rules=self.rules)
            out.append(
                FailedRecipient(
                    address=address,
                    status=status,
                    diagnostic=_clip(diagnostic),
                    action=action,
                    remote_mta=_strip_type(block.get("remote-mta")),
                    category=verdict.category,
                    reply_code=_reply_code(diagnostic),
                    matched_rule=verdict.matched_rule,
                    permanent=verdict.permanent,
                    original_recipient=original if original != address else None,
                    source="dsn",
                )
            )
            if len(out) >= MAX_RECIPIENTS:
                break
        return out

    # ------------------------------------------------------------------ vendor notices

    def _looks_like_bounce(self) -> bool:
        if _header(self.msg, "X-Failed-Recipients"):
            return True
        from_address = _address_in(self.from_) or ""
        local = from_address.split("@")[0]
        if _DAEMON.match(local) or _BOUNCE_FROM.search(self.from_):
            return True
        if _BOUNCE_SUBJECT.search(self.subject):
            return True
        head, _ = self._cut_notice()
        return bool(_BOUNCE_BODY.search(head[:8192]))

    def _looks_like_autoreply(self) -> bool:
        auto = (_header(self.msg, "Auto-Submitted") or "").lower()
        if auto.startswith("auto-replied"):
            return True
        if _header(self.msg, "X-Autoreply") or _header(self.msg, "X-Autorespond"):
            return True
        precedence = (_header(self.msg, "Precedence") or "").lower()
        if precedence == "auto_reply":
            return True
        return bool(_AUTOREPLY_SUBJECT.search(self.subject))

    def _excluded(self) -> set[str]:
        """Addresses that are the sender side of the conversation, never failed recipients."""
        out: set[str] = set()
        for name in ("From", "To", "Reply-To", "Return-Path", "Sender", "Delivered-To"):
            for match in _addresses(_header(self.msg, name) or ""):
                out.add(_norm(f"{match[1]}@{match[2]}"))
        if self.original is not None:
            for name in ("From", "Return-Path", "Sender", "Reply-To", "Errors-To"):
                for match in _addresses(_header(self.original, name) or ""):
                    out.add(_norm(f"{match[1]}@{match[2]}"))
        if self.envelope_to:
            out.add(_norm(self.envelope_to))
        return out

    def _with_block_reason(
        self, recipients: list[FailedRecipient], blocks: list[dict[str, str]]
    ) -> list[FailedRecipient]:
        """Recipients found in the text, classified by the report's failed block instead
        (its Status and Diagnostic-Code beat the notice's prose: a 5.1.1 stays a 5.1.1)."""
        failed = [
            b
            for b in blocks
            if _action(b) not in _SUCCESS_ACTIONS and (b.get("status") or b.get("diagnostic-code"))
        ]
        if not failed:
            return recipients
        head, _ = self._cut_notice()
        block = next((b for b in failed if _action(b) == "failed"), failed[0])
        status = _status_field(block.get("status"))
        diagnostic = _unwrap(_strip_type(block.get("diagnostic-code")))
        enhanced = _status_text(diagnostic or "") or status
        verdict = classify_reply(None, enhanced, diagnostic or head, rules=self.rules)
        if verdict.category is BounceCategory.OTHER:
            return recipients  # the block says nothing the text did not
        action = _action(block)
        return [
            replace(
                r,
                status=status or r.status,
                diagnostic=_clip(diagnostic) if diagnostic else r.diagnostic,
                action=action or r.action,
                category=verdict.category,
                reply_code=_reply_code(diagnostic) if diagnostic else r.reply_code,
                matched_rule=verdict.matched_rule,
                permanent=verdict.permanent,
            )
            for r in recipients
        ]

    def _text_recipients(self) -> list[FailedRecipient]:
        head, _ = self._cut_notice()
        found: dict[str, str] = {}
        sources: dict[str, str] = {}

        def add(address: str, source: str) -> None:
            found.setdefault(_norm(address), address)
            sources.setdefault(_norm(address), source)

        for value in self.msg.get_all("X-Failed-Recipients") or []:
            for match in _addresses(_decode_words(str(value))):
                add(f"{match[1]}@{match[2]}", "x-failed-recipients")
        excluded = self._excluded()
        for address in _mentioned(head, excluded):
            add(address, "text")
        original_to = [
            f"{m[1]}@{m[2]}"
            for m in _addresses(_header(self.original, "To") or "" if self.original else "")
        ]
        if not found:
            # The notice named nobody new: the returned message's own recipient is the one.
            to = [a for a in original_to if _norm(a) not in excluded]
            if len(to) == 1:
                add(to[0], "original-to")
        if not found:
            # A message someone sent to themselves: the sender is the failed recipient too.
            bounce_from = {_norm(f"{m[1]}@{m[2]}") for m in _addresses(self.from_)}
            for address in _mentioned(head, bounce_from):
                add(address, "text")
        if not found and len(original_to) == 1:
            add(original_to[0], "original-to")
        segments = _segments(head, list(found))
        out: list[FailedRecipient] = []
        preamble = _preamble(head)
        action = "delayed" if _DELAYED.search(head[:8192]) else "failed"
        for key, address in list(found.items())[:MAX_RECIPIENTS]:
            text = segments.get(key) or head
            verdict = classify_reply(None, None, text, rules=self.rules)
            if verdict.category is BounceCategory.OTHER and preamble:
                # Some notices state the reason once, above the list of addresses.
                text = f"{preamble}\n{text}"
                verdict = classify_reply(None, None, text, rules=self.rules)
            out.append(
                FailedRecipient(
                    address=address,
                    status=_status_text(text),
                    diagnostic=_clip(text),
                    action=action,
                    remote_mta=None,
                    category=verdict.category,
                    reply_code=_reply_code(text),
                    matched_rule=verdict.matched_rule,
                    permanent=verdict.permanent,
                    source=sources[key],
                )
            )
        return out

    # ------------------------------------------------------------------ feedback

    def _feedback(
        self,
        part: Message | None,
        headers: ReturnedHeaders,
        *,
        feedback_type: str | None = None,
        sender: str | None = None,
    ) -> ParsedBounce:
        fields: dict[str, str] = {}
        if part is not None:
            for block in _field_blocks(_part_text(part)):
                for key, value in block.items():
                    fields.setdefault(key, value)
        feedback_type = (fields.get("feedback-type") or "").strip().lower()[:40] or feedback_type
        addresses: list[str] = [sender] if sender else []
        for key in ("original-rcpt-to", "removal-recipient"):
            address = _address_in(fields.get(key))
            if address:
                addresses.append(address)
        if not addresses and self.original is not None:
            for name in ("X-HmXmrOriginalRecipient", "To"):
                address = _address_in(_header(self.original, name))
                if address:
                    addresses.append(address)
                    break
        recipients = tuple(
            FailedRecipient(
                address=a,
                status=None,
                diagnostic=None,
                action="feedback",
                remote_mta=None,
                category=BounceCategory.OTHER,
                matched_rule="feedback",
                source="dsn" if fields else "original-to",
            )
            for a in dict.fromkeys(addresses)
        )
        return ParsedBounce(
            kind=BounceKind.FEEDBACK,
            is_bounce=False,
            recipients=recipients,
            original_message_id=headers.message_id,
            original_headers=headers,
            feedback_type=feedback_type,
        )

    # ------------------------------------------------------------------ Amazon SES

    def _ses(self, note: dict[str, Any], headers: ReturnedHeaders) -> ParsedBounce:
        kind = str(note.get("notificationType") or note.get("eventType") or "").lower()
        mail = _dict(note.get("mail"))
        headers = _ses_headers(mail, headers)
        if kind == "complaint":
            complaint = _dict(note.get("complaint"))
            addresses = [
                _address_in(str(_dict(r).get("emailAddress") or ""))
                for r in _list(complaint.get("complainedRecipients"))
            ]
            return ParsedBounce(
                kind=BounceKind.FEEDBACK,
                is_bounce=False,
                recipients=tuple(
                    FailedRecipient(
                        a,
                        None,
                        None,
                        "feedback",
                        None,
                        BounceCategory.OTHER,
                        matched_rule="feedback",
                        source="ses",
                    )
                    for a in addresses
                    if a
                ),
                original_message_id=headers.message_id,
                original_headers=headers,
                feedback_type=str(complaint.get("complaintFeedbackType") or "")[:40] or None,
            )
        if kind != "bounce":
            return ParsedBounce(
                kind=BounceKind.VENDOR,
                is_bounce=False,
                original_message_id=headers.message_id,
                original_headers=headers,
            )
        bounce = _dict(note.get("bounce"))
        subtype = f"{bounce.get('bounceType', '')} {bounce.get('bounceSubType', '')}"
        recipients: list[FailedRecipient] = []
        for entry in _list(bounce.get("bouncedRecipients"))[:MAX_RECIPIENTS]:
            item = _dict(entry)
            address = _address_in(str(item.get("emailAddress") or ""))
            if not address:
                continue
            status = _status_field(str(item.get("status") or ""))
            diagnostic = _strip_type(str(item.get("diagnosticCode") or "")) or ""
            verdict = classify_reply(
                None, status, diagnostic or _ses_wording(subtype), rules=self.rules
            )
            recipients.append(
                FailedRecipient(
                    address=address,
                    status=status,
                    diagnostic=_clip(diagnostic),
                    action=str(item.get("action") or "failed").lower()[:20],
                    remote_mta=_strip_type(str(bounce.get("reportingMTA") or "")),
                    category=verdict.category,
                    reply_code=_reply_code(diagnostic),
                    matched_rule=verdict.matched_rule,
                    permanent=verdict.permanent,
                    source="ses",
                )
            )
        return self._result(BounceKind.VENDOR, recipients, headers)

    # ------------------------------------------------------------------ result

    def _result(
        self, kind: BounceKind, recipients: list[FailedRecipient], headers: ReturnedHeaders
    ) -> ParsedBounce:
        failed = [r for r in recipients if r.action not in _SUCCESS_ACTIONS]
        if kind is BounceKind.DSN and not failed:
            # Every recipient was delivered, relayed or expanded: a success report.
            return ParsedBounce(
                kind=kind,
                is_bounce=False,
                original_message_id=headers.message_id,
                original_headers=headers,
            )
        problem = None
        if failed:
            chosen = next((r for r in failed if r.action == "failed"), failed[0])
            category = chosen.category
        else:
            head, _ = self._cut_notice()
            category = classify_reply(None, None, head, rules=self.rules).category
            problem = "no failed recipient found"
        return ParsedBounce(
            kind=kind,
            is_bounce=True,
            recipients=tuple(failed),
            original_message_id=headers.message_id,
            original_headers=headers,
            category=category,
            needs_review=problem is not None,
            problem=problem,
        )


def _action(block: dict[str, str]) -> str | None:
    """A DSN block's Action field, its first word in lower case ("failed"), or None."""
    return (block.get("action") or "").strip().lower().split(" ")[0] or None


_HTML_OR_HEADERS = frozenset({"text/html", "text/rfc822-headers"})
_RECIPIENT_FIELDS = ("final-recipient", "original-recipient", "x-actual-recipient")
_SUCCESS_ACTIONS = frozenset({"delivered", "relayed", "expanded"})


def _replace_headers(headers: ReturnedHeaders, *, envelope_id: str) -> ReturnedHeaders:
    return ReturnedHeaders(
        message_id=headers.message_id,
        eob_event_id=headers.eob_event_id,
        return_path=headers.return_path,
        envelope_to=headers.envelope_to,
        envelope_id=envelope_id,
        verp_candidates=headers.verp_candidates,
    )


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def _ses_notification(notice: str) -> dict[str, Any] | None:
    """An Amazon SES notification (bounce, complaint, delivery) mailed as JSON, if it is one."""
    start = notice.find("{")
    if start < 0 or notice[:start].strip() or "Type" not in notice[:2000]:
        return None
    end = notice.rfind("}")
    body = notice[start : end + 1]
    for candidate in (body, re.sub(r"!?\r?\n ", "", body)):
        try:
            doc = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(doc, dict) and isinstance(doc.get("Message"), str):
            # Wrapped in an SNS envelope.
            try:
                doc = json.loads(doc["Message"])
            except ValueError:
                return None
        if isinstance(doc, dict) and (doc.get("notificationType") or doc.get("eventType")):
            return doc
    return None


_SES_SUBTYPES = {
    "noemail": "no such user",
    "suppressed": "no such user",
    "onaccountsuppressionlist": "no such user",
    "mailboxfull": "mailbox full",
    "messagetoolarge": "message too large",
    "contentrejected": "content rejected",
    "attachmentrejected": "content rejected",
}


def _ses_wording(subtype: str) -> str:
    words = subtype.split()
    kind = words[0].lower() if words else ""
    detail = words[-1].lower() if len(words) > 1 else ""
    text = _SES_SUBTYPES.get(detail, "")
    # "Transient" is SES's word for a temporary failure; give the classifier a class to go on.
    prefix = "450" if kind == "transient" else "550" if kind == "permanent" else ""
    return f"{prefix} {text}".strip()


def _ses_headers(mail: dict[str, Any], headers: ReturnedHeaders) -> ReturnedHeaders:
    message_id = headers.message_id
    event_id = headers.eob_event_id
    for item in _list(mail.get("headers"))[:200]:
        entry = _dict(item)
        name = str(entry.get("name") or "").lower()
        value = str(entry.get("value") or "")
        if name == "message-id" and message_id is None:
            message_id = _message_id(value)
        elif name == "x-eob-event-id" and event_id is None:
            event_id = _event_id(value)
    common = _dict(mail.get("commonHeaders"))
    if message_id is None and isinstance(common.get("messageId"), str):
        message_id = _message_id(common["messageId"])
    return ReturnedHeaders(
        message_id=message_id,
        eob_event_id=event_id,
        return_path=headers.return_path,
        envelope_to=headers.envelope_to,
        envelope_id=headers.envelope_id,
        verp_candidates=headers.verp_candidates,
    )


def _html_to_text(markup: str) -> str:
    markup = re.sub(r"(?is)<(script|style)\b.{0,20000}?</\1\s*>", " ", markup[:MAX_NOTICE])
    markup = re.sub(r"(?i)<br\s*/?>|</p\s*>|</div\s*>|</tr\s*>|</li\s*>", "\n", markup)
    return html.unescape(_TAG.sub(" ", markup))


def _headers_from_text(text: str) -> Message | None:
    text = text[:MAX_NOTICE].lstrip("\r\n")
    if not text:
        return None
    try:
        parsed = HeaderParser(policy=email.policy.compat32).parsestr(text, headersonly=True)
    except Exception:  # not headers after all
        return None
    known = ("message-id", "from", "to", "subject", "return-path", "received", "x-eob-event-id")
    if not any(parsed.get(name) for name in known):
        return None
    return parsed


def _message_id(value: str | None) -> str | None:
    if not value:
        return None
    match = re.search(r"<[^<>\s]{1,250}>", value)
    if match:
        return match[0]
    token = value.strip().split(" ")[0]
    return f"<{token}>" if token and "@" in token and len(token) <= 250 else None


def _event_id(value: str | None) -> str | None:
    if not value:
        return None
    value = value.strip()
    return value if _EVENT_ID.match(value) else None


def _field_blocks(text: str) -> list[dict[str, str]]:
    """RFC 3464 field groups: "Name: value" lines, folded lines joined, blank-line separated."""
    blocks: list[dict[str, str]] = []
    current: dict[str, str] = {}
    last: str | None = None
    for line in text[:MAX_NOTICE].splitlines():
        if not line.strip():
            if current:
                blocks.append(current)
            current, last = {}, None
            continue
        if line[0] in " \t" and last is not None:
            current[last] = f"{current[last]} {line.strip()}"[:4000]
            continue
        name, sep, value = line.partition(":")
        name = name.strip().lower()
        if not sep or not re.fullmatch(r"[a-z0-9-]{1,60}", name):
            last = None
            continue
        if name in current and name in _RECIPIENT_FIELDS:
            # A second recipient without the blank line between: start a new group.
            blocks.append(current)
            current = {}
        current.setdefault(name, value.strip())
        last = name
    if current:
        blocks.append(current)
    return blocks


def _dsn_address(value: str | None) -> str | None:
    if not value:
        return None
    _, sep, rest = value.partition(";")
    return _address_in(rest if sep else value)


def _strip_type(value: str | None) -> str | None:
    if not value:
        return None
    kind, sep, rest = value.partition(";")
    text = rest if sep and len(kind) <= 20 else value
    text = " ".join(text.split())
    return text or None


# Amazon SES wraps the remote reply: "5.1.0 - Unknown address error 550-'5.2.2 ... full'".
_SES_WRAPPER = re.compile(r"^[245]\.\d{1,3}\.\d{1,3} - [^']{0,80}?([245]\d\d)[- ]'(.{1,2000})'")


def _unwrap(diagnostic: str | None) -> str | None:
    if not diagnostic:
        return diagnostic
    match = _SES_WRAPPER.match(diagnostic)
    return f"{match[1]} {match[2]}" if match else diagnostic


def _status_field(value: str | None) -> str | None:
    if not value:
        return None
    match = re.match(r"\s*([245])\.(\d{1,3})\.(\d{1,3})", value)
    return f"{match[1]}.{match[2]}.{match[3]}" if match else None


def _status_text(text: str) -> str | None:
    found = find_enhanced_status(text)
    return ".".join(map(str, found)) if found else None


def _reply_code(text: str | None) -> int | None:
    return find_reply_code(text) if text else None


def _clip(text: str | None) -> str | None:
    if not text:
        return None
    text = " ".join(text.split())
    return text[:MAX_DIAGNOSTIC] or None


_LINE_REACH = 1000  # RFC 5322's line limit: more of a line says nothing more


def _mentioned(text: str, excluded: set[str]) -> list[str]:
    """Addresses named in a notice that can be failed recipients, in order of appearance."""
    found: list[str] = []
    summary: list[str] = []
    for match in _addresses(text):
        address = f"{match[1]}@{match[2]}"
        local = match[1].strip('"')
        if _norm(address) in excluded or _NOT_A_RECIPIENT.match(local) or local[:1] in "/|":
            continue
        # At most _LINE_REACH either side: a notice of one megabyte-long line (soft line
        # breaks joined) would have each of its thousands of addresses search all of it.
        start, end = match.start(), match.end()
        line_start = text.rfind("\n", max(0, start - _LINE_REACH), start) + 1
        line_start = max(line_start, start - _LINE_REACH)
        line_end = text.find("\n", end, end + _LINE_REACH)
        line = text[line_start : line_end if line_end >= 0 else end + _LINE_REACH]
        if _ID_LINE.search(line):
            continue
        before = " ".join(text[max(0, match.start() - 40) : match.start()].split())
        if _SENDER_CONTEXT.search(before):
            continue
        (summary if _SUMMARY_LINE.match(line) else found).append(address)
    return found or summary


def _segments(text: str, keys: Sequence[str]) -> dict[str, str]:
    """For each address, the notice text from each line naming it to the next address line."""
    if not keys:
        return {}
    wanted = set(keys)
    marks: list[tuple[int, str | None]] = []
    for match in _addresses(text):
        mark = _norm(f"{match[1]}@{match[2]}")
        line_start = text.rfind("\n", 0, match.start()) + 1
        marks.append((line_start, mark if mark in wanted else None))
        if len(marks) >= 4 * MAX_RECIPIENTS:
            break
    out: dict[str, list[str]] = {}
    for i, (start, owner) in enumerate(marks):
        if owner is None:
            continue
        end = len(text)
        for later_start, later_owner in marks[i + 1 :]:
            if later_owner is not None and later_owner != owner and later_start > start:
                end = later_start
                break
        out.setdefault(owner, []).append(text[start:end][: MAX_DIAGNOSTIC * 2])
    return {k: "\n".join(dict.fromkeys(v)) for k, v in out.items()}


def _preamble(text: str) -> str:
    """The notice up to the first address it names (bounded): where a shared reason sits."""
    match = _ADDRESS.search(text)
    end = match.start() if match else len(text)
    return text[:end][-MAX_DIAGNOSTIC:]


def _segment_for(text: str, address: str) -> str | None:
    segment = _segments(text, [_norm(address)]).get(_norm(address))
    return segment or None

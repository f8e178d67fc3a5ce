"""Turn a validated event into a multipart/alternative message, headers kept free of PHI.

The MIME is assembled by hand rather than through `email.message`: we generate every byte
ourselves, so we know the headers and body the DKIM signer needs without re-parsing, and
it costs a fraction of the stdlib's generator. Header values come only from validated
addresses, fixed per-language strings and opaque ids, so no field can create a header.
"""

from __future__ import annotations

import binascii
import datetime as dt
import email.utils
import hashlib
from dataclasses import dataclass
from decimal import Decimal
from email.header import Header
from functools import lru_cache
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from eobblast.events.schema import EobIssued, ServiceLine
from eobblast.render.strings import strings_for

_MONEY_FIELDS = (
    "billed",
    "allowed",
    "deductible",
    "copay",
    "coinsurance",
    "plan_paid",
    "member_owes",
)


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


def _money(value: str) -> str:
    return f"${Decimal(value):,.2f}"


def _quoted_printable(text: str) -> bytes:
    # b2a_qp keeps lines under 76 characters; CRLF line ends as SMTP wants.
    data = text.replace("\r\n", "\n").encode("utf-8")
    return binascii.b2a_qp(data, quotetabs=False, istext=True).replace(b"\n", b"\r\n")


@lru_cache(maxsize=64)
def _subject(language: str) -> bytes:
    return Header(strings_for(language)["subject"], "utf-8").encode().encode("ascii")


@lru_cache(maxsize=256)
def _from_header(payer_name: str, address: str) -> bytes:
    return email.utils.formataddr((payer_name, address), charset="utf-8").encode("ascii")


class Renderer:
    """Renders EOB events in the member's language into signed-ready messages."""

    def __init__(self, *, from_local_part: str = "eob-notices") -> None:
        self._from_local_part = from_local_part
        common: dict[str, Any] = {
            "loader": PackageLoader("eobblast.render", "templates"),
            "undefined": StrictUndefined,
            "trim_blocks": True,
            "lstrip_blocks": True,
        }
        self._html = Environment(autoescape=select_autoescape(["html", "j2"]), **common)
        self._text = Environment(autoescape=False, **common)  # noqa: S701 - plain text part
        self._html_template = self._html.get_template("eob.html.j2")
        self._text_template = self._text.get_template("eob.txt.j2")

    def context(self, event: EobIssued) -> dict[str, Any]:
        """The template variables for one event."""
        claim = event.claim
        lines: list[dict[str, str]] = []
        totals = dict.fromkeys(_MONEY_FIELDS, Decimal(0))
        for line in claim.lines:
            lines.append(self._line(line))
            for name in _MONEY_FIELDS:
                totals[name] += Decimal(getattr(line, name))
        acc = event.accumulators
        return {
            "t": strings_for(event.member.preferred_language),
            "lang": event.member.preferred_language.split("-")[0],
            "payer": event.payer.name,
            "member_name": event.member.name,
            "patient": claim.patient_name,
            "claim_id": claim.id,
            "provider": claim.provider.name,
            "npi": claim.provider.npi,
            "service_start": claim.service_period.start.isoformat(),
            "service_end": claim.service_period.end.isoformat(),
            "processed": claim.processed_date.isoformat(),
            "lines": lines,
            "totals": {name: _money(str(value)) for name, value in totals.items()},
            "ded_met": _money(acc.deductible.met),
            "ded_limit": _money(acc.deductible.limit),
            "oop_met": _money(acc.out_of_pocket.met),
            "oop_limit": _money(acc.out_of_pocket.limit),
            "appeal_deadline": event.appeal.deadline.isoformat(),
            "appeal_instructions": event.appeal.instructions,
        }

    @staticmethod
    def _line(line: ServiceLine) -> dict[str, str]:
        out = {name: _money(getattr(line, name)) for name in _MONEY_FIELDS}
        out["code"] = line.code
        out["description"] = line.description
        out["remark_codes"] = ", ".join(line.remark_codes)
        return out

    def render(self, event: EobIssued, *, now: dt.datetime | None = None) -> RenderedMessage:
        """Render one event into a multipart/alternative message (text + HTML)."""
        ctx = self.context(event)
        text = self._text_template.render(ctx)
        html = self._html_template.render(ctx)
        domain = event.payer.sending_domain
        sender = f"{self._from_local_part}@{domain}"
        # The boundary is derived from the event id: unique per message, never PHI.
        boundary = "=_eob_" + hashlib.sha256(event.event_id.encode()).hexdigest()[:32]
        body = b"".join(
            (
                b"--" + boundary.encode() + b"\r\n",
                b"Content-Type: text/plain; charset=utf-8\r\n",
                b"Content-Transfer-Encoding: quoted-printable\r\n\r\n",
                _quoted_printable(text),
                b"\r\n--" + boundary.encode() + b"\r\n",
                b"Content-Type: text/html; charset=utf-8\r\n",
                b"Content-Transfer-Encoding: quoted-printable\r\n\r\n",
                _quoted_printable(html),
                b"\r\n--" + boundary.encode() + b"--\r\n",
            )
        )
        when = now or dt.datetime.now(dt.UTC)
        headers = (
            (b"From", _from_header(event.payer.name, sender)),
            (b"To", event.member.email.encode("ascii")),
            (b"Subject", _subject(event.member.preferred_language)),
            (b"Date", email.utils.format_datetime(when).encode("ascii")),
            (b"Message-ID", f"<eob.{event.event_id}@{domain}>".encode("ascii")),
            (b"MIME-Version", b"1.0"),
            (b"Content-Type", f'multipart/alternative; boundary="{boundary}"'.encode("ascii")),
            (b"Content-Language", ctx["lang"].encode("ascii")),
            (b"X-EOB-Event-ID", event.event_id.encode("ascii")),
        )
        return RenderedMessage(headers, body, sender, event.member.email)

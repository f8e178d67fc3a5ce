"""What arrived at the bounce address: the parsed report and the event it is about.

Shared by the bounce listener (which keeps what nobody can read for review) and the bounce
service (which acts on what maps to an event). The mapping trusts, in order: a VERP return
path whose HMAC verifies (the envelope recipient, then the addresses the parser found), and
only then the returned message's `X-EOB-Event-ID` header, which anyone can write. Neither
proves what a report says about an address (every recipient of a notice holds its return
path), so the service acts on a report only for the address its notice was sent to.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from eobblast.bounces.dsn import (
    TOO_MANY_PARTS,
    UNREADABLE,
    BounceKind,
    ParsedBounce,
    parse_bounce,
)
from eobblast.bounces.rules import BounceRules
from eobblast.bounces.verp import VerpKey, read_return_path

__all__ = [
    "BounceHandler",
    "InboundBounce",
    "MappedBy",
    "ReviewReason",
    "Reviewable",
    "read_bounce",
]

ResolveReference = Callable[[str], Awaitable[str | None]]


class MappedBy(enum.StrEnum):
    """How a report was tied to its event."""

    VERP = "verp"
    HEADER = "header"


class ReviewReason(enum.StrEnum):
    """Why a person should look at a message (a bounded metrics label)."""

    UNREADABLE = "unreadable"
    NOT_RECOGNISED = "not_recognised"
    # More MIME parts than any report has: not read, only its top headers kept.
    TOO_MANY_PARTS = "too_many_parts"
    UNMAPPED = "unmapped"
    # About a notice the bounce store no longer knows (purged): where it went is unknown,
    # so no address in the report is acted on.
    UNKNOWN_EVENT = "unknown_event"
    # About one of our notices, but not all of it was acted on: a complaint or opt-out, or
    # a report naming an address the notice was not sent to.
    NOT_ACTED_ON = "not_acted_on"


class Reviewable(Protocol):
    """What the listener needs to know about a message it handed on."""

    @property
    def review_reason(self) -> ReviewReason | None:
        """Why the message should be kept for a person, or None."""
        ...


# The listener calls this for each message and envelope recipient; it raises to make the
# sending MTA try again later (nothing was lost), or returns what it made of the message.
BounceHandler = Callable[[bytes, str], Awaitable[Reviewable]]


@dataclass(frozen=True, slots=True)
class InboundBounce:
    """One message at the bounce address, parsed and (when possible) mapped to its event."""

    parsed: ParsedBounce
    envelope_to: str
    event_id: str | None
    mapped_by: MappedBy | None

    @property
    def review_reason(self) -> ReviewReason | None:
        """Why a person should look at it, or None."""
        kind = self.parsed.kind
        if kind is BounceKind.UNKNOWN:
            if self.parsed.problem == UNREADABLE:
                return ReviewReason.UNREADABLE
            if self.parsed.problem == TOO_MANY_PARTS:
                return ReviewReason.TOO_MANY_PARTS
            return ReviewReason.NOT_RECOGNISED
        if kind is BounceKind.AUTOREPLY:
            return None  # the notice was delivered: nothing to do, nothing to read
        if self.event_id is None:
            return ReviewReason.UNMAPPED
        return None


async def read_bounce(
    raw: bytes,
    envelope_to: str,
    *,
    keys: Iterable[VerpKey],
    bounce_domain: str | None,
    prefix: str = "bounces",
    resolve_reference: ResolveReference | None = None,
    rules: BounceRules | None = None,
) -> InboundBounce:
    """Parse one message and find its event; never raises for what the message contains."""
    # Off the event loop: a large message takes the parser a while, and the loop serves
    # every other SMTP session and the store's connections meanwhile.
    parsed = await asyncio.to_thread(parse_bounce, raw, envelope_to=envelope_to, rules=rules)
    keys = tuple(keys)
    candidates = dict.fromkeys((envelope_to, *parsed.original_headers.verp_candidates))
    for candidate in candidates:
        token = read_return_path(candidate, keys, bounce_domain=bounce_domain, prefix=prefix)
        if token is None:
            continue
        event_id = token.event_id
        if event_id is None and token.reference is not None and resolve_reference is not None:
            event_id = await resolve_reference(token.reference)
        if event_id is not None:
            return InboundBounce(parsed, envelope_to, event_id, MappedBy.VERP)
    header_id = parsed.original_headers.eob_event_id
    if header_id is not None:
        return InboundBounce(parsed, envelope_to, header_id, MappedBy.HEADER)
    return InboundBounce(parsed, envelope_to, None, None)

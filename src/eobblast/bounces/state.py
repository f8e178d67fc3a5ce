"""Verify-before-resend: the pure state machine over notices (EOBs), members and addresses.

`apply(book, event, policy, random)` returns the next book and the effects the I/O shell must
carry out, in order. Nothing here does I/O or reads a clock: time comes in on the events and
jitter from the injected random source, so every sequence can be replayed and tested.

A send to a suppressed or unverified address is impossible by construction: the only
effect that sends is `Send(deliverable)`, and a `Deliverable` can only be minted inside this
module, by `_mint`, after `_route` has checked the member and the address (the constructor
refuses any other caller at run time, and the transport should accept a `Deliverable`, not a
string, so the type checker enforces it too). `_route` refuses while the member has a
verification outstanding, when the address (or the verified address it now stands for) is
suppressed, and when the member's verification for that address failed.

The book handed in must hold every notice, member and suppression the event can touch: the
shell loads the member's slice plus the suppression status of the addresses involved.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from types import MappingProxyType

from eobblast._addresses import address_key
from eobblast.bounces.category import BounceCategory, HandlingAction
from eobblast.bounces.rules import BounceRules, RetrySettings, VerificationSettings, default_rules

__all__ = [
    "AWAITING_REPLY",
    "AddressStatus",
    "AddressVerificationFailed",
    "AddressVerified",
    "BounceBook",
    "BouncePolicy",
    "Deliverable",
    "DsnReceived",
    "Eob",
    "EobStatus",
    "FallbackReason",
    "IncidentKind",
    "MaxAgeExceeded",
    "Member",
    "PendingVerification",
    "Postponed",
    "PublishPaperFallback",
    "PublishVerificationRequest",
    "RecordIncident",
    "ReleaseHeld",
    "RetryDue",
    "ScheduleRetry",
    "Send",
    "Submitted",
    "SuppressAddress",
    "SyncReply",
    "Transition",
    "VerificationTimeout",
    "address_key",
    "address_status",
    "apply",
    "backoff_delay",
]

RandomSource = Callable[[], float]

# The earliest a postponed send is tried again: a shaper that says "now" does not make
# the notice go round in a loop.
POSTPONE_FLOOR = timedelta(seconds=1)


# --------------------------------------------------------------------------- states


class EobStatus(enum.StrEnum):
    """Where one notice stands."""

    SENDING = "sending"  # handed to the transport, reply pending
    DELIVERED = "delivered"  # accepted by the receiver (a DSN may still follow)
    RETRY_SCHEDULED = "retry_scheduled"
    HELD_FOR_VERIFICATION = "held_for_verification"
    RELEASED = "released"  # sent to the verified address, reply pending
    PAPER_FALLBACK = "paper_fallback"  # final


# Handed to the transport, its reply not in yet: the statuses a report can still move on.
AWAITING_REPLY = (EobStatus.SENDING, EobStatus.RELEASED)


class AddressStatus(enum.StrEnum):
    """A member's address as the state machine sees it."""

    ACTIVE = "active"
    SUPPRESSED = "suppressed"
    AWAITING_VERIFICATION = "awaiting_verification"
    VERIFIED = "verified"  # stands for the verified address it was replaced by


class FallbackReason(enum.StrEnum):
    """Why a notice went to paper."""

    RETRIES_EXHAUSTED = "retries_exhausted"
    UNDELIVERABLE = "undeliverable"
    VERIFICATION_FAILED = "verification_failed"
    VERIFICATION_TIMEOUT = "verification_timeout"


class IncidentKind(enum.StrEnum):
    """What an incident record is about."""

    HARD_BOUNCE = "hard_bounce"
    NEEDS_REVIEW = "needs_review"
    UNVERIFIED_CHANNEL = "unverified_channel"


@dataclass(frozen=True, slots=True)
class Eob:
    """One notice: whose it is, where it goes, and how far it got."""

    eob_id: str
    member_id: str
    address: str
    status: EobStatus
    # Retries are bounded from here: the first send, or the release to a verified address.
    age_from: datetime
    attempt: int = 0
    next_at: datetime | None = None
    incident_recorded: bool = False


@dataclass(frozen=True, slots=True)
class PendingVerification:
    """An outstanding AddressVerificationRequested for one member."""

    addresses: frozenset[str]
    requested_at: datetime
    deadline: datetime


@dataclass(frozen=True, slots=True)
class Member:
    """What the machine knows about one member's addresses."""

    pending: PendingVerification | None = None
    # address key of a hard-bounced address -> the verified address that replaced it
    redirects: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    # address keys whose verification failed or expired: paper only until verified again
    failed: frozenset[str] = frozenset()


# What the machine knows of a member it has no record for (immutable: shared).
_NO_MEMBER = Member()


@dataclass(frozen=True, slots=True)
class BounceBook:
    """The whole state: notices, members and the suppressed addresses."""

    eobs: Mapping[str, Eob] = field(default_factory=lambda: MappingProxyType({}))
    members: Mapping[str, Member] = field(default_factory=lambda: MappingProxyType({}))
    suppressed: frozenset[str] = frozenset()


# --------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class Submitted:
    """A new notice passed validation and the gate wants to send it."""

    eob_id: str
    member_id: str
    address: str
    at: datetime


@dataclass(frozen=True, slots=True)
class SyncReply:
    """The receiver's reply to a send: category None means accepted (2xx)."""

    eob_id: str
    address: str
    at: datetime
    category: BounceCategory | None


@dataclass(frozen=True, slots=True)
class Postponed:
    """eobblast held a send back itself (shaping: no budget left, its IPs paused or
    suspended): nothing reached the receiver, so it is no bounce. Send again at `until`."""

    eob_id: str
    address: str
    at: datetime
    until: datetime


@dataclass(frozen=True, slots=True)
class DsnReceived:
    """An asynchronous bounce for a notice (found by VERP), already classified."""

    eob_id: str
    address: str
    at: datetime
    category: BounceCategory
    # False for "delayed" reports: the reporting MTA is still trying, nothing to do yet.
    final: bool = True


@dataclass(frozen=True, slots=True)
class RetryDue:
    """The retry timer for a notice fired."""

    eob_id: str
    at: datetime


@dataclass(frozen=True, slots=True)
class MaxAgeExceeded:
    """The age timer for a notice fired."""

    eob_id: str
    at: datetime


@dataclass(frozen=True, slots=True)
class AddressVerified:
    """The claims system verified a member's address through a verified channel."""

    member_id: str
    address: str
    channel: str
    verified_by: str
    at: datetime


@dataclass(frozen=True, slots=True)
class AddressVerificationFailed:
    """The member's address could not be verified."""

    member_id: str
    at: datetime


@dataclass(frozen=True, slots=True)
class VerificationTimeout:
    """The verification deadline timer for a member fired."""

    member_id: str
    at: datetime


Event = (
    Submitted
    | SyncReply
    | Postponed
    | DsnReceived
    | RetryDue
    | MaxAgeExceeded
    | AddressVerified
    | AddressVerificationFailed
    | VerificationTimeout
)


# --------------------------------------------------------------------------- effects

_MINT = object()


@dataclass(frozen=True, slots=True)
class Deliverable:
    """Permission to send one notice to one address; only the state machine mints these."""

    eob_id: str
    member_id: str
    to: str
    attempt: int
    _mint: object = field(repr=False, compare=False)

    def __post_init__(self) -> None:
        if self._mint is not _MINT:
            raise TypeError("a Deliverable is minted only by the bounce state machine")


@dataclass(frozen=True, slots=True)
class Send:
    """Hand the notice to the transport, to deliverable.to."""

    deliverable: Deliverable


@dataclass(frozen=True, slots=True)
class ScheduleRetry:
    """Deliver RetryDue(eob_id) at this time."""

    eob_id: str
    at: datetime
    # True when eobblast held the send back itself (Postponed), not after a failure.
    postponed: bool = False


@dataclass(frozen=True, slots=True)
class PublishVerificationRequest:
    """Publish AddressVerificationRequested; deliver VerificationTimeout at the deadline."""

    member_id: str
    addresses: tuple[str, ...]
    deadline: datetime


@dataclass(frozen=True, slots=True)
class RecordIncident:
    """Record an incident for ops (ids and codes only: no address, no content)."""

    kind: IncidentKind
    member_id: str
    eob_id: str | None = None
    category: BounceCategory | None = None


@dataclass(frozen=True, slots=True)
class PublishPaperFallback:
    """Publish the paper-fallback event for a notice (final)."""

    eob_id: str
    member_id: str
    reason: FallbackReason


@dataclass(frozen=True, slots=True)
class SuppressAddress:
    """Persist the suppression of an address."""

    address: str
    category: BounceCategory


@dataclass(frozen=True, slots=True)
class ReleaseHeld:
    """Record (status event, audit) that a held notice is released to a verified address,
    verified through `channel`.

    Informational: the Send that follows it is what sends.
    """

    eob_id: str
    member_id: str
    to: str
    channel: str


Effect = (
    Send
    | ScheduleRetry
    | PublishVerificationRequest
    | RecordIncident
    | PublishPaperFallback
    | SuppressAddress
    | ReleaseHeld
)


@dataclass(frozen=True, slots=True)
class Transition:
    """The book after an event and what the shell must do, in order."""

    book: BounceBook
    effects: tuple[Effect, ...]
    # The notices the step wrote (changed or not): only these can differ from the old book.
    written: frozenset[str]


@dataclass(frozen=True, slots=True)
class BouncePolicy:
    """The data the machine runs on: category handling, retry schedule, verification."""

    handling: Mapping[BounceCategory, HandlingAction]
    retry: RetrySettings = field(default_factory=RetrySettings)
    verification: VerificationSettings = field(default_factory=VerificationSettings)

    @classmethod
    def from_rules(cls, rules: BounceRules | None = None) -> BouncePolicy:
        """The policy a rules file describes (the packaged default when None)."""
        rules = rules or default_rules()
        return cls(rules.handling, rules.retry, rules.verification)


# --------------------------------------------------------------------------- queries


def address_status(book: BounceBook, member_id: str, address: str) -> AddressStatus:
    """A member's address as the machine sees it."""
    key = address_key(address)
    member = book.members.get(member_id, _NO_MEMBER)
    if member.pending is not None and key in member.pending.addresses:
        return AddressStatus.AWAITING_VERIFICATION
    if key in member.redirects:
        return AddressStatus.VERIFIED
    if key in book.suppressed or key in member.failed:
        return AddressStatus.SUPPRESSED
    return AddressStatus.ACTIVE


def backoff_delay(attempt: int, retry: RetrySettings, random: RandomSource) -> timedelta:
    """The wait after the attempt-th failed send: exponential, capped, jittered downwards."""
    exponent = max(attempt - 1, 0)
    base = retry.initial_delay.total_seconds()
    cap = retry.max_delay.total_seconds()
    # Past ~60 doublings the cap has long won; avoid float overflow on absurd attempt counts.
    raw = cap if exponent > 60 else min(base * retry.multiplier**exponent, cap)
    draw = min(max(random(), 0.0), math.nextafter(1.0, 0.0))
    return timedelta(seconds=raw * (1.0 - retry.jitter * draw))


# --------------------------------------------------------------------------- transitions


def apply(book: BounceBook, event: Event, policy: BouncePolicy, random: RandomSource) -> Transition:
    """The next book and the effects for one event."""
    return _Step(book, policy, random).run(event)


class _WriteLog(dict[str, Eob]):
    """The step's notices: a dict that remembers which keys were assigned."""

    __slots__ = ("written",)

    def __init__(self, eobs: Mapping[str, Eob]) -> None:
        # A book's read-only view copies at C speed; merged key by key, it costs more than
        # the rest of a step on a shared transaction's book.
        super().__init__(eobs.copy() if isinstance(eobs, MappingProxyType) else eobs)
        self.written: set[str] = set()

    def __setitem__(self, key: str, value: Eob) -> None:
        self.written.add(key)
        super().__setitem__(key, value)


class _Step:
    """One transition: a mutable working copy of the book, and the effects collected."""

    def __init__(self, book: BounceBook, policy: BouncePolicy, random: RandomSource) -> None:
        self.eobs = _WriteLog(book.eobs)
        self.members = dict(book.members)
        self.suppressed = set(book.suppressed)
        self.policy = policy
        self.random = random
        self.effects: list[Effect] = []

    def run(self, event: Event) -> Transition:
        match event:
            case Submitted():
                self._submitted(event)
            case SyncReply(category=None):
                self._accepted(event.eob_id, event.address)
            case SyncReply(category=BounceCategory() as category):
                self._failed(event.eob_id, event.address, category, event.at)
            case Postponed():
                self._postponed(event)
            case DsnReceived():
                if event.final:
                    self._failed(event.eob_id, event.address, event.category, event.at)
            case RetryDue():
                self._retry_due(event)
            case MaxAgeExceeded():
                self._max_age(event)
            case AddressVerified():
                self._verified(event)
            case AddressVerificationFailed():
                self._verification_over(event.member_id, FallbackReason.VERIFICATION_FAILED)
            case VerificationTimeout():
                member = self.members.get(event.member_id)
                if member and member.pending and event.at >= member.pending.deadline:
                    self._verification_over(event.member_id, FallbackReason.VERIFICATION_TIMEOUT)
        book = BounceBook(
            eobs=MappingProxyType(self.eobs),
            members=MappingProxyType(self.members),
            suppressed=frozenset(self.suppressed),
        )
        return Transition(book, tuple(self.effects), frozenset(self.eobs.written))

    # ------------------------------------------------------------------ sending

    def _route(self, eob: Eob) -> Deliverable | FallbackReason | None:
        """Mint permission to send, or a paper reason, or None: hold for verification."""
        member = self.members.get(eob.member_id, _NO_MEMBER)
        if member.pending is not None:
            return None
        key = address_key(eob.address)
        target = member.redirects.get(key, eob.address)
        target_key = address_key(target)
        if key in member.failed or target_key in member.failed:
            return FallbackReason.VERIFICATION_FAILED
        if target_key in self.suppressed:
            return None
        return _mint(eob.eob_id, eob.member_id, target, eob.attempt + 1)

    def _send_or_hold(self, eob: Eob, at: datetime, *, released_by: str | None = None) -> None:
        """`released_by`: the verification channel that released a held notice."""
        route = self._route(eob)
        if isinstance(route, Deliverable):
            status = EobStatus.SENDING if released_by is None else EobStatus.RELEASED
            self.eobs[eob.eob_id] = _moved(
                eob, status, None, address=route.to, attempt=route.attempt
            )
            if released_by is not None:
                self.effects.append(ReleaseHeld(eob.eob_id, eob.member_id, route.to, released_by))
            self.effects.append(Send(route))
        elif isinstance(route, FallbackReason):
            self._paper(eob, route)
        else:
            self.eobs[eob.eob_id] = replace(
                eob, status=EobStatus.HELD_FOR_VERIFICATION, next_at=None
            )
            member = self.members.get(eob.member_id, _NO_MEMBER)
            if member.pending is None:
                # Held on a suppressed address no one has asked this member about yet.
                key = address_key(eob.address)
                target = address_key(member.redirects.get(key, eob.address))
                self._request_verification(eob.member_id, target, at)

    def _paper(self, eob: Eob, reason: FallbackReason) -> None:
        self.eobs[eob.eob_id] = replace(eob, status=EobStatus.PAPER_FALLBACK, next_at=None)
        self.effects.append(PublishPaperFallback(eob.eob_id, eob.member_id, reason))

    def _submitted(self, event: Submitted) -> None:
        if event.eob_id in self.eobs:
            return  # a redelivered event: the notice is already in hand
        eob = Eob(
            eob_id=event.eob_id,
            member_id=event.member_id,
            address=event.address,
            status=EobStatus.SENDING,
            age_from=event.at,
        )
        self._send_or_hold(eob, event.at)

    def _accepted(self, eob_id: str, address: str) -> None:
        eob = self.eobs.get(eob_id)
        if eob is None or address_key(address) != address_key(eob.address):
            return
        if eob.status in AWAITING_REPLY:
            self.eobs[eob_id] = _moved(eob, EobStatus.DELIVERED, eob.next_at)

    def _postponed(self, event: Postponed) -> None:
        eob = self.eobs.get(event.eob_id)
        if eob is None or address_key(event.address) != address_key(eob.address):
            return
        if eob.status not in AWAITING_REPLY:
            return  # a report about the notice came first: it decides
        # Not the receiver's doing: no bounce, and the next try is when the shaper said.
        # The attempt stays counted (each send has its own attempt number, which names its
        # status). The age limit still holds: a notice eobblast cannot send in time goes to
        # paper, as one the receiver keeps refusing does.
        next_at = max(event.until, event.at + POSTPONE_FLOOR)
        if next_at > eob.age_from + self.policy.retry.max_age:
            self._paper(eob, FallbackReason.RETRIES_EXHAUSTED)
            return
        self.eobs[eob.eob_id] = replace(eob, status=EobStatus.RETRY_SCHEDULED, next_at=next_at)
        self.effects.append(ScheduleRetry(eob.eob_id, next_at, postponed=True))

    # ------------------------------------------------------------------ failures

    def _failed(self, eob_id: str, address: str, category: BounceCategory, at: datetime) -> None:
        action = self.policy.handling[category]
        eob = self.eobs.get(eob_id)
        if action is HandlingAction.VERIFY_ADDRESS:
            # The address is bad whatever became of the notice: suppress it in any case.
            self._suppress(address, category)
        if eob is None:
            return
        current = address_key(address) == address_key(eob.address)
        # Only a reply about where the notice now stands moves it; older ones are history.
        live = eob.status in (EobStatus.SENDING, EobStatus.RELEASED, EobStatus.DELIVERED)
        live = live or eob.status is EobStatus.RETRY_SCHEDULED
        if not current or not live:
            return
        if action is HandlingAction.VERIFY_ADDRESS:
            self._hard_bounce(eob, address_key(address), category, at)
        elif action is HandlingAction.FALLBACK:
            self._paper(eob, FallbackReason.UNDELIVERABLE)
        else:
            if action is HandlingAction.REVIEW and not eob.incident_recorded:
                self.effects.append(
                    RecordIncident(IncidentKind.NEEDS_REVIEW, eob.member_id, eob_id, category)
                )
                eob = replace(eob, incident_recorded=True)
            self._schedule_retry(eob, at)

    def _schedule_retry(self, eob: Eob, at: datetime) -> None:
        next_at = at + backoff_delay(max(eob.attempt, 1), self.policy.retry, self.random)
        if next_at > eob.age_from + self.policy.retry.max_age:
            self._paper(eob, FallbackReason.RETRIES_EXHAUSTED)
            return
        self.eobs[eob.eob_id] = replace(eob, status=EobStatus.RETRY_SCHEDULED, next_at=next_at)
        self.effects.append(ScheduleRetry(eob.eob_id, next_at))

    def _suppress(self, address: str, category: BounceCategory) -> None:
        key = address_key(address)
        if key not in self.suppressed:
            self.suppressed.add(key)
            self.effects.append(SuppressAddress(address, category))

    def _hard_bounce(self, eob: Eob, key: str, category: BounceCategory, at: datetime) -> None:
        self.effects.append(
            RecordIncident(IncidentKind.HARD_BOUNCE, eob.member_id, eob.eob_id, category)
        )
        self._request_verification(eob.member_id, key, at)
        self.eobs[eob.eob_id] = replace(eob, status=EobStatus.HELD_FOR_VERIFICATION, next_at=None)
        # Hold every notice waiting for this member, and every one waiting for this address.
        for other in list(self.eobs.values()):
            if other.status is not EobStatus.RETRY_SCHEDULED:
                continue
            if other.member_id == eob.member_id:
                self.eobs[other.eob_id] = replace(
                    other, status=EobStatus.HELD_FOR_VERIFICATION, next_at=None
                )
            elif address_key(other.address) == key:
                self.eobs[other.eob_id] = replace(
                    other, status=EobStatus.HELD_FOR_VERIFICATION, next_at=None
                )
                if self.members.get(other.member_id, _NO_MEMBER).pending is None:
                    self._request_verification(other.member_id, key, at)

    def _request_verification(self, member_id: str, key: str, at: datetime) -> None:
        member = self.members.get(member_id, _NO_MEMBER)
        if member.pending is not None:
            # One request per member at a time; it now also covers this address.
            pending = replace(member.pending, addresses=member.pending.addresses | {key})
            self.members[member_id] = replace(member, pending=pending)
            return
        deadline = at + self.policy.verification.timeout
        pending = PendingVerification(frozenset({key}), at, deadline)
        self.members[member_id] = replace(member, pending=pending)
        self.effects.append(PublishVerificationRequest(member_id, (key,), deadline))

    # ------------------------------------------------------------------ timers

    def _retry_due(self, event: RetryDue) -> None:
        eob = self.eobs.get(event.eob_id)
        if eob is None or eob.status is not EobStatus.RETRY_SCHEDULED:
            return  # a stale timer
        if eob.next_at is not None and event.at < eob.next_at:
            return  # an early timer: the scheduled one is still coming
        if event.at > eob.age_from + self.policy.retry.max_age:
            self._paper(eob, FallbackReason.RETRIES_EXHAUSTED)
            return
        self._send_or_hold(eob, event.at)

    def _max_age(self, event: MaxAgeExceeded) -> None:
        eob = self.eobs.get(event.eob_id)
        # In-flight notices wait for their reply; held ones for their verification.
        if eob is None or eob.status is not EobStatus.RETRY_SCHEDULED:
            return
        if event.at >= eob.age_from + self.policy.retry.max_age:
            self._paper(eob, FallbackReason.RETRIES_EXHAUSTED)

    # ------------------------------------------------------------------ verification

    def _verified(self, event: AddressVerified) -> None:
        if event.channel not in self.policy.verification.channels:
            # Whoever answered is not known to be the member: nothing is released.
            self.effects.append(RecordIncident(IncidentKind.UNVERIFIED_CHANNEL, event.member_id))
            return
        member = self.members.get(event.member_id, _NO_MEMBER)
        verified_key = address_key(event.address)
        replaced = set(member.failed)
        if member.pending is not None:
            replaced |= member.pending.addresses
        redirects = dict(member.redirects)
        for key in replaced:
            redirects[key] = event.address
        # The verified address is the member's own now: a redirect from it would be a loop.
        redirects.pop(verified_key, None)
        redirects = {k: v for k, v in redirects.items() if address_key(v) != k}
        self.members[event.member_id] = Member(
            pending=None,
            redirects=MappingProxyType(redirects),
            failed=frozenset(member.failed - replaced - {verified_key}),
        )
        self.suppressed.discard(verified_key)
        for eob in list(self.eobs.values()):
            if eob.member_id == event.member_id and eob.status is EobStatus.HELD_FOR_VERIFICATION:
                # Retries after a release are bounded from the release, not the first send.
                released = replace(eob, address=event.address, age_from=event.at, attempt=0)
                self._send_or_hold(released, event.at, released_by=event.channel)

    def _verification_over(self, member_id: str, reason: FallbackReason) -> None:
        member = self.members.get(member_id)
        if member is None or member.pending is None:
            return
        self.members[member_id] = replace(
            member, pending=None, failed=member.failed | member.pending.addresses
        )
        for eob in list(self.eobs.values()):
            if eob.member_id == member_id and eob.status is EobStatus.HELD_FOR_VERIFICATION:
                self._paper(eob, reason)


def _moved(
    eob: Eob,
    status: EobStatus,
    next_at: datetime | None,
    *,
    address: str | None = None,
    attempt: int | None = None,
) -> Eob:
    # `replace(eob, ...)` for the transitions every notice takes (sent, delivered), without
    # replace's field-by-field introspection, which costs as much as the rest of the step.
    return Eob(
        eob_id=eob.eob_id,
        member_id=eob.member_id,
        address=eob.address if address is None else address,
        status=status,
        age_from=eob.age_from,
        attempt=eob.attempt if attempt is None else attempt,
        next_at=next_at,
        incident_recorded=eob.incident_recorded,
    )


def _mint(eob_id: str, member_id: str, to: str, attempt: int) -> Deliverable:
    return Deliverable(eob_id, member_id, to, attempt, _MINT)

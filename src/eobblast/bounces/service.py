"""BounceService: the I/O shell around the verify-before-resend state machine.

Every call loads the slice of the book it needs from the `BounceStore` under the members'
locks, runs the pure `state.apply`, writes the new state together with the records to
publish (an outbox in the same transaction), commits, then publishes, audits and counts.
So the decisions stay in `bounces.state`, and the effects survive a crash at any point:
what is committed is published sooner or later (by `tick` if not at once), and a resend
handed out without Kafka behind it carries a lease that `tick` reclaims if nobody reports.

A send to a suppressed or unverified address cannot happen through this API: `gate` answers
`SendPermitted` only with a `Deliverable`, which only the state machine mints, and the
resends that `tick` and `on_verification_result` return carry one too. Callers send to
`deliverable.to`, which may be a verified address that replaced the one in the event.

Nothing here logs a member id or an address: logs carry event ids, codes and counts.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import enum
import hashlib
import hmac
import logging
import random as _random
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol, TypeVar

from prometheus_client import Counter, Gauge

from eobblast.bounces import state
from eobblast.bounces.category import BounceCategory, HandlingAction
from eobblast.bounces.classify import classify_reply
from eobblast.bounces.dsn import BounceKind
from eobblast.bounces.inbound import InboundBounce, MappedBy, ReviewReason, read_bounce
from eobblast.bounces.rules import BounceRules, default_rules
from eobblast.bounces.state import (
    AWAITING_REPLY,
    AddressStatus,
    BounceBook,
    BouncePolicy,
    Deliverable,
    Eob,
    EobStatus,
    PublishPaperFallback,
    PublishVerificationRequest,
    RecordIncident,
    ReleaseHeld,
    ScheduleRetry,
    Send,
    SuppressAddress,
    Transition,
    address_key,
    address_status,
)
from eobblast.bounces.store import (
    ACTIVE_STATUSES,
    NO_EXTRAS,
    STORE_ERRORS,
    BounceStore,
    BounceTx,
    ClaimKind,
    EobExtras,
    OutboxMessage,
    Slice,
    StoreBusy,
)
from eobblast.bounces.verp import VerpKey, make_return_path
from eobblast.errors import Outcome
from eobblast.events import verification as schemas
from eobblast.observe.audit import (
    AuditAction,
    AuditRecord,
    AuditTrail,
    member_ref,
    recipient_ref,
)
from eobblast.observe.metrics import AUDIT_GAPS, REGISTRY
from eobblast.state.group import GroupCommit

__all__ = [
    "BOUNCES",
    "BounceOutcome",
    "BounceReason",
    "BounceService",
    "BounceTopics",
    "DsnReport",
    "DsnResult",
    "Gate",
    "Held",
    "Provider",
    "Publisher",
    "Resend",
    "SendPermitted",
    "Settled",
    "TickResult",
    "VerificationOutcome",
    "provider_of",
]

log = logging.getLogger("eobblast.bounces")
T = TypeVar("T")

# --------------------------------------------------------------------------- metrics
# Labels are categories, providers, reasons and kinds: bounded sets, never an address.

BOUNCES = Counter(
    "eobblast_bounces",
    "Delivery failures by bounce category, mailbox provider and source (sync reply or DSN).",
    ["category", "provider", "source"],
    registry=REGISTRY,
)
GATE_DECISIONS = Counter(
    "eobblast_bounce_gate",
    "Gate decisions before sending: send, hold (by reason) or already settled.",
    ["decision"],
    registry=REGISTRY,
)
RETRIES_SCHEDULED = Counter(
    "eobblast_bounce_retries_scheduled",
    "Soft failures scheduled for another attempt.",
    registry=REGISTRY,
)
POSTPONED = Counter(
    "eobblast_bounce_postponed",
    "Sends eobblast held back itself (shaping) and scheduled for when it may send.",
    registry=REGISTRY,
)
BATCHES = Counter(
    "eobblast_bounce_store_batches",
    "Bounce store transactions of gate/delivery calls: shared (several calls), split (a"
    " shared one failed; its calls ran alone) or single.",
    ["kind"],
    registry=REGISTRY,
)
BATCHED_CALLS = Counter(
    "eobblast_bounce_store_batched_calls",
    "Gate/delivery calls that shared a transaction with others.",
    registry=REGISTRY,
)


def _count_batch(kind: str, size: int) -> None:
    BATCHES.labels(kind).inc()
    if kind == "shared":
        BATCHED_CALLS.inc(size)


RESENDS_ISSUED = Counter(
    "eobblast_bounce_resends",
    "Notices handed out to be sent again, by why (retry, release, lost).",
    ["why"],
    registry=REGISTRY,
)
RESENDS_WITHDRAWN = Counter(
    "eobblast_bounce_resends_withdrawn",
    "Resends not sent after all: between hand-out and send, their address bounced (for"
    " another notice) or the notice moved on.",
    registry=REGISTRY,
)
VERIFICATION_REQUESTS = Counter(
    "eobblast_verification_requests",
    "AddressVerificationRequested events published.",
    registry=REGISTRY,
)
VERIFICATION_RESULTS = Counter(
    "eobblast_verification_results",
    "Verification answers and timeouts, by result.",
    ["result"],
    registry=REGISTRY,
)
PAPER_FALLBACKS = Counter(
    "eobblast_paper_fallbacks",
    "Notices sent to paper mail instead, by reason.",
    ["reason"],
    registry=REGISTRY,
)
INCIDENTS = Counter(
    "eobblast_bounce_incidents",
    "Incidents recorded for ops, by kind.",
    ["kind"],
    registry=REGISTRY,
)
NOTICES = Gauge(
    "eobblast_bounce_notices",
    "Notices in the bounce store not yet settled, by status (sending, retry_scheduled,"
    " held_for_verification, released).",
    ["status"],
    # Every worker reads the same shared store: the largest live reading is the value.
    multiprocess_mode="livemax",
    registry=REGISTRY,
)


class Provider(enum.StrEnum):
    """The mailbox provider of a recipient, for per-provider bounce rates."""

    GMAIL = "gmail"
    YAHOO = "yahoo"
    MICROSOFT = "microsoft"
    OTHER = "other"


_PROVIDER_DOMAINS = {
    "gmail.com": Provider.GMAIL,
    "googlemail.com": Provider.GMAIL,
    "ymail.com": Provider.YAHOO,
    "rocketmail.com": Provider.YAHOO,
    "aol.com": Provider.YAHOO,
    "outlook.com": Provider.MICROSOFT,
    "msn.com": Provider.MICROSOFT,
}
# Country variants: yahoo.co.uk, hotmail.fr, live.com.au ...
_PROVIDER_PREFIXES = {
    "yahoo": Provider.YAHOO,
    "hotmail": Provider.MICROSOFT,
    "live": Provider.MICROSOFT,
    "outlook": Provider.MICROSOFT,
}


def provider_of(address: str) -> Provider:
    """The provider by the recipient's domain (MX-hosted domains count as other)."""
    domain = address_key(address).rpartition("@")[2]
    if domain in _PROVIDER_DOMAINS:
        return _PROVIDER_DOMAINS[domain]
    first = domain.split(".", 1)[0]
    if first in _PROVIDER_PREFIXES and domain.count(".") <= 2:
        return _PROVIDER_PREFIXES[first]
    return Provider.OTHER


# --------------------------------------------------------------------------- results


class TopicRefused(Exception):
    """A publisher's failure that concerns one topic only (an ACL, a topic that does not
    exist, a record it will not take): records for the other topics still go.
    `record_only`: the trouble is this record (its size), not the topic's other records."""

    def __init__(self, detail: str, *, record_only: bool = False) -> None:
        super().__init__(detail)
        self.record_only = record_only


class Publisher(Protocol):
    """Where records for Kafka go; the worker implements it with its producer."""

    async def publish(self, topic: str, key: bytes, value: bytes) -> None:
        """Publish one record and return once Kafka acknowledged it (raise if it did not:
        TopicRefused if the trouble is the topic, anything else if it is the broker)."""
        ...


@dataclass(frozen=True, slots=True)
class BounceTopics:
    """Topic names of the verify-before-resend records."""

    verification_requests: str = "eob.address-verification"
    paper_fallback: str = "eob.paper-fallback"
    verification_results: str = "eob.address-verification.results"


class BounceReason(enum.StrEnum):
    """Why a notice stands where it does after the bounce service saw it (status reasons)."""

    DELIVERED = "delivered"
    RETRY_SCHEDULED = "retry_scheduled"
    # A resend of this notice is under way (released or retried); its report will follow.
    IN_FLIGHT = "in_flight"
    AWAITING_VERIFICATION = "awaiting_verification"
    ADDRESS_SUPPRESSED = "address_suppressed"
    RETRIES_EXHAUSTED = "retries_exhausted"
    UNDELIVERABLE = "undeliverable"
    VERIFICATION_FAILED = "verification_failed"
    VERIFICATION_TIMEOUT = "verification_timeout"
    PAYLOAD_UNAVAILABLE = "payload_unavailable"
    UNKNOWN_EVENT = "unknown_event"


@dataclass(frozen=True, slots=True)
class BounceOutcome:
    """What a notice's status event should say now."""

    event_id: str
    outcome: Outcome
    reason: BounceReason
    category: BounceCategory | None = None
    # For DEFERRED: when the next attempt is due.
    retry_at: dt.datetime | None = None

    @property
    def final(self) -> bool:
        """Whether nothing more will happen to the notice."""
        return self.outcome in (Outcome.DELIVERED, Outcome.FALLBACK, Outcome.FAILED)


@dataclass(frozen=True, slots=True)
class SendPermitted:
    """Send the notice now, to `deliverable.to` (possibly a verified replacement address)."""

    deliverable: Deliverable

    @property
    def to(self) -> str:
        """The address to send to."""
        return self.deliverable.to


@dataclass(frozen=True, slots=True)
class Held:
    """Do not send: the notice is held (and stored) until the member's address is verified."""

    reason: BounceReason
    event_id: str

    @property
    def outcome(self) -> BounceOutcome:
        """The status to report for the held notice."""
        return BounceOutcome(self.event_id, Outcome.HELD, self.reason)


@dataclass(frozen=True, slots=True)
class Settled:
    """Do not send: an earlier attempt already decided (a redelivered event)."""

    outcome: BounceOutcome


Gate = SendPermitted | Held | Settled


@dataclass(frozen=True, slots=True)
class Resend:
    """A notice to send again: the raw event, and the permission naming the address to use."""

    deliverable: Deliverable
    raw_event: bytes = field(repr=False)
    # True when released after a verification (the address may differ from the event's).
    released: bool = False

    @property
    def event_id(self) -> str:
        """The notice's event id."""
        return self.deliverable.eob_id

    @property
    def to(self) -> str:
        """The address to send to (not necessarily the one in the raw event)."""
        return self.deliverable.to


@dataclass(frozen=True, slots=True)
class DsnResult:
    """What one failed recipient of a report did to its notice."""

    event_id: str
    category: BounceCategory
    final: bool
    outcome: BounceOutcome


@dataclass(frozen=True, slots=True)
class DsnReport:
    """One message at the bounce address: how it was read and what it changed."""

    inbound: InboundBounce
    results: tuple[DsnResult, ...] = ()
    # Failed recipients the report names that its notice was not sent to: not acted on.
    passed_over: int = 0

    @property
    def review_reason(self) -> ReviewReason | None:
        """Why a person should look at the message, or None."""
        if any(r.outcome.reason is BounceReason.UNKNOWN_EVENT for r in self.results):
            return ReviewReason.UNKNOWN_EVENT
        parsed = self.inbound.parsed
        if self.inbound.event_id is not None and (
            self.passed_over
            or (not self.results and (parsed.is_bounce or parsed.kind is BounceKind.FEEDBACK))
        ):
            # Mapped to a notice, yet it changed nothing, or not all it named: a person
            # decides, nothing is lost.
            return self.inbound.review_reason or ReviewReason.NOT_ACTED_ON
        return self.inbound.review_reason

    @property
    def needs_review(self) -> bool:
        """Whether the listener should keep the message for a person."""
        return self.review_reason is not None


@dataclass(frozen=True, slots=True)
class VerificationOutcome:
    """What a verification answer did: resends to the verified address, or paper."""

    accepted: bool
    resends: tuple[Resend, ...] = ()
    outcomes: tuple[BounceOutcome, ...] = ()


@dataclass(frozen=True, slots=True)
class TickResult:
    """What the timers did: resends due now, and notices that timed out into paper."""

    resends: tuple[Resend, ...] = ()
    outcomes: tuple[BounceOutcome, ...] = ()
    published: int = 0
    purged: int = 0


# --------------------------------------------------------------------------- internals


def _opaque_id(*parts: str) -> str:
    # Deterministic ids: a republished record carries the same one. Unkeyed, so only for
    # ids of what is no secret (a paper fallback's, of its event id).
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:32]


_REQUEST_ID_CONTEXT = b"eobblast.verification_request.v1\x00"


def _request_id(key: bytes | None, member_id: str, stamp: str) -> str:
    """A verification request's id, of its member and the time it was made, keyed with
    the member-reference key: the audit trail stores it (an incident's event id) beside
    that time, and an unkeyed hash would give the member id away to anyone trying ids."""
    if key is None:
        return _legacy_request_id(member_id, stamp)
    data = _REQUEST_ID_CONTEXT + f"{member_id}\x00{stamp}".encode()
    return hmac.new(key, data, hashlib.sha256).hexdigest()[:32]


def _legacy_request_id(member_id: str, stamp: str) -> str:
    """The unkeyed id earlier releases gave a request (and a service without the key
    still does)."""
    return _opaque_id("verification", member_id, stamp)


# A lost deadlock race or a lock wait past LOCK_TIMEOUT (PostgreSQL) is run again; SQLite
# has already waited its busy timeout.
_BUSY_RETRIES = 3


class _Restart(Exception):
    """The slice reached members whose locks were not taken: lock them too and run again."""

    def __init__(self, members: Collection[str]) -> None:
        super().__init__("restart")
        self.members = frozenset(members)


@dataclass(slots=True)
class _Audit:
    event_id: str
    action: AuditAction
    member_id: str
    reason: str
    # The address a released notice goes to (written as its opaque reference).
    recipient: str | None = None


class _Work:
    """One transaction's working copy: runs the state machine, gathers what to write and
    what to do after the commit."""

    def __init__(self, service: BounceService, tx: BounceTx, loaded: Slice, now: dt.datetime):
        self.service = service
        self.tx = tx
        self.loaded = loaded
        self.now = now
        self.book = loaded.book
        self.extras = dict(loaded.extras)
        self.categories: dict[str, BounceCategory] = {}
        self.outbox: list[OutboxMessage] = []
        self.audits: list[_Audit] = []
        self.after_commit: list[Callable[[], None]] = []
        self.resends: list[Resend] = []
        self.settled: list[BounceOutcome] = []
        self.drop: set[str] = set()
        # Notices to forget altogether (first sends that ended before anything was sent).
        self.forget: set[str] = set()
        # Permissions minted for the caller's own send (gate), from Send effects.
        self.minted: list[Deliverable] = []

    def eob(self, eob_id: str) -> Eob | None:
        """The notice as it stands in the working copy."""
        return self.book.eobs.get(eob_id)

    def set_eob(self, eob: Eob) -> None:
        """Change a notice in the working copy outside the state machine (shell recovery)."""
        eobs = dict(self.book.eobs)
        eobs[eob.eob_id] = eob
        self.book = replace(self.book, eobs=eobs)

    def count(self, callback: Callable[[], None]) -> None:
        """Count something once the transaction has committed."""
        self.after_commit.append(callback)

    async def step(
        self,
        event: state.Event,
        *,
        lease_sends: bool,
        category: BounceCategory | None = None,
        target: str | None = None,
    ) -> Transition:
        """Apply one event and carry out its effects inside the transaction."""
        service = self.service
        named = getattr(event, "address", None)
        if isinstance(named, str) and address_key(named) not in self.loaded.checked_keys:
            # The machine would take "not in the book" for "not suppressed": a shell bug.
            raise AssertionError("event names an address whose suppression was not loaded")
        before = self.book
        transition = state.apply(before, event, service.policy, service.random)
        self.book = transition.book
        # Only what the step wrote can have changed: a shared transaction's book holds its
        # whole batch, and comparing every notice on every step cost more than the step.
        for eob_id in transition.written:
            eob = self.book.eobs[eob_id]
            if before.eobs.get(eob_id) != eob:
                old = self.extras.get(eob_id, NO_EXTRAS)
                # A state change ends any lease: the notice is no longer where it was.
                if old.lease_until is not None:
                    old = EobExtras(None, old.fallback_reason, old.category)
                self.extras[eob_id] = old
        if target is not None and category is not None and target in self.book.eobs:
            self.extras[target] = replace(self.extras[target], category=str(category))
        released = {e.eob_id: e.channel for e in transition.effects if isinstance(e, ReleaseHeld)}
        for effect in transition.effects:
            await self._carry_out(effect, lease_sends, category, released)
        return transition

    async def _carry_out(
        self,
        effect: state.Effect,
        lease_sends: bool,
        category: BounceCategory | None,
        released: Mapping[str, str],
    ) -> None:
        service = self.service
        match effect:
            case Send(deliverable=deliverable) if lease_sends:
                eob_id = deliverable.eob_id
                raw = (await self.tx.payloads([eob_id])).get(eob_id)
                if raw is None:
                    # Kept too briefly (payload retention) to send again: paper is safe.
                    eob = self.book.eobs[eob_id]
                    self.set_eob(replace(eob, status=EobStatus.PAPER_FALLBACK, next_at=None))
                    self._paper(eob, schemas.PaperFallbackReason.PAYLOAD_UNAVAILABLE)
                    return
                until = self.now + service.send_lease
                self.extras[eob_id] = replace(self.extras[eob_id], lease_until=until)
                why = "release" if eob_id in released else "retry"
                self.resends.append(Resend(deliverable, raw, released=eob_id in released))
                if eob_id in released:
                    self.audits.append(
                        _Audit(
                            eob_id,
                            AuditAction.RELEASED,
                            deliverable.member_id,
                            released[eob_id],
                            recipient=deliverable.to,
                        )
                    )
                self.count(lambda: RESENDS_ISSUED.labels(why).inc())
            case Send(deliverable=deliverable):
                # The caller is sending right now (gate): the permission is its answer.
                self.minted.append(deliverable)
            case ScheduleRetry(postponed=True):
                self.count(POSTPONED.inc)
            case ScheduleRetry():
                self.count(RETRIES_SCHEDULED.inc)
            case PublishVerificationRequest(member_id=member_id, deadline=deadline):
                held = sorted(
                    e.eob_id
                    for e in self.book.eobs.values()
                    if e.member_id == member_id and e.status is EobStatus.HELD_FOR_VERIFICATION
                )
                reason = str(category) if category is not None else "address_suppressed"
                request = schemas.AddressVerificationRequested(
                    request_id=self.service.request_id(member_id, self.book),
                    member_id=member_id,
                    event_ids=tuple(held[: schemas.MAX_EVENT_IDS]),
                    reason=reason,
                    requested_at=schemas.utc(self.now),
                    deadline=schemas.utc(deadline),
                )
                topic = service.topics.verification_requests
                self.outbox.append(OutboxMessage(topic, member_id.encode(), schemas.dump(request)))
                self.count(VERIFICATION_REQUESTS.inc)
            case RecordIncident(kind=kind, member_id=member_id, eob_id=eob_id):
                code = None if effect.category is None else str(effect.category)
                await self.tx.record_incident(kind, member_id, eob_id, code)
                event_id = eob_id or service.request_id(member_id, self.book, self.now)
                reason = f"{kind}:{code}" if code else str(kind)
                self.audits.append(_Audit(event_id, AuditAction.INCIDENT, member_id, reason))
                self.count(lambda: INCIDENTS.labels(str(kind)).inc())
            case PublishPaperFallback(eob_id=eob_id):
                eob = self.book.eobs[eob_id]
                self._paper(eob, schemas.PaperFallbackReason(str(effect.reason)))
            case SuppressAddress(address=address, category=suppressed_as):
                self.categories[address_key(address)] = suppressed_as
            case ReleaseHeld():
                pass  # the Send that follows carries it (see above)

    def _paper(self, eob: Eob, reason: schemas.PaperFallbackReason) -> None:
        service = self.service
        old = self.extras.get(eob.eob_id, NO_EXTRAS)
        self.extras[eob.eob_id] = EobExtras(None, str(reason), old.category)
        record = schemas.PaperFallback(
            fallback_id=_opaque_id("paper", eob.eob_id),
            event_id=eob.eob_id,
            member_id=eob.member_id,
            reason=reason,
            occurred_at=schemas.utc(self.now),
        )
        self.outbox.append(
            OutboxMessage(
                service.topics.paper_fallback, eob.member_id.encode(), schemas.dump(record)
            )
        )
        self.drop.add(eob.eob_id)
        self.settled.append(self.outcome(eob.eob_id))
        self.audits.append(_Audit(eob.eob_id, AuditAction.PAPER_FALLBACK, eob.member_id, reason))
        self.count(lambda: PAPER_FALLBACKS.labels(str(reason)).inc())

    def publish_settled(self) -> None:
        """Put the status of each notice settled here into the outbox, committed with it.

        Only where the service settles notices on its own (timers, verification results):
        nothing else would publish those statuses if the process ended after the commit.
        A send's or a DSN's caller publishes the status of what it settled itself, with
        the send's attempt and details.
        """
        if self.service.status_record is not None:
            self.outbox.extend(map(self.service.status_record, self.settled))

    def outcome(self, eob_id: str) -> BounceOutcome:
        """What the notice's status should say, from the working copy."""
        eob = self.book.eobs.get(eob_id)
        extra = self.extras.get(eob_id, NO_EXTRAS)
        category = BounceCategory(extra.category) if extra.category else None
        if eob is None:
            return BounceOutcome(eob_id, Outcome.FAILED, BounceReason.UNKNOWN_EVENT)
        match eob.status:
            case EobStatus.DELIVERED:
                return BounceOutcome(eob_id, Outcome.DELIVERED, BounceReason.DELIVERED, category)
            case EobStatus.RETRY_SCHEDULED:
                return BounceOutcome(
                    eob_id, Outcome.DEFERRED, BounceReason.RETRY_SCHEDULED, category, eob.next_at
                )
            case EobStatus.HELD_FOR_VERIFICATION:
                return BounceOutcome(
                    eob_id, Outcome.HELD, BounceReason.AWAITING_VERIFICATION, category
                )
            case EobStatus.PAPER_FALLBACK:
                reason = BounceReason(extra.fallback_reason or BounceReason.UNDELIVERABLE)
                return BounceOutcome(eob_id, Outcome.FALLBACK, reason, category)
            case _:
                return BounceOutcome(
                    eob_id, Outcome.DEFERRED, BounceReason.IN_FLIGHT, category, extra.lease_until
                )

    async def finish(self) -> list[int]:
        """Write the working copy; returns the outbox ids this transaction owns."""
        await self.tx.save(self.loaded, self.book, self.extras, categories=self.categories)
        if self.drop:
            await self.tx.drop_payloads(self.drop)
        if self.forget:
            await self.tx.forget(self.forget)
        return await self.tx.enqueue(self.outbox, self.service.outbox_claim)


@dataclass(frozen=True, slots=True)
class _Call:
    """One caller's transaction body, waiting to share a transaction (group commit)."""

    now: dt.datetime
    body: Callable[[_Work], Awaitable[object]]
    member_ids: Collection[str]
    eob_ids: Collection[str]
    addresses: Collection[str]


# --------------------------------------------------------------------------- the service


class BounceService:
    """Verify-before-resend for the pipeline, the worker, the bounce listener and the timers."""

    def __init__(
        self,
        store: BounceStore,
        publisher: Publisher,
        *,
        rules: BounceRules | None = None,
        verp_keys: Sequence[VerpKey] = (),
        bounce_domain: str | None = None,
        verp_prefix: str = "bounces",
        audit: AuditTrail | None = None,
        reference_key: bytes | None = None,
        actor: str = "eobblast-bounces",
        topics: BounceTopics | None = None,
        send_lease: dt.timedelta = dt.timedelta(minutes=10),
        payload_retention: dt.timedelta = dt.timedelta(days=5),
        row_retention: dt.timedelta = dt.timedelta(days=30),
        housekeeping_every: dt.timedelta = dt.timedelta(minutes=1),
        random: Callable[[], float] = _random.random,
        clock: Callable[[], dt.datetime] | None = None,
        status_record: Callable[[BounceOutcome], OutboxMessage] | None = None,
    ) -> None:
        self.store = store
        self.publisher = publisher
        self.rules = rules or default_rules()
        self.policy = BouncePolicy.from_rules(self.rules)
        self.verp_keys = tuple(verp_keys)
        self.bounce_domain = bounce_domain
        self.verp_prefix = verp_prefix
        self.audit = audit
        # The member-reference key: the trail's opaque references (members, addresses)
        # and the verification requests' ids are keyed with it, the same on every host.
        self.reference_key = reference_key
        self.actor = actor
        self.topics = topics or BounceTopics()
        # How long a handed-out resend may take before `tick` takes it back.
        self.send_lease = send_lease
        # How long the raw event of a sent notice is kept for an asynchronous bounce (MTAs
        # give up after up to 5 days). Zero keeps raw events only of retrying/held notices.
        self.payload_retention = payload_retention
        # Settled notices' rows are kept longer: a late DSN still finds its event.
        self.row_retention = max(row_retention, payload_retention)
        # Purging and the notices gauge scan the store: not on every tick.
        self.housekeeping_every = housekeeping_every
        self.random = random
        self.clock = clock or (lambda: dt.datetime.now(dt.UTC))
        # The status event of a notice this service settles on its own (paper fallback after
        # a timer or a verification result), written to the outbox in the same transaction
        # (`_Work.publish_settled`).
        self.status_record = status_record
        # Timer claims outlive one slow tick; outbox claims a slow publish.
        self.claim_for = dt.timedelta(minutes=2)
        self.outbox_claim = 60.0
        self._next_purge: dt.datetime | None = None
        # Every notice passes `gate` before and `on_delivered` after its send: concurrent
        # calls share one store transaction.
        self._group: GroupCommit[_Call, object] = GroupCommit(
            self._transact_calls,
            on_batch=_count_batch,
            transient=STORE_ERRORS,
        )
        if audit is not None and reference_key is None:
            raise ValueError("an audit trail needs reference_key (opaque member references)")

    def return_path(self, event_id: str) -> str:
        """The envelope sender (MAIL FROM) for an event's message: its VERP address, signed
        with the first (current) key, so its bounces come back to the listener mapped."""
        if not self.verp_keys or self.bounce_domain is None:
            raise ValueError("VERP needs a key and a bounce domain")
        return make_return_path(
            event_id, self.verp_keys[0], self.bounce_domain, prefix=self.verp_prefix
        )

    def request_id(self, member_id: str, book: BounceBook, when: dt.datetime | None = None) -> str:
        """The id of a member's outstanding verification request (stable across republishes
        and restarts: of the member, the time the request was made and the key)."""
        return _request_id(
            self.reference_key, member_id, self._request_stamp(member_id, book, when)
        )

    def _request_stamp(self, member_id: str, book: BounceBook, when: dt.datetime | None) -> str:
        member = book.members.get(member_id)
        if member is not None and member.pending is not None:
            when = member.pending.requested_at
        return (when or self.clock()).isoformat()

    # ------------------------------------------------------------------ transactions

    async def _transact(
        self,
        now: dt.datetime,
        body: Callable[[_Work], Awaitable[T]],
        *,
        member_ids: Collection[str] = (),
        eob_ids: Collection[str] = (),
        address_keys: Collection[str] = (),
        addresses: Collection[str] = (),
    ) -> tuple[T, _Work]:
        results, work = await self._transact_bodies(
            now,
            [body],
            member_ids=member_ids,
            eob_ids=eob_ids,
            address_keys=address_keys,
            addresses=addresses,
        )
        return results[0], work

    async def _transact_bodies(
        self,
        now: dt.datetime,
        bodies: Sequence[Callable[[_Work], Awaitable[T]]],
        *,
        member_ids: Collection[str] = (),
        eob_ids: Collection[str] = (),
        address_keys: Collection[str] = (),
        addresses: Collection[str] = (),
        owners_known: Collection[str] = (),
    ) -> tuple[list[T], _Work]:
        """Run the bodies, in order, in one transaction over the members they touch.

        Notices in `owners_known` belong to members in `member_ids` (their callers said
        so): only the others' members are looked up first.
        """
        locks = set(member_ids)
        unknown = set(eob_ids).difference(owners_known)
        if unknown:
            locks |= set((await self.store.members_of(unknown)).values())
        if address_keys:
            locks |= await self.store.members_retrying_at(address_keys)
        keys = set(address_keys) | {address_key(a) for a in addresses}
        for attempt in range(_BUSY_RETRIES + 1):
            try:
                async with self.store.transaction(locks, now, address_keys=keys) as tx:
                    loaded = await tx.load(
                        member_ids=locks,
                        eob_ids=eob_ids,
                        address_keys=address_keys,
                        suppression_keys=keys,
                    )
                    if not loaded.member_ids <= locks:
                        # A notice moved to a member we did not lock (rare): lock it too.
                        raise _Restart(loaded.member_ids)
                    work = _Work(self, tx, loaded, now)
                    results = [await body(work) for body in bodies]
                    outbox_ids = await work.finish()
            except _Restart as restart:
                locks |= restart.members
                continue
            except StoreBusy:
                if attempt == _BUSY_RETRIES:
                    raise
                continue
            await self._after_commit(work, outbox_ids)
            return results, work
        raise StoreBusy

    async def _grouped(
        self,
        now: dt.datetime,
        body: Callable[[_Work], Awaitable[T]],
        *,
        member_ids: Collection[str] = (),
        eob_ids: Collection[str] = (),
        addresses: Collection[str] = (),
    ) -> T:
        """`_transact` for frequent calls: run in a transaction shared with others."""
        result = await self._group.submit(_Call(now, body, member_ids, eob_ids, addresses))
        return result  # type: ignore[return-value]  # what this call's own body returned

    async def _transact_calls(self, calls: Sequence[_Call]) -> list[object]:
        """Several callers' bodies in one transaction, in arrival order."""
        results, _ = await self._transact_bodies(
            max(call.now for call in calls),
            [call.body for call in calls],
            member_ids={m for call in calls for m in call.member_ids},
            eob_ids={e for call in calls for e in call.eob_ids},
            addresses={a for call in calls for a in call.addresses},
            owners_known={e for call in calls if call.member_ids for e in call.eob_ids},
        )
        return results

    async def _after_commit(self, work: _Work, outbox_ids: list[int]) -> None:
        await self._publish(list(zip(outbox_ids, work.outbox, strict=True)))
        # Together, so a release of many notices shares the trail's commits (group commit).
        await asyncio.gather(*(self._audit(audit, work.now) for audit in work.audits))
        for callback in work.after_commit:
            callback()

    async def _publish(self, records: Sequence[tuple[int, OutboxMessage]]) -> int:
        """Publish records in order; acknowledge in the outbox those Kafka took.

        A topic the publisher refuses (TopicRefused: an ACL, say) stops at that record, so
        its records keep their order, and the other topics go on: it must not hold back
        the paper fallbacks or the verification requests of another. A record the topic
        refuses for itself (its size: `record_only`) stops only the records of its key
        there, which keep their order; the topic's other keys go on. Any other failure
        stops them all: the broker is slow or away, and each try would wait as long again
        (this can hold the shared transaction queue).
        """
        done: list[int] = []
        stopped: set[str] = set()
        held: set[tuple[str, bytes]] = set()  # (topic, key)
        try:
            for seq, message in records:
                if message.topic in stopped or (message.topic, message.key) in held:
                    continue
                try:
                    await self.publisher.publish(message.topic, message.key, message.value)
                except Exception as exc:
                    # Committed in the outbox: tick publishes it once this claim runs out.
                    log.warning(
                        "bounce records not published yet (%s); tick retries",
                        type(exc).__name__,
                        extra={"topic": message.topic},
                    )
                    if not isinstance(exc, TopicRefused):
                        break
                    if exc.record_only:
                        held.add((message.topic, message.key))
                    else:
                        stopped.add(message.topic)
                    continue
                done.append(seq)
        finally:
            await self.store.ack_outbox(done)
        return len(done)

    async def _audit(self, audit: _Audit, now: dt.datetime) -> None:
        if self.audit is None or self.reference_key is None:
            return
        key = self.reference_key
        record = AuditRecord(
            event_id=audit.event_id,
            action=audit.action,
            actor=self.actor,
            at=now,
            member_ref=member_ref(key, audit.member_id),
            reason=audit.reason,
            recipient_ref=None if audit.recipient is None else recipient_ref(key, audit.recipient),
        )
        try:
            await self.audit.append(record)
        except Exception as exc:
            # Already committed: failing the caller now would only make it redo what is done.
            # The incident itself is in the bounce store; the trail's gap is counted (as the
            # workers' and the portal's are: EobblastAuditGap) and logged (by type: a
            # driver's message could quote a value).
            AUDIT_GAPS.inc()
            log.error(
                "audit record not written: %s",
                type(exc).__name__,
                extra={"event_id": audit.event_id},
            )

    # ------------------------------------------------------------------ sending

    async def gate(
        self,
        event_id: str,
        member_id: str,
        address: str,
        raw_event: bytes,
        *,
        at: dt.datetime | None = None,
    ) -> Gate:
        """Before sending: permission (to which address), a hold, or an earlier decision."""
        now = at or self.clock()

        async def body(work: _Work) -> Gate:
            existing = work.eob(event_id)
            if existing is None:
                pending_before = _pending(work.book, member_id)
                await work.step(
                    state.Submitted(event_id, member_id, address, now), lease_sends=False
                )
            elif existing.status is EobStatus.SENDING and not _leased(work, event_id):
                # Redelivered by Kafka after the worker sending it died: route it afresh.
                pending_before = _pending(work.book, member_id)
                work.set_eob(replace(existing, status=EobStatus.RETRY_SCHEDULED, next_at=now))
                await work.step(state.RetryDue(event_id, now), lease_sends=False)
            elif existing.status is EobStatus.HELD_FOR_VERIFICATION:
                return Held(BounceReason.AWAITING_VERIFICATION, event_id)
            else:
                return Settled(work.outcome(event_id))
            eob = work.eob(event_id)
            assert eob is not None
            if eob.status is EobStatus.HELD_FOR_VERIFICATION:
                await work.tx.put_payload(event_id, member_id, raw_event)
                reason = (
                    BounceReason.AWAITING_VERIFICATION
                    if pending_before
                    else BounceReason.ADDRESS_SUPPRESSED
                )
                work.audits.append(_Audit(event_id, AuditAction.HELD, member_id, reason))
                return Held(reason, event_id)
            if eob.status is EobStatus.SENDING:
                if self.payload_retention > dt.timedelta(0):
                    await work.tx.put_payload(event_id, member_id, raw_event)
                return SendPermitted(_minted(work, event_id))
            return Settled(work.outcome(event_id))

        gate = await self._grouped(
            now, body, member_ids=[member_id], eob_ids=[event_id], addresses=[address]
        )
        label = "send" if isinstance(gate, SendPermitted) else "settled"
        if isinstance(gate, Held):
            label = f"hold_{gate.reason}"
        GATE_DECISIONS.labels(label).inc()
        return gate

    async def on_delivered(
        self,
        event_id: str,
        address: str,
        *,
        member_id: str | None = None,
        at: dt.datetime | None = None,
    ) -> BounceOutcome:
        """The receiver accepted the notice (2xx) at `address` (the deliverable's `to`).

        `member_id`, when the caller knows it, saves looking up whose notice it is (a notice
        that moved to another member meanwhile is still found: the transaction restarts).
        """
        now = at or self.clock()

        async def body(work: _Work) -> BounceOutcome:
            await work.step(state.SyncReply(event_id, address, now, None), lease_sends=False)
            eob = work.eob(event_id)
            if eob is not None and eob.status is EobStatus.DELIVERED:
                if self.payload_retention <= dt.timedelta(0):
                    work.drop.add(event_id)
            return work.outcome(event_id)

        members = [member_id] if member_id is not None else []
        return await self._grouped(
            now, body, member_ids=members, eob_ids=[event_id], addresses=[address]
        )

    async def on_delivery_failure(
        self,
        event_id: str,
        member_id: str,
        address: str,
        raw_event: bytes,
        smtp_code: int | None,
        enhanced: str | None,
        reply_text: str | None,
        *,
        category: BounceCategory | None = None,
        at: dt.datetime | None = None,
    ) -> BounceOutcome:
        """A synchronous 4xx/5xx (or, with `category`, a failure without a reply, e.g.
        SOFT for a lost connection): classify, decide, act; returns the status to report."""
        now = at or self.clock()
        if category is None:
            category = classify_reply(
                smtp_code, enhanced, reply_text or "", rules=self.rules
            ).category
        key = address_key(address)
        hard = self.policy.handling[category] is HandlingAction.VERIFY_ADDRESS

        async def body(work: _Work) -> BounceOutcome:
            if work.eob(event_id) is None:
                # Sent without passing the gate (or the row was purged): know it first.
                await work.step(
                    state.Submitted(event_id, member_id, address, now), lease_sends=False
                )
            before = work.eob(event_id)
            await _keep_payload(work, event_id, member_id, raw_event)
            transition = await work.step(
                state.SyncReply(event_id, address, now, category),
                lease_sends=True,
                category=category,
                target=event_id,
            )
            if transition.effects or work.eob(event_id) != before:
                self._count_bounce(work, event_id, member_id, category, address, "sync")
            return work.outcome(event_id)

        outcome, _ = await self._transact(
            now,
            body,
            member_ids=[member_id],
            eob_ids=[event_id],
            address_keys=[key] if hard else (),
            addresses=[address],
        )
        return outcome

    async def on_postponed(
        self,
        event_id: str,
        member_id: str,
        address: str,
        raw_event: bytes,
        until: dt.datetime,
        *,
        at: dt.datetime | None = None,
    ) -> BounceOutcome:
        """eobblast held the send back itself (shaping: no budget, IPs paused): no bounce,
        nothing counted against the address or the member; the notice is sent again at
        `until` (its payload kept for that), or goes to paper past the age limit."""
        now = at or self.clock()

        async def body(work: _Work) -> BounceOutcome:
            if work.eob(event_id) is None:
                await work.step(
                    state.Submitted(event_id, member_id, address, now), lease_sends=False
                )
            await _keep_payload(work, event_id, member_id, raw_event)
            await work.step(state.Postponed(event_id, address, now, until), lease_sends=True)
            return work.outcome(event_id)

        outcome, _ = await self._transact(
            now, body, member_ids=[member_id], eob_ids=[event_id], addresses=[address]
        )
        return outcome

    def _count_bounce(
        self,
        work: _Work,
        event_id: str,
        member_id: str | None,
        category: BounceCategory,
        address: str,
        source: str,
    ) -> None:
        provider = provider_of(address)
        if member_id is not None:
            reason = f"{source}:{category}"
            work.audits.append(_Audit(event_id, AuditAction.BOUNCE, member_id, reason))
        work.count(lambda: BOUNCES.labels(str(category), str(provider), source).inc())

    # ------------------------------------------------------------------ asynchronous bounces

    async def on_dsn(
        self, raw_message: bytes, envelope_to: str, *, at: dt.datetime | None = None
    ) -> DsnReport:
        """A message at the bounce address: map it to its event (VERP first) and act on it."""
        now = at or self.clock()
        inbound = await read_bounce(
            raw_message,
            envelope_to,
            keys=self.verp_keys,
            bounce_domain=self.bounce_domain,
            prefix=self.verp_prefix,
            resolve_reference=self.store.resolve_reference,
            rules=self.rules,
        )
        event_id = inbound.event_id
        parsed = inbound.parsed
        if event_id is None or not parsed.is_bounce:
            return DsnReport(inbound)
        # What a report about a notice the store no longer knows comes to: a person looks.
        unknown = BounceOutcome(event_id, Outcome.FAILED, BounceReason.UNKNOWN_EVENT)
        forgotten = (DsnResult(event_id, parsed.category, True, unknown),)
        member_id = (await self.store.members_of([event_id])).get(event_id)
        if member_id is None:
            # Even when the VERP address is ours (it never expires, and every recipient of a
            # notice holds one), nothing says where a forgotten notice went: the addresses
            # the report names cannot be checked, so a person looks and nothing is suppressed.
            return DsnReport(inbound, forgotten)
        # A VERP address proves the report is about our message; a returned header does not.
        verp = inbound.mapped_by is MappedBy.VERP
        reports = [
            (r.address, r.original_recipient, r.category, (r.action or "").lower() != "delayed")
            for r in parsed.recipients
        ]
        keys = [address_key(address) for address, *_ in reports]
        named = keys + [address_key(original) for _, original, *_ in reports if original]

        async def body(work: _Work) -> tuple[tuple[DsnResult, ...], int]:
            eob = work.eob(event_id)
            if eob is None:
                return forgotten, 0  # forgotten meanwhile: as above, a person looks
            targets: list[tuple[str, BounceCategory, bool]] = []
            passed_over = 0
            current = address_key(eob.address)
            for address, original, category, final in reports:
                names = {address_key(name) for name in (address, original) if name}
                if current in names:
                    targets.append((eob.address, category, final))
                else:
                    # The notice never went there. A return path (the envelope's, or one
                    # quoted in the returned headers) is known to everyone the notice
                    # reached, so a report at it proves nothing about other addresses:
                    # acting on one would let anyone suppress anyone's address.
                    passed_over += 1
            if not reports and verp:
                # A vendor notice that names nobody: our message had one recipient.
                targets.append((eob.address, parsed.category, True))
            results = []
            for target, category, final in targets:
                before = work.eob(event_id)
                transition = await work.step(
                    state.DsnReceived(event_id, target, now, category, final),
                    lease_sends=True,
                    category=category,
                    target=event_id,
                )
                if final and (transition.effects or work.eob(event_id) != before):
                    self._count_bounce(work, event_id, member_id, category, target, "dsn")
                results.append(DsnResult(event_id, category, final, work.outcome(event_id)))
            return tuple(results), passed_over

        (results, passed_over), _ = await self._transact(
            now,
            body,
            member_ids=[member_id],
            eob_ids=[event_id],
            address_keys=keys,
            addresses=named,
        )
        return DsnReport(inbound, results, passed_over)

    async def on_not_sent(
        self, event_id: str, member_id: str, *, at: dt.datetime | None = None
    ) -> None:
        """A send the gate permitted ended before anything went out (no portal for it, or
        its S/MIME encryption failed): its outcome is the pipeline's (failed),
        and the notice is forgotten, or it would stay "sending" for good, its raw event with
        it. A resend is left alone (its lease runs out and a tick routes it again), and so is
        a notice anything was recorded for since."""
        now = at or self.clock()

        async def body(work: _Work) -> None:
            eob = work.eob(event_id)
            if eob is not None and eob.status is EobStatus.SENDING and not _leased(work, event_id):
                work.forget.add(event_id)

        await self._transact(now, body, member_ids=[member_id], eob_ids=[event_id])

    async def confirm_resend(self, resend: Resend, *, at: dt.datetime | None = None) -> bool:
        """Just before a resend goes out: whether its permission still holds, its lease
        renewed for the send if so.

        Resends are handed out in batches (a release, a tick's retries) and sent one after
        another: the first can bounce at an address the others name, or a lease run out and
        another worker take the notice over. Such a resend is not sent. If its address went
        bad, its lease is ended, so the next tick routes the notice afresh (a hold, now).
        """
        now = at or self.clock()
        permitted = resend.deliverable
        eob_id, member_id, to = permitted.eob_id, permitted.member_id, permitted.to

        async def body(work: _Work) -> bool:
            eob = work.eob(eob_id)
            if (
                eob is None
                or eob.status not in AWAITING_REPLY
                or eob.attempt != permitted.attempt
                or address_key(eob.address) != address_key(to)
            ):
                work.count(RESENDS_WITHDRAWN.inc)  # a report or another worker moved it on
                return False
            extra = work.extras.get(eob_id, NO_EXTRAS)
            if _pending(work.book, member_id) or (
                address_status(work.book, member_id, to) is not AddressStatus.ACTIVE
            ):
                work.extras[eob_id] = replace(extra, lease_until=now)
                work.count(RESENDS_WITHDRAWN.inc)
                return False
            work.extras[eob_id] = replace(extra, lease_until=now + self.send_lease)
            return True

        return await self._grouped(
            now, body, member_ids=[member_id], eob_ids=[eob_id], addresses=[to]
        )

    # ------------------------------------------------------------------ verification

    async def on_verification_result(
        self,
        result: schemas.AddressVerified | schemas.AddressVerificationFailed,
        *,
        at: dt.datetime | None = None,
    ) -> VerificationOutcome:
        """An answer from the claims system: release the held notices once, or paper."""
        now = at or self.clock()
        member_id = result.member_id
        event: state.Event
        if isinstance(result, schemas.AddressVerified):
            event = state.AddressVerified(
                member_id, result.address, str(result.channel), result.verified_by, now
            )
            accepted = str(result.channel) in self.policy.verification.channels
            label = "verified" if accepted else "unverified_channel"
        else:
            event = state.AddressVerificationFailed(member_id, now)
            accepted = True
            label = "failed"
        addresses = [result.address] if isinstance(result, schemas.AddressVerified) else []

        async def body(work: _Work) -> bool:
            if self._answers_an_earlier_request(result, work.book):
                work.count(lambda: VERIFICATION_RESULTS.labels("stale").inc())
                return False
            await work.step(event, lease_sends=True)
            work.count(lambda: VERIFICATION_RESULTS.labels(label).inc())
            work.publish_settled()
            return True

        current, work = await self._transact(now, body, member_ids=[member_id], addresses=addresses)
        return VerificationOutcome(accepted and current, tuple(work.resends), tuple(work.settled))

    def _answers_an_earlier_request(
        self,
        result: schemas.AddressVerified | schemas.AddressVerificationFailed,
        book: BounceBook,
    ) -> bool:
        """Whether a result is for a verification request older than the member's pending
        one: a copy delivered again (a batch that failed after applying it), or an answer
        that crossed a new bounce. Applied, it would release the held notices to an address
        that has bounced since, or send them to paper for a request still open."""
        member = book.members.get(result.member_id)
        if member is None or member.pending is None:
            return False
        if result.request_id is not None:
            # The pending request's id, or the unkeyed id an earlier release gave the same
            # request (made before an upgrade, or by a host not yet upgraded): its answer
            # quotes that one. Both name the member's pending request, and no other.
            stamp = self._request_stamp(result.member_id, book, None)
            return result.request_id not in (
                _request_id(self.reference_key, result.member_id, stamp),
                _legacy_request_id(result.member_id, stamp),
            )
        # Without the request's id: an answer given before the request was made predates
        # the bounce that made it.
        return result.at < member.pending.requested_at

    # ------------------------------------------------------------------ timers

    async def tick(self, now: dt.datetime | None = None, *, limit: int = 100) -> TickResult:
        """Run due timers (claimed: each by exactly one worker), publish what is pending."""
        now = now or self.clock()
        resends: list[Resend] = []
        outcomes: list[BounceOutcome] = []
        claims = await self.store.claim_timers(now, limit=limit, claim_for=self.claim_for)
        for claim in claims:
            try:
                work = await self._fire(claim.kind, claim.member_id, claim.eob_id, now)
            except Exception as exc:
                # The claim runs out and another tick takes the timer again. By type only:
                # a database driver's message can quote the row it choked on.
                log.error(
                    "bounce timer failed: %s", type(exc).__name__, extra={"event_id": claim.eob_id}
                )
                continue
            resends.extend(work.resends)
            outcomes.extend(work.settled)
        # The timers' work is committed: whatever fails below, the caller gets it (resends
        # leased to it, statuses nothing else would publish).
        published = purged = 0
        try:
            published = await self._publish(
                await self.store.claim_outbox(limit=limit, claim_for=self.outbox_claim)
            )
            purged = await self._housekeeping(now)
        except Exception as exc:
            log.warning("bounce store housekeeping failed: %s", type(exc).__name__)
        return TickResult(tuple(resends), tuple(outcomes), published, purged)

    async def _housekeeping(self, now: dt.datetime) -> int:
        """Every housekeeping_every: purge what is past retention, count the notices."""
        if self._next_purge is not None and now < self._next_purge:
            return 0
        self._next_purge = now + self.housekeeping_every
        purged = await self.store.purge(
            payloads_before=now - self.payload_retention, rows_before=now - self.row_retention
        )
        # Settled notices are not counted: weeks of them would be read every time.
        counts = await self.store.status_counts(settled=False)
        for status in ACTIVE_STATUSES:
            NOTICES.labels(status).set(counts.get(status, 0))
        return purged

    async def _fire(
        self, kind: ClaimKind, member_id: str, eob_id: str | None, now: dt.datetime
    ) -> _Work:
        async def body(work: _Work) -> None:
            if kind is ClaimKind.VERIFICATION_EXPIRED:
                before = _pending(work.book, member_id)
                await work.step(state.VerificationTimeout(member_id, now), lease_sends=True)
                if before and not _pending(work.book, member_id):
                    work.count(lambda: VERIFICATION_RESULTS.labels("timeout").inc())
                return
            assert eob_id is not None
            eob = work.eob(eob_id)
            if eob is None:
                return
            if kind is ClaimKind.LOST_SEND:
                # The claim found the lease run out (and now holds the row for this tick);
                # a report that came in meanwhile moved the notice on, and then it is over.
                if eob.status not in AWAITING_REPLY:
                    return
                # Fired after this claim ran out (a slow tick), the row may be another
                # worker's claim by now: its lease is no longer the one this claim wrote.
                if work.extras.get(eob_id, NO_EXTRAS).lease_until != now + self.claim_for:
                    return
                # Nobody reported the resend: route it afresh (bounded duplicates, as for
                # an event whose worker died mid-send).
                work.set_eob(replace(eob, status=EobStatus.RETRY_SCHEDULED, next_at=now))
                work.count(lambda: RESENDS_ISSUED.labels("lost").inc())
            await work.step(state.RetryDue(eob_id, now), lease_sends=True)

        async def settling(work: _Work) -> None:
            await body(work)
            work.publish_settled()

        _, work = await self._transact(
            now, settling, member_ids=[member_id], eob_ids=[eob_id] if eob_id else ()
        )
        return work

    # ------------------------------------------------------------------ queries

    async def outstanding(self) -> Mapping[str, int]:
        """Notices by status in the store (for summaries)."""
        return await self.store.status_counts()


async def _keep_payload(work: _Work, event_id: str, member_id: str, raw_event: bytes) -> None:
    """Keep the raw event of a notice still in flight (for its retry or its hold). A late
    report of an attempt whose notice has moved on (on paper, delivered) must not bring
    the raw event back: nothing would ever drop it again."""
    eob = work.eob(event_id)
    if eob is not None and eob.status in AWAITING_REPLY:
        await work.tx.put_payload(event_id, member_id, raw_event)


def _pending(book: BounceBook, member_id: str) -> bool:
    member = book.members.get(member_id)
    return member is not None and member.pending is not None


def _leased(work: _Work, eob_id: str) -> bool:
    return work.extras.get(eob_id, NO_EXTRAS).lease_until is not None


def _minted(work: _Work, eob_id: str) -> Deliverable:
    # The permission the state machine minted in this transaction, from its Send effect.
    for deliverable in work.minted:
        if deliverable.eob_id == eob_id:
            return deliverable
    raise AssertionError("the state machine sent without minting a Deliverable")

"""Verify-before-resend state machine: table-driven transitions and stateful properties."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import fields, replace
from typing import TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from eobblast.bounces.category import BounceCategory as C
from eobblast.bounces.category import HandlingAction
from eobblast.bounces.rules import RetrySettings
from eobblast.bounces.state import (
    POSTPONE_FLOOR,
    AddressStatus,
    AddressVerificationFailed,
    AddressVerified,
    BounceBook,
    BouncePolicy,
    Deliverable,
    DsnReceived,
    Effect,
    Eob,
    EobStatus,
    Event,
    FallbackReason,
    IncidentKind,
    MaxAgeExceeded,
    Postponed,
    PublishPaperFallback,
    PublishVerificationRequest,
    RecordIncident,
    ReleaseHeld,
    RetryDue,
    ScheduleRetry,
    Send,
    Submitted,
    SuppressAddress,
    SyncReply,
    VerificationTimeout,
    address_key,
    address_status,
    apply,
    backoff_delay,
)

E = TypeVar("E")
T0 = dt.datetime(2026, 11, 26, 9, 0, tzinfo=dt.UTC)
POLICY = BouncePolicy.from_rules()
MAX_AGE = POLICY.retry.max_age
MIN = dt.timedelta(minutes=1)


def at(minutes: float) -> dt.datetime:
    return T0 + dt.timedelta(minutes=minutes)


def no_jitter() -> float:
    return 0.0


def run(
    events: Sequence[Event], book: BounceBook | None = None, random: float = 0.0
) -> tuple[BounceBook, list[Effect]]:
    """Apply events in order; the book at the end and every effect, in order."""
    book = book or BounceBook()
    effects: list[Effect] = []
    for event in events:
        step = apply(book, event, POLICY, lambda: random)
        book = step.book
        effects.extend(step.effects)
    return book, effects


def sends(effects: Sequence[Effect]) -> list[tuple[str, str]]:
    return [(e.deliverable.eob_id, e.deliverable.to) for e in effects if isinstance(e, Send)]


def of(effects: Sequence[Effect], kind: type[E]) -> list[E]:
    return [e for e in effects if isinstance(e, kind)]


SUBMIT_1 = Submitted("eob-1", "m-1", "ann@example.org", at(0))


# --------------------------------------------------------------------------- table


def test_submitted_notice_is_sent() -> None:
    book, effects = run([SUBMIT_1])
    assert sends(effects) == [("eob-1", "ann@example.org")]
    assert book.eobs["eob-1"].status is EobStatus.SENDING
    assert book.eobs["eob-1"].attempt == 1


def test_redelivered_submission_is_ignored() -> None:
    _, effects = run([SUBMIT_1, SUBMIT_1])
    assert len(sends(effects)) == 1


def test_accepted_reply_delivers() -> None:
    book, _ = run([SUBMIT_1, SyncReply("eob-1", "ann@example.org", at(1), None)])
    assert book.eobs["eob-1"].status is EobStatus.DELIVERED


def test_sending_and_delivering_keep_every_other_field_of_the_notice() -> None:
    # Every notice takes these steps, which build its next Eob field by field rather than
    # with dataclasses.replace: a field added to Eob must be carried there too.
    assert [f.name for f in fields(Eob)] == [
        "eob_id",
        "member_id",
        "address",
        "status",
        "age_from",
        "attempt",
        "next_at",
        "incident_recorded",
    ]
    retrying = Eob(
        "eob-1", "m-1", "ann@example.org", EobStatus.RETRY_SCHEDULED, at(-5), 2, at(0), True
    )
    sent, _ = run([RetryDue("eob-1", at(0))], BounceBook(eobs={"eob-1": retrying}))
    assert sent.eobs["eob-1"] == replace(
        retrying, status=EobStatus.SENDING, attempt=3, next_at=None
    )
    delivered, _ = run([SyncReply("eob-1", "ann@example.org", at(1), None)], sent)
    assert delivered.eobs["eob-1"] == replace(sent.eobs["eob-1"], status=EobStatus.DELIVERED)


@pytest.mark.parametrize(
    ("draw", "expected_seconds"),
    [(0.0, 300.0), (0.5, 225.0), (0.999999, 150.0)],
)
def test_soft_bounce_schedules_a_jittered_retry(draw: float, expected_seconds: float) -> None:
    book, effects = run(
        [SUBMIT_1, SyncReply("eob-1", "ann@example.org", at(0), C.SOFT)], random=draw
    )
    (retry,) = of(effects, ScheduleRetry)
    assert isinstance(retry, ScheduleRetry)
    assert retry.at == pytest.approx(at(0) + dt.timedelta(seconds=expected_seconds), abs=MIN)
    assert book.eobs["eob-1"].status is EobStatus.RETRY_SCHEDULED


def test_a_postponed_send_waits_for_the_shaper_not_the_soft_bounce_schedule() -> None:
    # eobblast held the send back itself (no budget this hour): no bounce, no backoff.
    until = at(0) + dt.timedelta(minutes=40)
    book, effects = run([SUBMIT_1, Postponed("eob-1", "ann@example.org", at(0), until)])
    eob = book.eobs["eob-1"]
    assert (eob.status, eob.next_at) == (EobStatus.RETRY_SCHEDULED, until)
    assert of(effects, ScheduleRetry) == [ScheduleRetry("eob-1", until, postponed=True)]
    # The resend is a send of its own, with its own attempt number (its status's id).
    book, effects = run([RetryDue("eob-1", until)], book)
    assert sends(effects) == [("eob-1", "ann@example.org")]
    assert book.eobs["eob-1"].attempt == 2


def test_a_postponement_is_never_sooner_than_the_floor_nor_past_the_age_limit() -> None:
    book, _ = run([SUBMIT_1, Postponed("eob-1", "ann@example.org", at(0), at(0))])
    assert book.eobs["eob-1"].next_at == at(0) + POSTPONE_FLOOR
    late = at(0) + POLICY.retry.max_age + dt.timedelta(hours=1)
    book, effects = run([SUBMIT_1, Postponed("eob-1", "ann@example.org", at(1), late)])
    assert book.eobs["eob-1"].status is EobStatus.PAPER_FALLBACK
    (paper,) = of(effects, PublishPaperFallback)
    assert paper.reason is FallbackReason.RETRIES_EXHAUSTED


def test_a_postponement_about_a_notice_already_decided_changes_nothing() -> None:
    delivered, _ = run([SUBMIT_1, SyncReply("eob-1", "ann@example.org", at(1), None)])
    later = at(0) + dt.timedelta(hours=1)
    book, effects = run([Postponed("eob-1", "ann@example.org", at(2), later)], delivered)
    assert book == delivered and effects == []
    sending, _ = run([SUBMIT_1])
    book, effects = run([Postponed("eob-1", "bob@example.org", at(2), later)], sending)
    assert book == sending and effects == []


def test_backoff_grows_exponentially_up_to_the_cap() -> None:
    retry = RetrySettings()
    delays = [backoff_delay(n, retry, no_jitter).total_seconds() for n in range(1, 10)]
    assert delays[:5] == [300, 600, 1200, 2400, 4800]
    assert delays[-1] == retry.max_delay.total_seconds()
    assert backoff_delay(10_000, retry, no_jitter) == retry.max_delay
    # A misbehaving random source cannot push a delay outside [(1 - jitter) * d, d].
    assert backoff_delay(1, retry, lambda: 7.0).total_seconds() == pytest.approx(150, abs=1)
    assert backoff_delay(1, retry, lambda: -3.0).total_seconds() == 300


def test_early_retry_timer_is_ignored_and_the_due_one_sends() -> None:
    book, _ = run([SUBMIT_1, SyncReply("eob-1", "ann@example.org", at(0), C.THROTTLE)])
    _, early = run([RetryDue("eob-1", at(1))], book)
    assert early == []
    book, due = run([RetryDue("eob-1", at(5))], book)
    assert sends(due) == [("eob-1", "ann@example.org")]
    assert book.eobs["eob-1"].attempt == 2


def test_soft_bounces_end_in_paper_at_max_age_and_never_retry_past_it() -> None:
    book, effects = run([SUBMIT_1])
    now = at(0)
    for _ in range(100):
        book, step = run([SyncReply("eob-1", "ann@example.org", now, C.SOFT)], book)
        effects += step
        eob = book.eobs["eob-1"]
        if eob.status is EobStatus.PAPER_FALLBACK:
            break
        assert eob.next_at is not None
        now = eob.next_at
        book, step = run([RetryDue("eob-1", now)], book)
        effects += step
    assert book.eobs["eob-1"].status is EobStatus.PAPER_FALLBACK
    assert of(effects, PublishPaperFallback) == [
        PublishPaperFallback("eob-1", "m-1", FallbackReason.RETRIES_EXHAUSTED)
    ]
    assert all(r.at <= at(0) + MAX_AGE for r in of(effects, ScheduleRetry))
    assert len(sends(effects)) > 5


def test_max_age_timer_falls_back_only_once_due() -> None:
    book, _ = run([SUBMIT_1, SyncReply("eob-1", "ann@example.org", at(0), C.SOFT)])
    _, early = run([MaxAgeExceeded("eob-1", at(60))], book)
    assert early == []
    book, due = run([MaxAgeExceeded("eob-1", T0 + MAX_AGE)], book)
    assert of(due, PublishPaperFallback)
    assert book.eobs["eob-1"].status is EobStatus.PAPER_FALLBACK


def test_message_too_large_goes_to_paper_now() -> None:
    _, effects = run([SUBMIT_1, SyncReply("eob-1", "ann@example.org", at(0), C.MESSAGE_TOO_LARGE)])
    assert of(effects, PublishPaperFallback) == [
        PublishPaperFallback("eob-1", "m-1", FallbackReason.UNDELIVERABLE)
    ]


def test_review_records_one_incident_and_keeps_retrying() -> None:
    book, effects = run([SUBMIT_1, SyncReply("eob-1", "ann@example.org", at(0), C.SPAM_BLOCK)])
    book, more = run(
        [RetryDue("eob-1", at(10)), SyncReply("eob-1", "ann@example.org", at(10), C.SPAM_BLOCK)],
        book,
    )
    incidents = of(effects + more, RecordIncident)
    assert incidents == [RecordIncident(IncidentKind.NEEDS_REVIEW, "m-1", "eob-1", C.SPAM_BLOCK)]
    assert book.eobs["eob-1"].status is EobStatus.RETRY_SCHEDULED


def test_hard_bounce_suppresses_holds_requests_and_records() -> None:
    book, _ = run(
        [
            SUBMIT_1,
            Submitted("eob-2", "m-1", "ann@example.org", at(0)),
            SyncReply("eob-2", "ann@example.org", at(0), C.SOFT),
        ]
    )
    book, effects = run([SyncReply("eob-1", "ann@example.org", at(1), C.HARD_ADDRESS)], book)
    assert of(effects, SuppressAddress) == [SuppressAddress("ann@example.org", C.HARD_ADDRESS)]
    assert of(effects, RecordIncident) == [
        RecordIncident(IncidentKind.HARD_BOUNCE, "m-1", "eob-1", C.HARD_ADDRESS)
    ]
    assert of(effects, PublishVerificationRequest) == [
        PublishVerificationRequest("m-1", ("ann@example.org",), at(1) + POLICY.verification.timeout)
    ]
    assert book.eobs["eob-1"].status is EobStatus.HELD_FOR_VERIFICATION
    assert book.eobs["eob-2"].status is EobStatus.HELD_FOR_VERIFICATION
    assert sends(effects) == []
    assert address_status(book, "m-1", "ANN@example.org") is AddressStatus.AWAITING_VERIFICATION
    # A new notice for the member waits too, without a second request.
    book, later = run([Submitted("eob-3", "m-1", "ann@example.org", at(2))], book)
    assert later == []
    assert book.eobs["eob-3"].status is EobStatus.HELD_FOR_VERIFICATION


def held_book() -> BounceBook:
    book, _ = run(
        [
            SUBMIT_1,
            Submitted("eob-2", "m-1", "ann@example.org", at(0)),
            SyncReply("eob-2", "ann@example.org", at(0), C.SOFT),
            DsnReceived("eob-1", "ann@example.org", at(1), C.HARD_ADDRESS),
        ]
    )
    return book


def test_verified_address_releases_every_held_notice_exactly_once() -> None:
    verified = AddressVerified("m-1", "ann.new@example.org", "phone", "agent-7", at(60))
    book, effects = run([verified], held_book())
    assert of(effects, ReleaseHeld) == [
        ReleaseHeld("eob-1", "m-1", "ann.new@example.org", "phone"),
        ReleaseHeld("eob-2", "m-1", "ann.new@example.org", "phone"),
    ]
    assert sends(effects) == [("eob-1", "ann.new@example.org"), ("eob-2", "ann.new@example.org")]
    assert {e.status for e in book.eobs.values()} == {EobStatus.RELEASED}
    assert address_status(book, "m-1", "ann@example.org") is AddressStatus.VERIFIED
    # The same answer again (a redelivered event) releases nothing.
    _, again = run([replace(verified, at=at(61))], book)
    assert sends(again) == [] and of(again, ReleaseHeld) == []
    # A stale notice for the old address goes to the verified one.
    _, stale = run([Submitted("eob-9", "m-1", "ann@example.org", at(70))], book)
    assert sends(stale) == [("eob-9", "ann.new@example.org")]


def test_member_may_confirm_the_bounced_address_itself() -> None:
    verified = AddressVerified("m-1", "ann@example.org", "portal", "member", at(60))
    book, effects = run([verified], held_book())
    assert sends(effects) == [("eob-1", "ann@example.org"), ("eob-2", "ann@example.org")]
    assert "ann@example.org" not in book.suppressed
    assert address_status(book, "m-1", "ann@example.org") is AddressStatus.ACTIVE


def test_verification_by_email_releases_nothing() -> None:
    unverified = AddressVerified("m-1", "evil@example.net", "email", "someone", at(60))
    book, effects = run([unverified], held_book())
    assert effects == [RecordIncident(IncidentKind.UNVERIFIED_CHANNEL, "m-1")]
    assert book.eobs["eob-1"].status is EobStatus.HELD_FOR_VERIFICATION


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        (AddressVerificationFailed("m-1", at(60)), FallbackReason.VERIFICATION_FAILED),
        (
            VerificationTimeout("m-1", at(1) + POLICY.verification.timeout),
            FallbackReason.VERIFICATION_TIMEOUT,
        ),
    ],
)
def test_failed_or_expired_verification_sends_every_held_notice_to_paper(
    event: Event, reason: FallbackReason
) -> None:
    book, effects = run([event], held_book())
    assert of(effects, PublishPaperFallback) == [
        PublishPaperFallback("eob-1", "m-1", reason),
        PublishPaperFallback("eob-2", "m-1", reason),
    ]
    assert sends(effects) == []
    # The address stays out of reach: a new notice to it goes to paper too.
    book, later = run([Submitted("eob-3", "m-1", "ann@example.org", at(9000))], book)
    assert sends(later) == [] and of(later, PublishPaperFallback)
    # ...until the member verifies an address again.
    _, fixed = run([AddressVerified("m-1", "ann@example.org", "sms", "member", at(9001))], book)
    assert sends(fixed) == []  # nothing was held: the paper notices are final
    book, after = run(
        [
            AddressVerified("m-1", "ann@example.org", "sms", "member", at(9001)),
            Submitted("eob-4", "m-1", "ann@example.org", at(9002)),
        ],
        book,
    )
    assert sends(after) == [("eob-4", "ann@example.org")]


def test_early_verification_timeout_is_ignored() -> None:
    _, effects = run([VerificationTimeout("m-1", at(2))], held_book())
    assert effects == []


def test_late_dsn_after_acceptance_holds_the_notice() -> None:
    book, _ = run([SUBMIT_1, SyncReply("eob-1", "ann@example.org", at(0), None)])
    book, effects = run([DsnReceived("eob-1", "ann@example.org", at(30), C.HARD_ADDRESS)], book)
    assert book.eobs["eob-1"].status is EobStatus.HELD_FOR_VERIFICATION
    assert of(effects, PublishVerificationRequest)


def test_delayed_dsn_changes_nothing() -> None:
    book, _ = run([SUBMIT_1])
    after, effects = run(
        [DsnReceived("eob-1", "ann@example.org", at(5), C.SOFT, final=False)], book
    )
    assert effects == [] and after.eobs == book.eobs


def test_bounce_about_an_older_address_only_suppresses_it() -> None:
    book, _ = run(
        [
            AddressVerified("m-1", "ann.new@example.org", "phone", "agent", at(0)),
            Submitted("eob-1", "m-1", "ann.new@example.org", at(1)),
        ]
    )
    book, effects = run([DsnReceived("eob-1", "ann.old@example.org", at(2), C.HARD_ADDRESS)], book)
    assert of(effects, SuppressAddress) == [SuppressAddress("ann.old@example.org", C.HARD_ADDRESS)]
    assert book.eobs["eob-1"].status is EobStatus.SENDING
    assert of(effects, PublishVerificationRequest) == []


def test_shared_address_holds_the_other_members_notices_with_their_own_request() -> None:
    book, _ = run(
        [
            Submitted("eob-a", "m-a", "family@example.org", at(0)),
            Submitted("eob-b", "m-b", "family@example.org", at(0)),
            SyncReply("eob-b", "family@example.org", at(0), C.SOFT),
        ]
    )
    book, effects = run([SyncReply("eob-a", "family@example.org", at(1), C.HARD_ADDRESS)], book)
    assert book.eobs["eob-b"].status is EobStatus.HELD_FOR_VERIFICATION
    requests = of(effects, PublishVerificationRequest)
    assert {r.member_id for r in requests} == {"m-a", "m-b"}
    # Member a's answer releases only member a's notice.
    book, released = run([AddressVerified("m-a", "a@example.org", "phone", "x", at(5))], book)
    assert sends(released) == [("eob-a", "a@example.org")]
    assert book.eobs["eob-b"].status is EobStatus.HELD_FOR_VERIFICATION
    # A new notice for member c to the suppressed address is held and asked about.
    book, c = run([Submitted("eob-c", "m-c", "family@example.org", at(6))], book)
    assert sends(c) == [] and of(c, PublishVerificationRequest)


def test_deliverable_cannot_be_forged() -> None:
    with pytest.raises(TypeError):
        Deliverable("eob-1", "m-1", "someone@example.org", 1, object())


def test_policy_refuses_to_retry_hard_bounces() -> None:
    assert POLICY.handling[C.HARD_ADDRESS] is HandlingAction.VERIFY_ADDRESS


# --------------------------------------------------------------------------- stateful

MEMBERS = ("m-1", "m-2", "m-3")
ADDRESSES = ("ann@example.org", "bob@example.org", "family@example.org", "ANN@example.org")
NEW_ADDRESSES = ("ann.new@example.net", "bob.new@example.net", "family@example.org")
CATEGORIES = (None, *C)


class VerifyBeforeResend(RuleBasedStateMachine):
    """Random event sequences; the safety properties are checked after every step."""

    def __init__(self) -> None:
        super().__init__()
        self.book = BounceBook()
        self.now = T0
        self.count = 0
        # Independent model: addresses that hard-bounced and no verified channel vouched for.
        self.bad: set[str] = set()
        # Per member: addresses the member is known to use (submitted or verified).
        self.known: dict[str, set[str]] = {m: set() for m in MEMBERS}
        self.released: dict[str, int] = {}
        self.holds: dict[str, int] = {}
        self.held_once: set[str] = set()
        self.paper: set[str] = set()

    def step(self, event: Event, draw: float) -> None:
        before = self.book
        result = apply(self.book, event, POLICY, lambda: draw)
        self.book = result.book
        # The shell writes back only the notices a step says it wrote: none may hide.
        changed = {i for i, eob in self.book.eobs.items() if before.eobs.get(i) != eob}
        assert changed <= result.written, "a notice changed that the step did not report"
        for effect in result.effects:
            if isinstance(effect, Send):
                to = effect.deliverable.to.lower()
                member = effect.deliverable.member_id
                assert to not in self.bad, "sent to a hard-bounced, unverified address"
                assert to in self.known[member], "sent to an address nobody gave for the member"
                assert effect.deliverable.eob_id not in self.paper, "sent after paper fallback"
                assert (
                    before.members.get(member) is None
                    or before.members[member].pending is None
                    or isinstance(event, AddressVerified)
                ), "sent while verification outstanding"
            elif isinstance(effect, ScheduleRetry):
                eob = self.book.eobs[effect.eob_id]
                assert effect.at <= eob.age_from + MAX_AGE, "retry scheduled past max age"
                assert effect.at >= event.at
            elif isinstance(effect, ReleaseHeld):
                self.released[effect.eob_id] = self.released.get(effect.eob_id, 0) + 1
                assert before.eobs[effect.eob_id].status is EobStatus.HELD_FOR_VERIFICATION
            elif isinstance(effect, PublishPaperFallback):
                assert effect.eob_id not in self.paper, "two paper fallbacks for one notice"
                self.paper.add(effect.eob_id)
        for eob in self.book.eobs.values():
            if eob.status is EobStatus.HELD_FOR_VERIFICATION:
                self.held_once.add(eob.eob_id)
                previous = before.eobs.get(eob.eob_id)
                if previous is None or previous.status is not EobStatus.HELD_FOR_VERIFICATION:
                    self.holds[eob.eob_id] = self.holds.get(eob.eob_id, 0) + 1

    @initialize()
    def start(self) -> None:
        self.now = T0

    @rule(minutes=st.integers(0, 3 * 24 * 60))
    def time_passes(self, minutes: int) -> None:
        self.now += dt.timedelta(minutes=minutes)

    @rule(member=st.sampled_from(MEMBERS), address=st.sampled_from(ADDRESSES))
    def submit(self, member: str, address: str) -> None:
        self.count += 1
        self.known[member].add(address.lower())
        self.step(Submitted(f"eob-{self.count}", member, address, self.now), 0.5)

    @rule(
        data=st.data(),
        category=st.sampled_from(CATEGORIES),
        dsn=st.booleans(),
        stale=st.booleans(),
        draw=st.floats(0, 1, exclude_max=True),
    )
    def reply(
        self, data: st.DataObject, category: C | None, dsn: bool, stale: bool, draw: float
    ) -> None:
        if not self.book.eobs:
            return
        eob = self.book.eobs[data.draw(st.sampled_from(sorted(self.book.eobs)))]
        address = data.draw(st.sampled_from(ADDRESSES)) if stale else eob.address
        if category is C.HARD_ADDRESS:
            self.bad.add(address.lower())
        if dsn and category is not None:
            event: Event = DsnReceived(eob.eob_id, address, self.now, category)
        else:
            event = SyncReply(eob.eob_id, address, self.now, category)
        self.step(event, draw)

    @rule(
        data=st.data(),
        stale=st.booleans(),
        wait=st.timedeltas(dt.timedelta(0), MAX_AGE + dt.timedelta(hours=2)),
    )
    def postponed(self, data: st.DataObject, stale: bool, wait: dt.timedelta) -> None:
        # Shaping held a send back: never a send, a suppression or a hold by itself.
        if not self.book.eobs:
            return
        eob = self.book.eobs[data.draw(st.sampled_from(sorted(self.book.eobs)))]
        address = data.draw(st.sampled_from(ADDRESSES)) if stale else eob.address
        before = self.book
        self.step(Postponed(eob.eob_id, address, self.now, self.now + wait), 0.5)
        assert self.book.suppressed == before.suppressed
        assert self.book.members == before.members

    @rule(data=st.data(), early=st.booleans())
    def retry_due(self, data: st.DataObject, early: bool) -> None:
        scheduled = sorted(e.eob_id for e in self.book.eobs.values() if e.next_at is not None)
        if not scheduled:
            return
        eob = self.book.eobs[data.draw(st.sampled_from(scheduled))]
        assert eob.next_at is not None
        self.now = max(self.now, eob.next_at - (MIN if early else dt.timedelta(0)))
        self.step(RetryDue(eob.eob_id, self.now), 0.5)

    @rule(data=st.data())
    def max_age(self, data: st.DataObject) -> None:
        if not self.book.eobs:
            return
        eob = self.book.eobs[data.draw(st.sampled_from(sorted(self.book.eobs)))]
        self.step(MaxAgeExceeded(eob.eob_id, self.now), 0.5)

    @rule(
        member=st.sampled_from(MEMBERS),
        address=st.sampled_from(NEW_ADDRESSES),
        channel=st.sampled_from(("phone", "sms", "portal", "email")),
    )
    def verified(self, member: str, address: str, channel: str) -> None:
        if channel != "email":
            self.bad.discard(address.lower())
            self.known[member].add(address.lower())
        self.step(AddressVerified(member, address, channel, "agent", self.now), 0.5)

    @rule(member=st.sampled_from(MEMBERS))
    def verification_failed(self, member: str) -> None:
        self.step(AddressVerificationFailed(member, self.now), 0.5)

    @rule(member=st.sampled_from(MEMBERS))
    def verification_timeout(self, member: str) -> None:
        self.step(VerificationTimeout(member, self.now), 0.5)

    @invariant()
    def held_notices_belong_to_members_being_asked(self) -> None:
        for eob in self.book.eobs.values():
            if eob.status is EobStatus.HELD_FOR_VERIFICATION:
                member = self.book.members.get(eob.member_id)
                assert member is not None and member.pending is not None

    @invariant()
    def release_happens_at_most_once_per_hold(self) -> None:
        for eob_id, count in self.released.items():
            assert count <= self.holds.get(eob_id, 0)

    def teardown(self) -> None:
        # Nobody answers: every held notice must end on paper, none stays held.
        end = self.now + POLICY.verification.timeout + dt.timedelta(days=1)
        for member in MEMBERS:
            self.step(VerificationTimeout(member, end), 0.5)
        assert not [
            e for e in self.book.eobs.values() if e.status is EobStatus.HELD_FOR_VERIFICATION
        ]
        for eob_id in self.held_once:
            status = self.book.eobs[eob_id].status
            assert status is not EobStatus.HELD_FOR_VERIFICATION


VerifyBeforeResend.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestVerifyBeforeResend = VerifyBeforeResend.TestCase


def test_an_internationalised_domain_has_one_key_in_either_form() -> None:
    # Events carry the ASCII form; a report may name the Unicode one.
    assert address_key("Maria@Bücher.example") == address_key("maria@xn--bcher-kva.example")
    assert address_key("<Jo@Example.COM>") == "jo@example.com"

"""Verify-before-resend end to end at the service level, on SQLite and on PostgreSQL.

The service runs the real state machine over the real store; Kafka is a recording publisher
and the audit trail a real SQLite trail. Times are passed in, so no test waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import re
import sqlite3
import subprocess
import sys
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, cast

import aiosmtplib
import orjson
import psycopg
import pytest
import zstandard

from eobblast.bounces.category import BounceCategory
from eobblast.bounces.dsn import BounceKind
from eobblast.bounces.inbound import MappedBy, ReviewReason
from eobblast.bounces.listener import BounceListener
from eobblast.bounces.service import (
    BounceReason,
    BounceService,
    Held,
    SendPermitted,
    Settled,
    TopicRefused,
)
from eobblast.bounces.state import BounceBook, Eob, EobStatus, IncidentKind, address_key
from eobblast.bounces.store import (
    PURGE_OVERLAP,
    PURGE_ROWS,
    BounceStore,
    OutboxMessage,
    Slice,
    StoreBusy,
    open_bounce_store,
)
from eobblast.bounces.verp import (
    TokenKind,
    VerpKey,
    event_reference,
    make_return_path,
    read_return_path,
)
from eobblast.config import Config, load_config
from eobblast.errors import ConfigError, Outcome
from eobblast.events.verification import (
    AddressVerificationFailed,
    AddressVerificationRequested,
    AddressVerified,
    FailureReason,
    PaperFallback,
    VerificationChannel,
    paper_fallback_json_schema,
    verification_request_json_schema,
    verification_result_json_schema,
)
from eobblast.observe.audit import AuditAction, AuditError, AuditTrail, member_ref, open_audit
from eobblast.observe.metrics import REGISTRY
from eobblast.protect.escrow import KeyRing
from eobblast.protect.services import ProtectionServices, load_or_create_secret
from eobblast.sandbox import Behaviour, delivery_status_notification
from eobblast.state import postgres
from eobblast.worker import open_bounces
from tests.conftest import throwaway_pg_schema

T0 = dt.datetime(2026, 11, 26, 9, 0, tzinfo=dt.UTC)
AUDIT_KEY = b"k" * 32
VERP = VerpKey(1, b"v" * 32)
BOUNCE_DOMAIN = "bounce.test"
REQUESTS = "eob.address-verification"
PAPER = "eob.paper-fallback"


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


class RecordingPublisher:
    """Kafka stand-in: keeps what was published; can be told to fail."""

    def __init__(self) -> None:
        self.records: list[tuple[str, bytes, bytes]] = []
        self.failing = False
        self.slow = False  # every publish times out
        self.refused: set[str] = set()  # topics this publisher may not write to
        self.too_large: set[bytes] = set()  # keys whose records the topic refuses (size)
        self.too_large_values: set[bytes] = set()  # records the topic refuses (size)
        self.attempts = 0

    async def publish(self, topic: str, key: bytes, value: bytes) -> None:
        self.attempts += 1
        if self.failing:
            raise ConnectionError("broker down")
        if self.slow:
            raise TimeoutError
        if topic in self.refused:
            raise TopicRefused("TopicAuthorizationFailedError")
        if key in self.too_large or value in self.too_large_values:
            raise TopicRefused("MessageSizeTooLargeError", record_only=True)
        self.records.append((topic, key, value))

    def on(self, topic: str) -> list[dict[str, object]]:
        return [orjson.loads(value) for t, _, value in self.records if t == topic]


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A throwaway schema per test: timers are global, so tests must not see each other."""
    with throwaway_pg_schema("bounces") as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'bounces.db'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
async def audit(tmp_path: Path) -> AsyncIterator[AuditTrail]:
    trail = await open_audit(f"sqlite:///{tmp_path / 'audit.db'}")
    yield trail
    await trail.close()


@pytest.fixture
def publisher() -> RecordingPublisher:
    return RecordingPublisher()


def make_service(
    store: BounceStore,
    publisher: RecordingPublisher,
    audit: AuditTrail | None = None,
    *,
    key: bytes | None = None,
) -> BounceService:
    """The service under test; with an audit trail (or a `key`), keyed as the workers' is."""
    return BounceService(
        store,
        publisher,
        verp_keys=[VERP],
        bounce_domain=BOUNCE_DOMAIN,
        audit=audit,
        reference_key=key or (AUDIT_KEY if audit else None),
        random=lambda: 0.0,  # no jitter: the schedule is exact
        clock=lambda: T0,
    )


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[BounceStore]:
    opened = await open_bounce_store(store_url)
    yield opened
    await opened.close()


@pytest.fixture
async def service(
    store: BounceStore, publisher: RecordingPublisher, audit: AuditTrail
) -> BounceService:
    return make_service(store, publisher, audit)


def ids() -> tuple[str, str]:
    """A fresh member id and address (suppression is shared by every test of a store)."""
    tag = uuid.uuid4().hex[:10]
    return f"M-{tag}", f"member-{tag}@example.com"


def event(member_id: str, n: int) -> tuple[str, bytes]:
    event_id = f"{member_id}-e{n}"
    return event_id, orjson.dumps({"event_id": event_id, "member": {"id": member_id}})


async def send_ok(service: BounceService, event_id: str, member_id: str, address: str) -> str:
    raw = orjson.dumps({"event_id": event_id})
    gate = await service.gate(event_id, member_id, address, raw, at=T0)
    assert isinstance(gate, SendPermitted)
    return gate.to


async def hard_bounce(
    service: BounceService, event_id: str, member_id: str, address: str, raw: bytes
) -> None:
    gate = await service.gate(event_id, member_id, address, raw, at=T0)
    assert isinstance(gate, SendPermitted) and gate.to == address
    outcome = await service.on_delivery_failure(
        event_id,
        member_id,
        address,
        raw,
        550,
        "5.1.1",
        "550 5.1.1 <x>: Recipient address rejected: User unknown",
        at=at(1),
    )
    assert outcome.outcome is Outcome.HELD
    assert outcome.reason is BounceReason.AWAITING_VERIFICATION
    assert outcome.category is BounceCategory.HARD_ADDRESS


def verified(member_id: str, address: str, channel: str = "phone") -> AddressVerified:
    return AddressVerified(
        member_id=member_id,
        address=address,
        channel=VerificationChannel(channel),
        verified_by="csr-17",
        at=at(3600),
    )


# --------------------------------------------------------------------------- hard bounces


async def test_hard_bounce_holds_asks_and_releases_exactly_once(
    service: BounceService,
    store: BounceStore,
    publisher: RecordingPublisher,
    audit: AuditTrail,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    member, address = ids()
    ev1, raw1 = event(member, 1)
    ev2, raw2 = event(member, 2)
    ev3, raw3 = event(member, 3)
    before = REGISTRY.get_sample_value(
        "eobblast_bounces_total",
        {"category": "hard_address", "provider": "other", "source": "sync"},
    )
    await hard_bounce(service, ev1, member, address, raw1)

    # Nothing is resent; one verification request; one incident; the address is suppressed.
    assert (await service.tick(at(60))).resends == ()
    requests = publisher.on(REQUESTS)
    assert len(requests) == 1
    request = AddressVerificationRequested.model_validate(requests[0])
    assert request.member_id == member and request.event_ids == (ev1,)
    assert request.reason == "hard_address"
    assert request.deadline == at(1) + service.policy.verification.timeout
    assert publisher.records[0][1] == member.encode()  # keyed by member id
    assert [i.kind for i in await store.incidents(member)] == [IncidentKind.HARD_BOUNCE]
    assert await store.is_suppressed(address)
    trail = await audit.records(ev1)
    assert {r.action for r in trail} == {AuditAction.BOUNCE, AuditAction.INCIDENT}
    assert all(r.member_ref == member_ref(AUDIT_KEY, member) for r in trail)
    after = REGISTRY.get_sample_value(
        "eobblast_bounces_total",
        {"category": "hard_address", "provider": "other", "source": "sync"},
    )
    assert (after or 0) - (before or 0) == 1

    # Further notices of the member are held, whatever address they name.
    held = await service.gate(ev2, member, address, raw2, at=at(10))
    assert isinstance(held, Held) and held.reason is BounceReason.AWAITING_VERIFICATION
    held = await service.gate(ev3, member, "other@example.com", raw3, at=at(11))
    assert isinstance(held, Held)
    # A redelivered event is still held, and asks nothing new.
    assert isinstance(await service.gate(ev2, member, address, raw2, at=at(12)), Held)
    assert len(publisher.on(REQUESTS)) == 1

    # Verified through the phone: every held notice goes to the verified address, once.
    new_address = f"new-{address}"
    result = await service.on_verification_result(verified(member, new_address), at=at(3600))
    assert result.accepted
    assert sorted(r.event_id for r in result.resends) == sorted([ev1, ev2, ev3])
    assert {r.to for r in result.resends} == {new_address}
    assert {r.event_id: r.raw_event for r in result.resends} == {ev1: raw1, ev2: raw2, ev3: raw3}
    assert all(r.released for r in result.resends)
    again = await service.on_verification_result(verified(member, new_address), at=at(3700))
    assert again.resends == ()

    for resend in result.resends:
        outcome = await service.on_delivered(resend.event_id, resend.to, at=at(3601))
        assert outcome.outcome is Outcome.DELIVERED
    # Reported, so no lease runs out: nothing comes back later.
    assert (await service.tick(at(7 * 86400))).resends == ()

    # A new notice to the old address now goes to the verified one.
    ev4, raw4 = event(member, 4)
    gate = await service.gate(ev4, member, address, raw4, at=at(4000))
    assert isinstance(gate, SendPermitted) and gate.to == new_address

    # No member id or address in any log line.
    text = "\n".join(record.getMessage() + str(record.__dict__) for record in caplog.records)
    assert member not in text and address not in text


async def test_other_members_on_a_suppressed_address_are_held_and_asked(
    service: BounceService, publisher: RecordingPublisher
) -> None:
    member, address = ids()
    other, _ = ids()
    ev1, raw1 = event(member, 1)
    await hard_bounce(service, ev1, member, address, raw1)
    ev2, raw2 = event(other, 1)
    gate = await service.gate(ev2, other, address, raw2, at=at(5))
    assert isinstance(gate, Held) and gate.reason is BounceReason.ADDRESS_SUPPRESSED
    requests = [AddressVerificationRequested.model_validate(r) for r in publisher.on(REQUESTS)]
    assert [(r.member_id, r.reason) for r in requests] == [
        (member, "hard_address"),
        (other, "address_suppressed"),
    ]


async def test_a_late_report_for_a_notice_on_paper_does_not_bring_its_raw_event_back(
    service: BounceService, store: BounceStore
) -> None:
    # A report of an old attempt arriving after the notice went to paper wrote its raw event
    # (PHI) back; nothing dropped it again, and it outlived the payload retention.
    member, address = ids()
    ev1, raw1 = event(member, 1)
    await hard_bounce(service, ev1, member, address, raw1)
    failed = AddressVerificationFailed(member_id=member, reason=FailureReason.NO_ANSWER, at=at(60))
    await service.on_verification_result(failed, at=at(60))
    assert ev1 not in await store.payload_ids()
    late = await service.on_delivery_failure(
        ev1, member, address, raw1, 451, "4.2.1", "451 4.2.1 Mailbox busy", at=at(70)
    )
    assert late.outcome is Outcome.FALLBACK
    await service.on_postponed(ev1, member, address, raw1, at(600), at=at(71))
    assert ev1 not in await store.payload_ids()


async def test_only_a_first_send_that_went_nowhere_is_forgotten(
    service: BounceService, store: BounceStore
) -> None:
    member, address = ids()
    (ev1, raw1), (ev2, raw2) = event(member, 1), event(member, 2)
    await service.gate(ev1, member, address, raw1, at=T0)
    await service.gate(ev2, member, address, raw2, at=T0)
    await service.on_delivered(ev2, address, at=at(1))
    await service.on_not_sent(ev1, member, at=at(2))
    await service.on_not_sent(ev2, member, at=at(2))  # delivered: kept
    assert await store.eob(ev1) is None and ev1 not in await store.payload_ids()
    assert (await store.eob(ev2))[0].status is EobStatus.DELIVERED  # type: ignore[index]
    # A resend (leased) is left to its lease.
    other, bad = ids()
    ev3, raw3 = event(other, 3)
    await hard_bounce(service, ev3, other, bad, raw3)
    released = await service.on_verification_result(verified(other, f"new-{bad}"), at=at(60))
    assert [r.event_id for r in released.resends] == [ev3]
    await service.on_not_sent(ev3, other, at=at(61))
    assert (await store.eob(ev3))[0].status is EobStatus.RELEASED  # type: ignore[index]


DELIVERY = "eob.delivery"


def delivery_status(decided: Any) -> OutboxMessage:
    """A stand-in for the worker's eob.delivery/v1 record of a settled notice."""
    value = orjson.dumps({"event_id": decided.event_id, "status": str(decided.outcome)})
    return OutboxMessage(DELIVERY, decided.event_id.encode(), value)


async def test_a_notice_the_service_sends_to_paper_has_its_status_in_the_outbox(
    service: BounceService, publisher: RecordingPublisher
) -> None:
    # The status of a notice settled by a verification result (or a timer) is committed
    # with it: a worker that ends right after the commit no longer loses it, the tick
    # publishes it.
    service.status_record = delivery_status
    service.outbox_claim = 0.0  # the failing publisher's claim runs out at once
    member, address = ids()
    ev1, raw1 = event(member, 1)
    await hard_bounce(service, ev1, member, address, raw1)
    publisher.failing = True  # the broker goes away as the answer comes
    failed = AddressVerificationFailed(member_id=member, reason=FailureReason.NO_ANSWER, at=at(60))
    result = await service.on_verification_result(failed, at=at(60))
    assert [o.event_id for o in result.outcomes] == [ev1]
    assert publisher.on(DELIVERY) == []
    publisher.failing = False
    await service.tick(at(61))
    assert publisher.on(DELIVERY) == [{"event_id": ev1, "status": "fallback"}]
    assert [p["event_id"] for p in publisher.on(PAPER)] == [ev1]
    # A notice a send (here its gate) sends to paper has its status from its worker, with
    # the send's attempt and details: none in the outbox, or consumers would see two.
    ev2, raw2 = event(member, 2)
    gate = await service.gate(ev2, member, address, raw2, at=at(70))
    assert isinstance(gate, Settled) and gate.outcome.outcome is Outcome.FALLBACK
    await service.tick(at(71))
    assert [p["event_id"] for p in publisher.on(PAPER)] == [ev1, ev2]
    assert publisher.on(DELIVERY) == [{"event_id": ev1, "status": "fallback"}]


async def test_verification_failed_sends_each_held_notice_to_paper(
    service: BounceService, publisher: RecordingPublisher
) -> None:
    member, address = ids()
    ev1, raw1 = event(member, 1)
    ev2, raw2 = event(member, 2)
    await hard_bounce(service, ev1, member, address, raw1)
    assert isinstance(await service.gate(ev2, member, address, raw2, at=at(5)), Held)
    failed = AddressVerificationFailed(member_id=member, reason=FailureReason.NO_ANSWER, at=at(60))
    result = await service.on_verification_result(failed, at=at(60))
    assert result.resends == ()
    assert sorted(o.event_id for o in result.outcomes) == sorted([ev1, ev2])
    assert {(o.outcome, o.reason) for o in result.outcomes} == {
        (Outcome.FALLBACK, BounceReason.VERIFICATION_FAILED)
    }
    papers = [PaperFallback.model_validate(p) for p in publisher.on(PAPER)]
    assert sorted(p.event_id for p in papers) == sorted([ev1, ev2])
    assert {p.reason for p in papers} == {"verification_failed"}
    # The address stays paper-only for this member until verified again.
    ev3, raw3 = event(member, 3)
    gate = await service.gate(ev3, member, address, raw3, at=at(70))
    assert isinstance(gate, Settled) and gate.outcome.outcome is Outcome.FALLBACK


async def test_verification_timeout_falls_back_to_paper(
    service: BounceService, publisher: RecordingPublisher
) -> None:
    member, address = ids()
    ev1, raw1 = event(member, 1)
    await hard_bounce(service, ev1, member, address, raw1)
    deadline = at(1) + service.policy.verification.timeout
    early = await service.tick(deadline - dt.timedelta(seconds=1))
    assert early.outcomes == () and publisher.on(PAPER) == []
    due = await service.tick(deadline)
    assert [(o.event_id, o.reason) for o in due.outcomes] == [
        (ev1, BounceReason.VERIFICATION_TIMEOUT)
    ]
    assert [p["event_id"] for p in publisher.on(PAPER)] == [ev1]
    assert (await service.tick(deadline + dt.timedelta(days=1))).outcomes == ()


async def test_an_unverified_channel_releases_nothing(
    service: BounceService, store: BounceStore
) -> None:
    member, address = ids()
    ev1, raw1 = event(member, 1)
    await hard_bounce(service, ev1, member, address, raw1)
    # "mail" is a channel the schema knows but the default policy does not trust.
    result = await service.on_verification_result(verified(member, address, "mail"), at=at(60))
    assert not result.accepted and result.resends == ()
    kinds = [i.kind for i in await store.incidents(member)]
    assert kinds == [IncidentKind.HARD_BOUNCE, IncidentKind.UNVERIFIED_CHANNEL]


async def test_an_answer_to_an_earlier_request_releases_nothing(
    service: BounceService, store: BounceStore, publisher: RecordingPublisher
) -> None:
    # Verified at Y, released to Y, bounced at Y again: a new request. The first answer,
    # delivered again (its batch failed after applying it), used to release the notice to
    # Y once more and lift Y's suppression.
    member, address = ids()
    ev1, raw1 = event(member, 1)
    await hard_bounce(service, ev1, member, address, raw1)
    (first_request,) = [
        AddressVerificationRequested.model_validate(r).request_id for r in publisher.on(REQUESTS)
    ]
    new_address = f"new-{address}"
    answer = verified(member, new_address).model_copy(update={"at": at(50)})
    released = await service.on_verification_result(answer, at=at(60))
    assert [r.to for r in released.resends] == [new_address]
    bounced = await service.on_delivery_failure(
        ev1, member, new_address, raw1, 550, "5.1.1", "550 5.1.1 User unknown", at=at(70)
    )
    assert bounced.outcome is Outcome.HELD and await store.is_suppressed(new_address)
    assert len(publisher.on(REQUESTS)) == 2
    for stale in (answer, answer.model_copy(update={"at": at(3600), "request_id": first_request})):
        again = await service.on_verification_result(stale, at=at(80))
        assert not again.accepted and again.resends == ()
        assert await store.is_suppressed(new_address)
    failed = AddressVerificationFailed(member_id=member, reason=FailureReason.NO_ANSWER, at=at(65))
    assert (await service.on_verification_result(failed, at=at(80))).outcomes == ()
    # An answer to the request now open is taken.
    current = AddressVerificationRequested.model_validate(publisher.on(REQUESTS)[-1])
    third = f"third-{address}"
    answer = verified(member, third).model_copy(
        update={"at": at(75), "request_id": current.request_id}
    )
    taken = await service.on_verification_result(answer, at=at(90))
    assert taken.accepted and [r.to for r in taken.resends] == [third]


async def test_a_tick_whose_housekeeping_fails_still_hands_out_its_timers_work(
    service: BounceService, store: BounceStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The timers' work was committed (resends leased), then the purge found the store busy
    # and tick raised: the worker dropped the resends until their lease ran out, and the
    # statuses of notices sent to paper were never published.
    member, address = ids()
    ev1, raw1 = event(member, 1)
    await service.gate(ev1, member, address, raw1, at=T0)
    deferred = await service.on_delivery_failure(
        ev1, member, address, raw1, 451, "4.2.1", "451 4.2.1 Mailbox busy", at=at(1)
    )
    assert deferred.retry_at is not None

    async def busy(**_: Any) -> int:
        raise StoreBusy

    monkeypatch.setattr(store, "purge", busy)
    result = await service.tick(deferred.retry_at)
    assert [r.event_id for r in result.resends] == [ev1] and result.purged == 0


async def test_a_resend_whose_address_bounced_since_it_was_handed_out_is_not_sent(
    service: BounceService, store: BounceStore
) -> None:
    # Three held notices released to Y and sent one after another: the first bounced at Y
    # (suppressed, a new request), and the other two still went to Y.
    member, address = ids()
    held = [event(member, n) for n in (1, 2, 3)]
    await hard_bounce(service, held[0][0], member, address, held[0][1])
    for event_id, raw in held[1:]:
        assert isinstance(await service.gate(event_id, member, address, raw, at=at(2)), Held)
    new_address = f"new-{address}"
    released = await service.on_verification_result(verified(member, new_address), at=at(60))
    first, *others = sorted(released.resends, key=lambda r: r.event_id)
    assert len(others) == 2
    assert await service.confirm_resend(first, at=at(61))
    await service.on_delivery_failure(
        first.event_id,
        member,
        new_address,
        first.raw_event,
        550,
        "5.1.1",
        "550 5.1.1 gone",
        at=at(62),
    )
    assert [await service.confirm_resend(r, at=at(63)) for r in others] == [False, False]
    # Their leases ended: the next tick holds them at once, it sends nothing.
    assert (await service.tick(at(64))).resends == ()
    statuses = {(await store.eob(r.event_id))[0].status for r in others}  # type: ignore[index]
    assert statuses == {EobStatus.HELD_FOR_VERIFICATION}
    # A resend whose notice moved on (here: held) is not confirmed either.
    assert not await service.confirm_resend(others[0], at=at(65))


async def test_a_lost_release_is_handed_out_again(service: BounceService) -> None:
    member, address = ids()
    ev1, raw1 = event(member, 1)
    await hard_bounce(service, ev1, member, address, raw1)
    result = await service.on_verification_result(verified(member, address), at=at(60))
    assert [r.event_id for r in result.resends] == [ev1]
    # The worker died with the resend: nobody reports, the lease runs out.
    assert (await service.tick(at(60) + service.send_lease - dt.timedelta(seconds=1))).resends == ()
    again = await service.tick(at(60) + service.send_lease)
    assert [(r.event_id, r.to) for r in again.resends] == [(ev1, address)]
    assert (await service.tick(at(60) + service.send_lease)).resends == ()


async def test_a_lost_release_claimed_twice_is_handed_out_once(
    service: BounceService, store: BounceStore, publisher: RecordingPublisher
) -> None:
    # A tick fires its claims one after another; one that fires after its claim ran out
    # (slow publishes before it) found the row claimed again by another worker, and both
    # handed the notice out: two emails.
    member, address = ids()
    ev1, raw1 = event(member, 1)
    await hard_bounce(service, ev1, member, address, raw1)
    result = await service.on_verification_result(verified(member, address), at=at(60))
    assert [r.event_id for r in result.resends] == [ev1]
    lost = at(60) + service.send_lease  # nobody reported the resend
    first = await store.claim_timers(lost, limit=10, claim_for=service.claim_for)
    assert [c.eob_id for c in first] == [ev1]
    later = lost + service.claim_for + dt.timedelta(seconds=1)  # the first claim ran out
    other = make_service(store, publisher)
    second = await store.claim_timers(later, limit=10, claim_for=other.claim_for)
    assert [c.eob_id for c in second] == [ev1]
    late = await service._fire(first[0].kind, member, ev1, lost)
    assert late.resends == []
    fired = await other._fire(second[0].kind, member, ev1, later)
    assert [(r.event_id, r.to) for r in fired.resends] == [(ev1, address)]


async def test_dsn_hard_bounce_through_verp(
    service: BounceService, publisher: RecordingPublisher
) -> None:
    member, address = ids()
    ev1, _ = event(member, 1)
    assert await send_ok(service, ev1, member, address) == address
    await service.on_delivered(ev1, address, at=at(1))
    return_path = make_return_path(ev1, VERP, BOUNCE_DOMAIN)
    dsn = delivery_status_notification(
        behaviour=Behaviour.BOUNCE_LATER,
        reporting_mta="mx.example.com",
        return_path=return_path,
        recipient=address,
        returned_headers=f"Return-Path: <{return_path}>\r\nTo: {address}\r\n\r\n".encode(),
        arrival=at(1),
        queue_id="Q1",
    )
    report = await service.on_dsn(dsn, return_path, at=at(30))
    assert not report.needs_review
    assert [(r.event_id, r.category, r.outcome.outcome) for r in report.results] == [
        (ev1, BounceCategory.HARD_ADDRESS, Outcome.HELD)
    ]
    assert len(publisher.on(REQUESTS)) == 1
    # The reporting MTA retried (we answered 451, say): the same report changes nothing.
    again = await service.on_dsn(dsn, return_path, at=at(40))
    assert again.results[0].outcome.outcome is Outcome.HELD
    assert len(publisher.on(REQUESTS)) == 1
    released = await service.on_verification_result(verified(member, address), at=at(90))
    assert [(r.event_id, r.raw_event) for r in released.resends] == [
        (ev1, orjson.dumps({"event_id": ev1}))
    ]


def report_message(report_type: str, *parts: tuple[str, str]) -> bytes:
    """A multipart/report as an MTA sends it to a return path: (content type, body) parts."""
    body = "".join(f"--r\r\nContent-Type: {ctype}\r\n\r\n{text}\r\n" for ctype, text in parts)
    return (
        "From: MAILER-DAEMON@mx.example.com\r\nSubject: Undelivered Mail\r\n"
        f"MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type={report_type};"
        f' boundary="r"\r\n\r\n{body}--r--\r\n'
    ).encode()


async def delivered(service: BounceService) -> tuple[str, str, str, str]:
    """A notice sent and accepted: (member id, address, event id, its return path)."""
    member, address = ids()
    ev1, _ = event(member, 1)
    await send_ok(service, ev1, member, address)
    await service.on_delivered(ev1, address, at=at(1))
    return member, address, ev1, make_return_path(ev1, VERP, BOUNCE_DOMAIN)


async def test_a_dsn_naming_a_pipe_is_still_a_hard_bounce_by_its_status(
    service: BounceService, store: BounceStore
) -> None:
    # Final-Recipient names a local delivery program, not an address: the recipient comes
    # from the returned To:, but the reason is still the report's Status 5.1.1. Taken from
    # the prose alone it was "other", the address stayed live and the notice was resent.
    _, address, ev1, return_path = await delivered(service)
    dsn = report_message(
        "delivery-status",
        ("text/plain", "Your message could not be delivered."),
        (
            "message/delivery-status",
            "Reporting-MTA: dns; mx.example.com\r\n\r\n"
            "Final-Recipient: x-unix; |/usr/bin/procmail\r\nAction: failed\r\n"
            "Status: 5.1.1\r\nDiagnostic-Code: smtp; 550 5.1.1 user unknown",
        ),
        ("text/rfc822-headers", f"Return-Path: <{return_path}>\r\nTo: {address}"),
    )
    report = await service.on_dsn(dsn, return_path, at=at(30))
    assert [(r.event_id, r.category, r.outcome.outcome) for r in report.results] == [
        (ev1, BounceCategory.HARD_ADDRESS, Outcome.HELD)
    ]
    assert await store.is_suppressed(address)
    assert not (await service.tick(at(5 * 3600))).resends


async def test_header_mapped_report_for_another_address_is_ignored(
    service: BounceService, store: BounceStore
) -> None:
    member, address = ids()
    ev1, _ = event(member, 1)
    await send_ok(service, ev1, member, address)
    stranger = f"stranger-{address}"
    dsn = delivery_status_notification(
        behaviour=Behaviour.BOUNCE_LATER,
        reporting_mta="mx.example.com",
        return_path="bounces@bounce.test",
        recipient=stranger,
        returned_headers=f"X-EOB-Event-ID: {ev1}\r\n\r\n".encode(),
        arrival=at(1),
        queue_id="Q2",
    )
    report = await service.on_dsn(dsn, "bounces@bounce.test", at=at(5))
    assert report.inbound.event_id == ev1 and report.results == ()
    assert not await store.is_suppressed(stranger)
    assert report.review_reason is ReviewReason.NOT_ACTED_ON  # kept for a person, not lost


async def test_a_verp_report_naming_many_addresses_suppresses_none(
    service: BounceService, store: BounceStore
) -> None:
    # Our messages have one recipient. A report at a leaked return path listing others'
    # addresses must not suppress them (and hold their notices): a person looks instead.
    _, address, _, return_path = await delivered(service)
    victims = [f"victim{i}-{address}" for i in range(3)]
    blocks = "".join(
        f"\r\nFinal-Recipient: rfc822; {victim}\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        for victim in victims
    )
    forged = report_message(
        "delivery-status",
        ("text/plain", "Not delivered."),
        ("message/delivery-status", f"Reporting-MTA: dns; mx.example.com\r\n{blocks}"),
    )
    report = await service.on_dsn(forged, return_path, at=at(30))
    assert report.results == ()
    assert report.review_reason is ReviewReason.NOT_ACTED_ON
    assert [await store.is_suppressed(victim) for victim in victims] == [False] * 3
    assert not await store.is_suppressed(address)


async def test_a_complaint_about_a_notice_is_kept_for_review(service: BounceService) -> None:
    _, address, ev1, return_path = await delivered(service)
    arf = report_message(
        "feedback-report",
        ("text/plain", "A member marked this as spam."),
        ("message/feedback-report", "Feedback-Type: abuse\r\nUser-Agent: test/1.0\r\nVersion: 1"),
        ("text/rfc822-headers", f"Return-Path: <{return_path}>\r\nTo: {address}"),
    )
    report = await service.on_dsn(arf, return_path, at=at(30))
    assert report.inbound.event_id == ev1
    assert report.inbound.parsed.kind is BounceKind.FEEDBACK
    # Not a bounce (the notice stays delivered), but never answered 250 and forgotten.
    assert report.review_reason is ReviewReason.NOT_ACTED_ON


async def test_a_verp_report_for_a_forgotten_notice_suppresses_nothing(
    service: BounceService, store: BounceStore
) -> None:
    # A return path never expires, and once its notice is purged nothing says where the
    # notice went: a report at it used to suppress every address it listed (up to 100).
    member, address = ids()
    event_id = f"{member}-forgotten"
    return_path = make_return_path(event_id, VERP, BOUNCE_DOMAIN)
    others = [f"other{i}-{address}" for i in range(3)]
    blocks = "".join(
        f"\r\nFinal-Recipient: rfc822; {other}\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        for other in (address, *others)
    )
    dsn = report_message(
        "delivery-status",
        ("text/plain", "Not delivered."),
        ("message/delivery-status", f"Reporting-MTA: dns; mx.example.com\r\n{blocks}"),
    )
    report = await service.on_dsn(dsn, return_path, at=at(5))
    assert [r.outcome.reason for r in report.results] == [BounceReason.UNKNOWN_EVENT]
    assert report.review_reason is ReviewReason.UNKNOWN_EVENT  # a person looks instead
    assert [await store.is_suppressed(a) for a in (address, *others)] == [False] * 4
    ev2, raw2 = event(member, 2)
    assert isinstance(await service.gate(ev2, member, address, raw2, at=at(10)), SendPermitted)


async def test_a_report_at_a_known_return_path_acts_only_on_its_notices_address(
    service: BounceService, store: BounceStore
) -> None:
    # Anyone sent one notice knows its return path. A report quoting it in the returned
    # headers (at any bounce-shaped envelope address) and naming someone else's address
    # used to suppress that address: the victim's later notices were held, then paper.
    _, address, ev1, return_path = await delivered(service)
    victim_member, victim = ids()
    forged = report_message(
        "delivery-status",
        ("text/plain", "Not delivered."),
        (
            "message/delivery-status",
            "Reporting-MTA: dns; mx.example.com\r\n\r\n"
            f"Final-Recipient: rfc822; {victim}\r\nAction: failed\r\nStatus: 5.1.1\r\n",
        ),
        ("text/rfc822-headers", f"Return-Path: <{return_path}>\r\nTo: {address}"),
    )
    report = await service.on_dsn(forged, f"bounces+{'a' * 24}@{BOUNCE_DOMAIN}", at=at(30))
    assert report.inbound.event_id == ev1 and report.inbound.mapped_by is MappedBy.VERP
    assert report.results == () and report.review_reason is ReviewReason.NOT_ACTED_ON
    assert not await store.is_suppressed(victim) and not await store.is_suppressed(address)
    ev2, raw2 = event(victim_member, 1)
    gate = await service.gate(ev2, victim_member, victim, raw2, at=at(40))
    assert isinstance(gate, SendPermitted)
    # The notice's own address beside the victim's: that one acted on, the other kept for a
    # person (the report is not answered 250 and forgotten).
    both = forged.replace(
        f"Final-Recipient: rfc822; {victim}".encode(),
        f"Final-Recipient: rfc822; {address}\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        f"\r\nFinal-Recipient: rfc822; {victim}".encode(),
    )
    report = await service.on_dsn(both, return_path, at=at(50))
    assert [(r.event_id, r.outcome.outcome) for r in report.results] == [(ev1, Outcome.HELD)]
    assert report.review_reason is ReviewReason.NOT_ACTED_ON
    assert await store.is_suppressed(address) and not await store.is_suppressed(victim)


async def test_a_forged_report_over_smtp_is_kept_for_review_not_acted_on(
    service: BounceService, store: BounceStore, tmp_path: Path
) -> None:
    # The attack as it comes: over SMTP, to a bounce-shaped address the listener takes on
    # its shape alone, quoting the sender's own return path, naming a victim.
    _, address, _, return_path = await delivered(service)
    _, victim = ids()
    forged = report_message(
        "delivery-status",
        ("text/plain", "Not delivered."),
        (
            "message/delivery-status",
            "Reporting-MTA: dns; mx.example.com\r\n\r\n"
            f"Final-Recipient: rfc822; {victim}\r\nAction: failed\r\nStatus: 5.1.1\r\n",
        ),
        ("text/rfc822-headers", f"Return-Path: <{return_path}>\r\nTo: {address}"),
    )
    listener = BounceListener(
        service.on_dsn,
        host="127.0.0.1",
        port=0,
        bounce_domain=BOUNCE_DOMAIN,
        review_dir=tmp_path / "review",
    )
    async with listener, aiosmtplib.SMTP(hostname="127.0.0.1", port=listener.port) as smtp:
        await smtp.sendmail("", [f"bounces+{'a' * 24}@{BOUNCE_DOMAIN}"], forged)
    [kept] = (tmp_path / "review" / "new").iterdir()
    assert kept.read_bytes().startswith(b"X-EOB-Review-Reason: not_acted_on\r\n")
    assert not await store.is_suppressed(victim) and not await store.is_suppressed(address)


async def test_a_report_about_an_address_the_notice_has_left_is_kept_for_review(
    service: BounceService, store: BounceStore
) -> None:
    # Bounced at X, verified and released to Y: a report naming Z (an alias, a forgery:
    # not an address the store knows the notice went to) changes nothing.
    member, address = ids()
    ev1, raw1 = event(member, 1)
    await hard_bounce(service, ev1, member, address, raw1)
    new_address = f"new-{address}"
    await service.on_verification_result(verified(member, new_address), at=at(60))
    elsewhere = f"elsewhere-{address}"
    dsn = report_message(
        "delivery-status",
        ("text/plain", "Not delivered."),
        (
            "message/delivery-status",
            "Reporting-MTA: dns; mx.example.com\r\n\r\n"
            f"Final-Recipient: rfc822; {elsewhere}\r\nAction: failed\r\nStatus: 5.1.1\r\n",
        ),
    )
    report = await service.on_dsn(dsn, make_return_path(ev1, VERP, BOUNCE_DOMAIN), at=at(70))
    assert report.results == () and report.review_reason is ReviewReason.NOT_ACTED_ON
    assert not await store.is_suppressed(elsewhere)
    assert not await store.is_suppressed(new_address)


async def test_without_the_raw_event_a_release_goes_to_paper(
    store: BounceStore, publisher: RecordingPublisher
) -> None:
    service = make_service(store, publisher)
    service.payload_retention = dt.timedelta(0)  # keep raw events only of open failures
    member, address = ids()
    ev1, _ = event(member, 1)
    await send_ok(service, ev1, member, address)
    await service.on_delivered(ev1, address, at=at(1))
    assert ev1 not in await store.payload_ids()
    return_path = make_return_path(ev1, VERP, BOUNCE_DOMAIN)
    dsn = delivery_status_notification(
        behaviour=Behaviour.BOUNCE_LATER,
        reporting_mta="mx.example.com",
        return_path=return_path,
        recipient=address,
        returned_headers=b"\r\n",
        arrival=at(1),
        queue_id="Q4",
    )
    await service.on_dsn(dsn, return_path, at=at(30))
    result = await service.on_verification_result(verified(member, address), at=at(60))
    assert result.resends == ()
    assert [(o.event_id, o.reason) for o in result.outcomes] == [
        (ev1, BounceReason.PAYLOAD_UNAVAILABLE)
    ]
    assert [p["reason"] for p in publisher.on(PAPER)] == ["payload_unavailable"]


async def test_housekeeping_purges_settled_notices(
    service: BounceService, store: BounceStore
) -> None:
    member, address = ids()
    ev1, _ = event(member, 1)
    await send_ok(service, ev1, member, address)
    await service.on_delivered(ev1, address, at=at(1))
    assert ev1 in await store.payload_ids()
    # Rows are stamped with the wall clock's now (T0 is in the past of the test run's clock
    # only by chance), so purge relative to a time well after both.
    later = dt.datetime.now(dt.UTC) + service.row_retention + dt.timedelta(days=1)
    assert (await service.tick(later)).purged >= 2
    assert ev1 not in await store.payload_ids()
    assert await store.eob(ev1) is None


async def test_housekeeping_looks_again_only_at_notices_settled_since_it_last_purged(
    store: BounceStore, publisher: RecordingPublisher
) -> None:
    member, address = ids()
    ev1, _ = event(member, 1)
    ev2, _ = event(member, 2)
    service = make_service(store, publisher)
    await send_ok(service, ev1, member, address)
    await service.on_delivered(ev1, address, at=at(1))
    # Rows carry the wall clock's time: purge as if days had passed (rows stay 30 days).
    later = dt.datetime.now(dt.UTC) + service.payload_retention + dt.timedelta(days=1)
    await service.tick(later)
    assert ev1 not in await store.payload_ids()
    # A notice settled before the last purge's cutoff is not walked again...
    await send_ok(service, ev2, member, address)
    await service.on_delivered(ev2, address, at=at(2))
    await service.tick(later + service.housekeeping_every)
    assert ev2 in await store.payload_ids()
    # ...nor by another process (a worker started since): the store keeps the cutoff.
    restarted = make_service(store, publisher)
    await restarted.tick(later + service.housekeeping_every)
    assert ev2 in await store.payload_ids()
    # A notice stamped just before the cutoff (its transaction's time was taken before it
    # waited, or its worker's clock is behind) is looked at again all the same.
    ev3, _ = event(member, 3)
    await send_ok(restarted, ev3, member, address)
    cutoff = later + service.housekeeping_every - service.payload_retention
    await restarted.on_delivered(ev3, address, at=cutoff - PURGE_OVERLAP / 2)
    await restarted.tick(later + 2 * service.housekeeping_every)
    assert ev3 not in await store.payload_ids()


async def test_the_notices_gauge_counts_what_is_still_moving_down_to_zero(
    service: BounceService,
) -> None:
    def gauge(status: EobStatus) -> float | None:
        return REGISTRY.get_sample_value("eobblast_bounce_notices", {"status": str(status)})

    member, address = ids()
    ev1, raw1 = event(member, 1)
    await hard_bounce(service, ev1, member, address, raw1)
    await service.tick(at(10))
    assert gauge(EobStatus.HELD_FOR_VERIFICATION) == 1
    released = await service.on_verification_result(verified(member, address), at=at(20))
    await service.on_delivered(ev1, released.resends[0].to, at=at(30))
    await service.tick(at(10) + service.housekeeping_every)  # the next housekeeping
    assert gauge(EobStatus.HELD_FOR_VERIFICATION) == 0  # not the last count above zero
    assert gauge(EobStatus.DELIVERED) is None  # settled notices are not counted


# --------------------------------------------------------------------------- soft bounces


async def test_soft_bounce_retries_on_schedule_then_delivers(service: BounceService) -> None:
    member, address = ids()
    ev1, raw1 = event(member, 1)
    await send_ok(service, ev1, member, address)
    first = await service.on_delivery_failure(
        ev1, member, address, raw1, 451, "4.2.1", "451 4.2.1 Mailbox busy", at=at(0)
    )
    initial = service.policy.retry.initial_delay
    assert first.outcome is Outcome.DEFERRED and first.reason is BounceReason.RETRY_SCHEDULED
    assert first.retry_at == at(0) + initial
    assert (await service.tick(at(0) + initial - dt.timedelta(seconds=1))).resends == ()
    due = await service.tick(at(0) + initial)
    assert [(r.event_id, r.to, r.raw_event) for r in due.resends] == [(ev1, address, raw1)]
    assert due.resends[0].deliverable.attempt == 2
    assert (await service.tick(at(0) + initial)).resends == ()
    # Busy again: the next wait doubles (exponential backoff).
    second = await service.on_delivery_failure(
        ev1, member, address, raw1, 451, "4.2.1", "451 4.2.1 Mailbox busy", at=at(400)
    )
    assert second.retry_at == at(400) + initial * service.policy.retry.multiplier
    due = await service.tick(second.retry_at)
    assert [r.event_id for r in due.resends] == [ev1]
    done = await service.on_delivered(ev1, address, at=second.retry_at)
    assert done.outcome is Outcome.DELIVERED
    assert (await service.tick(at(86400))).resends == ()


async def test_soft_bounce_past_max_age_falls_back_to_paper(
    service: BounceService, publisher: RecordingPublisher
) -> None:
    member, address = ids()
    ev1, raw1 = event(member, 1)
    await send_ok(service, ev1, member, address)
    await service.on_delivery_failure(
        ev1, member, address, raw1, 452, "4.2.2", "452 4.2.2 Mailbox full", at=at(0)
    )
    late = at(0) + service.policy.retry.max_age + dt.timedelta(minutes=1)
    result = await service.tick(late)
    assert result.resends == ()
    assert [(o.event_id, o.reason) for o in result.outcomes] == [
        (ev1, BounceReason.RETRIES_EXHAUSTED)
    ]
    assert [p["reason"] for p in publisher.on(PAPER)] == ["retries_exhausted"]


CLAIM_SCRIPT = """
import asyncio, datetime as dt, json, sys
from eobblast.bounces.service import BounceService
from eobblast.bounces.store import open_bounce_store

class Quiet:
    async def publish(self, topic, key, value):
        pass

async def main():
    store = await open_bounce_store(sys.argv[1])
    service = BounceService(store, Quiet())
    now = dt.datetime.fromisoformat(sys.argv[2])
    taken = []
    for _ in range(20):
        result = await service.tick(now, limit=3)
        taken += [r.event_id for r in result.resends]
    await store.close()
    print(json.dumps(taken))

asyncio.run(main())
"""


async def test_due_retries_are_taken_exactly_once_by_concurrent_workers(
    service: BounceService, store_url: str
) -> None:
    member_ids = [ids() for _ in range(12)]
    expected = []
    for member, address in member_ids:
        ev, raw = event(member, 1)
        await send_ok(service, ev, member, address)
        await service.on_delivery_failure(
            ev, member, address, raw, 451, "4.3.0", "451 4.3.0 try later", at=at(0)
        )
        expected.append(ev)
    due = (at(0) + dt.timedelta(hours=1)).isoformat()
    # Two worker processes tick at once against the same store.
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", CLAIM_SCRIPT, store_url, due, stdout=subprocess.PIPE
        )
        for _ in range(2)
    ]
    outputs = [await asyncio.wait_for(p.communicate(), 60) for p in procs]
    taken = [ev for out, _ in outputs for ev in json.loads(out)]
    assert sorted(taken) == sorted(expected)


async def test_due_retries_are_taken_once_by_two_stores_in_one_loop(
    store_url: str, publisher: RecordingPublisher
) -> None:
    first = await open_bounce_store(store_url)
    second = await open_bounce_store(store_url)
    try:
        a, b = make_service(first, publisher), make_service(second, publisher)
        expected = []
        for _ in range(10):
            member, address = ids()
            ev, raw = event(member, 1)
            await send_ok(a, ev, member, address)
            await a.on_delivery_failure(
                ev, member, address, raw, 421, "4.7.0", "421 try later", at=at(0)
            )
            expected.append(ev)
        now = at(3600)
        results = await asyncio.gather(*(s.tick(now, limit=2) for s in (a, b, a, b, a, b)))
        more = await asyncio.gather(*(s.tick(now) for s in (a, b)))
        taken = [r.event_id for result in (*results, *more) for r in result.resends]
        assert sorted(taken) == sorted(expected)
    finally:
        await first.close()
        await second.close()


# --------------------------------------------------------------------------- durability


async def test_state_survives_reopening_the_store(
    store_url: str, publisher: RecordingPublisher
) -> None:
    member, address = ids()
    ev1, raw1 = event(member, 1)
    first = await open_bounce_store(store_url)
    await hard_bounce(make_service(first, publisher), ev1, member, address, raw1)
    await first.close()

    second = await open_bounce_store(store_url)
    try:
        service = make_service(second, publisher)
        ev2, raw2 = event(member, 2)
        assert isinstance(await service.gate(ev2, member, address, raw2, at=at(10)), Held)
        result = await service.on_verification_result(verified(member, address), at=at(20))
        assert {(r.event_id, r.raw_event) for r in result.resends} == {(ev1, raw1), (ev2, raw2)}
    finally:
        await second.close()


@pytest.mark.parametrize(
    ("event_id", "prefix"),
    [
        ("CLAIMS-2026-11-" + "7" * 30, "bounces"),  # too long for any token
        ("eob-claims-2026-zzzzzzzz", "eob-returns-2026"),  # too long beside a long prefix
    ],
)
async def test_a_dsn_for_an_id_carried_by_reference_maps_to_its_notice(
    store: BounceStore, publisher: RecordingPublisher, event_id: str, prefix: str
) -> None:
    service = BounceService(
        store, publisher, verp_keys=[VERP], bounce_domain=BOUNCE_DOMAIN, verp_prefix=prefix
    )
    member, address = ids()
    await send_ok(service, event_id, member, address)
    await service.on_delivered(event_id, address, at=at(1))
    return_path = service.return_path(event_id)
    token = read_return_path(return_path, [VERP], bounce_domain=BOUNCE_DOMAIN, prefix=prefix)
    assert token is not None and token.kind is TokenKind.REF
    dsn = delivery_status_notification(
        behaviour=Behaviour.BOUNCE_LATER,
        reporting_mta="mx.example.com",
        return_path=return_path,
        recipient=address,
        returned_headers=f"Return-Path: <{return_path}>\r\nTo: {address}\r\n\r\n".encode(),
        arrival=at(1),
        queue_id="Q1",
    )
    report = await service.on_dsn(dsn, return_path, at=at(30))
    assert [(r.event_id, r.outcome.outcome) for r in report.results] == [(event_id, Outcome.HELD)]


# What the previous release indexed bounce_eobs by: every row in every index, status included.
EARLIER_INDEXES = {
    "bounce_eobs_member": "(member_id, status)",
    "bounce_eobs_due": "(status, next_at)",
    "bounce_eobs_lease": "(status, lease_until)",
    "bounce_eobs_address": "(address_key, status)",
    "bounce_eobs_ref": "(ref)",
    "bounce_eobs_updated": "(status, updated_at)",
}
PARTIAL_INDEXES = {
    "bounce_eobs_active_member",
    "bounce_eobs_retry_due",
    "bounce_eobs_retry_address",
    "bounce_eobs_sent_lease",
    "bounce_eobs_long_ref",
    "bounce_eobs_settled",
}


async def _sql(store_url: str, statement: str) -> list[tuple[Any, ...]]:
    """One statement on a connection of its own (what an older release left behind)."""
    if store_url.startswith("sqlite:///"):
        with contextlib.closing(sqlite3.connect(store_url.removeprefix("sqlite:///"))) as db:
            rows = db.execute(statement).fetchall()
            db.commit()
            return rows
    async with await psycopg.AsyncConnection.connect(store_url, autocommit=True) as conn:
        cur = await conn.execute(statement)
        return await cur.fetchall() if cur.description else []


async def _bounce_eobs_indexes(store_url: str) -> set[str]:
    query = (
        "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'bounce_eobs'"
        if store_url.startswith("sqlite:///")
        else "SELECT indexname FROM pg_indexes WHERE tablename = 'bounce_eobs'"
        " AND schemaname = current_schema()"
    )
    return {str(row[0]) for row in await _sql(store_url, query)} - {
        "sqlite_autoindex_bounce_eobs_1",
        "bounce_eobs_pkey",
    }


async def test_a_store_of_the_previous_release_moves_to_partial_indexes(
    store_url: str, publisher: RecordingPublisher
) -> None:
    long_id = "CLAIMS-2026-11-" + "8" * 30
    member, address = ids()
    retrying, _ = ids()
    ev_retry, raw_retry = event(retrying, 1)
    first = await open_bounce_store(store_url)
    service = make_service(first, publisher)
    await send_ok(service, long_id, member, address)
    await service.on_delivered(long_id, address, at=at(1))
    await send_ok(service, ev_retry, retrying, address)
    deferred = await service.on_delivery_failure(
        ev_retry, retrying, address, raw_retry, 451, "4.2.1", "451 4.2.1 Mailbox busy", at=at(2)
    )
    await first.close()
    # Put the store back as the previous release had it: its indexes, a reference per row.
    for name in PARTIAL_INDEXES:
        await _sql(store_url, f"DROP INDEX {name}")
    for name, columns in EARLIER_INDEXES.items():
        await _sql(store_url, f"CREATE INDEX {name} ON bounce_eobs {columns}")
    await _sql(
        store_url,
        f"UPDATE bounce_eobs SET ref = '{event_reference(ev_retry)}' WHERE eob_id = '{ev_retry}'",
    )

    second = await open_bounce_store(store_url)
    try:
        # On PostgreSQL the partial indexes are built in the background, CONCURRENTLY, and
        # the earlier ones dropped once they are valid; the store works meanwhile.
        deadline = time.monotonic() + 30
        while await _bounce_eobs_indexes(store_url) != PARTIAL_INDEXES:
            assert time.monotonic() < deadline, await _bounce_eobs_indexes(store_url)
            await asyncio.sleep(0.05)
        service = make_service(second, publisher)
        # Everything is still found: the retry by its due time, the long id by reference.
        assert deferred.retry_at is not None
        due = await service.tick(deferred.retry_at)
        assert [r.event_id for r in due.resends] == [ev_retry]
        assert await second.resolve_reference(event_reference(long_id)) == long_id
        assert await second.resolve_reference(event_reference(ev_retry)) == ev_retry
        assert await second.status_counts() == {
            EobStatus.DELIVERED: 1,
            EobStatus.SENDING: 1,  # the retry, handed out
        }
    finally:
        await second.close()


async def test_a_postgresql_purge_joins_the_payloads_once(pg_url: str) -> None:
    """Rows without a raw event left: a NOT IN over the payloads could not be hashed once
    they outgrew work_mem, and PostgreSQL read them again for every candidate row (16.9 s
    for 999 rows at 194,000 payloads, under the store's lock)."""
    store = await open_bounce_store(pg_url)
    await store.close()
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        await conn.execute("SET work_mem = '64kB'")
        cur = await conn.execute("EXPLAIN " + PURGE_ROWS.replace("?", "0"))
        plan = "\n".join(str(row[0]) for row in await cur.fetchall())
    assert "Anti Join" in plan and "SubPlan" not in plan, plan


async def test_a_postgresql_store_opens_while_another_worker_writes(pg_url: str) -> None:
    # CREATE INDEX IF NOT EXISTS takes a lock that waits for every open write on the table,
    # even when the index exists: a starting worker stalled behind a long transaction, and
    # every other worker's writes queued behind it.
    store = await open_bounce_store(pg_url)
    await store.close()
    async with await psycopg.AsyncConnection.connect(pg_url) as writer:
        async with writer.transaction():
            await writer.execute("UPDATE bounce_eobs SET attempt = attempt WHERE false")
            await writer.execute("LOCK TABLE bounce_eobs IN ROW EXCLUSIVE MODE")
            opened = await asyncio.wait_for(open_bounce_store(pg_url), 10)
            await opened.close()


async def test_postgresql_transactions_over_a_member_or_an_address_wait_for_each_other(
    pg_url: str,
) -> None:
    # Two workers' stores: a transaction over a member (or an address) another holds waits
    # for it to end; one over others does not. Its locks are taken in one round trip.
    first, second = await open_bounce_store(pg_url), await open_bounce_store(pg_url)
    now = dt.datetime.now(dt.UTC)
    try:
        for members, keys in ((["m-2"], ["a-9"]), (["m-9"], ["a-1"])):
            async with first.transaction(["m-1", "m-2"], now, address_keys=["a-1"]):
                async with asyncio.timeout(10):
                    async with second.transaction(["m-3"], now, address_keys=["a-2"]):
                        pass  # nothing in common: not held up
                waiting = asyncio.create_task(_enter(second, members, keys, now))
                await asyncio.sleep(0.5)
                assert not waiting.done()  # held by the first transaction's lock
            async with asyncio.timeout(10):
                await waiting  # taken once the first committed
    finally:
        await first.close()
        await second.close()


async def test_a_postgresql_transaction_behind_a_stuck_one_gives_up_as_busy(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A transaction whose worker is gone held its members' locks until the server noticed
    # (hours), and the next transaction over one of them waited as long, with its store
    # held. It now waits LOCK_TIMEOUT and is busy (run again), as a lost deadlock race is.
    monkeypatch.setattr(postgres, "LOCK_TIMEOUT", "1s")
    first, second = await open_bounce_store(pg_url), await open_bounce_store(pg_url)
    now = dt.datetime.now(dt.UTC)
    try:
        async with first.transaction(["m-1"], now, address_keys=["a-1"]):
            started = time.monotonic()
            async with asyncio.timeout(10):
                with pytest.raises(StoreBusy):
                    await _enter(second, ["m-2", "m-1"], [], now)
            assert time.monotonic() - started < 3
        await _enter(second, ["m-2", "m-1"], [], now)
    finally:
        await first.close()
        await second.close()


async def _enter(
    store: BounceStore, members: Sequence[str], keys: Sequence[str], now: dt.datetime
) -> None:
    async with store.transaction(members, now, address_keys=keys):
        pass


async def test_postgresql_transactions_over_members_whose_locks_collide_do_not_deadlock(
    pg_url: str,
) -> None:
    # A member's lock is (namespace, hashtext(member id)): two ids can share one (400,000
    # ids hold a dozen such pairs). Taken in the ids' order, two transactions over the ids
    # of two colliding pairs took the two locks in opposite orders and deadlocked.
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT array_agg(m ORDER BY m) FROM (SELECT 'member-' || g AS m"
            " FROM generate_series(1, 400000) AS g) AS ids GROUP BY hashtext(m)"
            " HAVING count(*) = 2"
        )
        pairs = [row[0] for row in await cur.fetchall()]
    # p's ids sort before q's in one transaction, after them in the other; `between` sorts
    # between the first transaction's two, and holds it after it took its first lock.
    p, q = next((p, q) for p in pairs for q in pairs if p[0] < q[0] and q[1] < p[1])
    between = p[0] + "-"
    assert p[0] < between < q[0]
    stores = [await open_bounce_store(pg_url) for _ in range(3)]
    now = dt.datetime.now(dt.UTC)
    try:
        async with stores[0].transaction([between], now):
            first = asyncio.create_task(_enter(stores[1], [p[0], between, q[0]], (), now))
            await asyncio.sleep(0.3)
            second = asyncio.create_task(_enter(stores[2], [p[1], q[1]], (), now))
            await asyncio.sleep(0.3)
        async with asyncio.timeout(10):
            await asyncio.gather(first, second)  # was StoreBusy (deadlock) for one of them
    finally:
        for store in stores:
            await store.close()


async def test_no_statement_of_the_store_scans_the_notices(
    tmp_path: Path, publisher: RecordingPublisher
) -> None:
    """Rows of settled notices stay for weeks: every lookup must go through an index (one
    that matches its literal status terms), or it slows down as the table grows."""
    path = tmp_path / "bounces.db"
    store = await open_bounce_store(f"sqlite:///{path}")
    statements: list[tuple[str, Sequence[Any]]] = []
    runner = store._sql()

    def recorded(name: str) -> Callable[..., Awaitable[Any]]:
        original = getattr(runner, name)

        async def record(sql: str, args: Sequence[Any] = ()) -> Any:
            first = args[0] if name == "many" and args else args
            statements.append((sql, first))
            return await original(sql, args)

        return record

    for name in ("all", "run", "many"):
        setattr(runner, name, recorded(name))
    service = make_service(store, publisher)
    try:
        member, address = ids()
        ev1, _ = event(member, 1)
        ev2, raw2 = event(member, 2)
        await send_ok(service, ev1, member, address)
        await service.on_delivered(ev1, address, member_id=member, at=at(1))
        await send_ok(service, ev2, member, address)
        await service.on_delivery_failure(
            ev2, member, address, raw2, 451, "4.2.1", "451 4.2.1 Mailbox busy", at=at(2)
        )
        await service.tick(at(86400))
        ev3, raw3 = event(member, 3)
        await hard_bounce(service, ev3, member, address, raw3)
        await service.on_verification_result(verified(member, address), at=at(90000))
        await service.store.members_retrying_at([address_key(address)])
        await service.store.resolve_reference(event_reference(ev1))
        await service.tick(dt.datetime.now(dt.UTC) + dt.timedelta(days=90))
    finally:
        await store.close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        scans = set()
        for sql, args in statements:
            for row in db.execute(f"EXPLAIN QUERY PLAN {sql}", args):
                if re.fullmatch(r"SCAN bounce_(eobs|members)", row[3]):
                    scans.add(sql)
    assert len(statements) > 20
    assert scans == set()


async def test_records_committed_but_not_published_go_out_on_tick(
    service: BounceService, publisher: RecordingPublisher
) -> None:
    member, address = ids()
    ev1, raw1 = event(member, 1)
    publisher.failing = True
    service.outbox_claim = 0.0  # the failing publisher's claim runs out at once
    await hard_bounce(service, ev1, member, address, raw1)
    assert publisher.records == []
    publisher.failing = False
    await service.tick(at(5))
    assert [r["member_id"] for r in publisher.on(REQUESTS)] == [member]
    await service.tick(at(6))
    assert len(publisher.on(REQUESTS)) == 1


async def test_a_topic_that_refuses_records_does_not_hold_back_the_other_topics(
    service: BounceService, publisher: RecordingPublisher
) -> None:
    # A verification request and a paper fallback wait in the outbox (the broker was
    # away). Once it is back, the requests' topic still refuses them (an ACL, say): the
    # paper fallback goes out all the same, and the request once its topic takes it.
    member, address = ids()
    ev1, raw1 = event(member, 1)
    publisher.failing = True
    service.outbox_claim = 0.0  # the failing publisher's claim runs out at once
    await hard_bounce(service, ev1, member, address, raw1)
    failed = AddressVerificationFailed(member_id=member, reason=FailureReason.NO_ANSWER, at=at(60))
    await service.on_verification_result(failed, at=at(60))
    assert publisher.records == []
    # A failure that is not the topic's stops them all: the next would wait as long.
    for trouble in ("failing", "slow"):
        setattr(publisher, trouble, True)
        tried = publisher.attempts
        assert (await service.tick(at(61))).published == 0
        assert publisher.attempts == tried + 1
        setattr(publisher, trouble, False)
    publisher.refused = {REQUESTS}
    assert (await service.tick(at(61))).published == 1
    assert [p["event_id"] for p in publisher.on(PAPER)] == [ev1]
    assert publisher.on(REQUESTS) == []
    publisher.refused = set()
    assert (await service.tick(at(62))).published == 1
    assert [r["member_id"] for r in publisher.on(REQUESTS)] == [member]
    assert len(publisher.on(PAPER)) == 1


async def test_a_record_its_topic_refuses_holds_back_only_its_own_key(
    service: BounceService, publisher: RecordingPublisher
) -> None:
    # Two members' verification requests wait in the outbox (the broker was away). The
    # topic then refuses the first one's record for itself (too large, say): the second
    # member's request must not wait behind it for good.
    first, first_address = ids()
    second, second_address = ids()
    publisher.failing = True
    service.outbox_claim = 0.0  # the failing publisher's claim runs out at once
    for member, address in ((first, first_address), (second, second_address)):
        ev, raw = event(member, 1)
        await hard_bounce(service, ev, member, address, raw)
    assert publisher.records == []
    publisher.failing = False
    publisher.too_large = {first.encode()}
    assert (await service.tick(at(5))).published == 1
    assert [r["member_id"] for r in publisher.on(REQUESTS)] == [second]
    # Still in the outbox, in its place: out once the topic takes it.
    publisher.too_large = set()
    assert (await service.tick(at(6))).published == 1
    assert [r["member_id"] for r in publisher.on(REQUESTS)] == [second, first]


async def test_records_of_a_refused_key_stay_in_order_behind_it(
    service: BounceService, publisher: RecordingPublisher
) -> None:
    # One round, one topic: the first record of key "a" is refused for itself (too large).
    # The later record of "a", which the topic would take, must not overtake it; "b" goes
    # on.
    round_ = [
        (seq, OutboxMessage(REQUESTS, key, value))
        for seq, key, value in ((1, b"a", b"a1"), (2, b"b", b"b1"), (3, b"a", b"a2"))
    ]
    publisher.too_large_values = {b"a1"}
    assert await service._publish(round_) == 1
    assert publisher.records == [(REQUESTS, b"b", b"b1")]


async def test_a_redelivered_event_whose_sender_died_is_routed_again(
    service: BounceService,
) -> None:
    member, address = ids()
    ev1, raw1 = event(member, 1)
    first = await service.gate(ev1, member, address, raw1, at=T0)
    assert isinstance(first, SendPermitted)
    # Kafka redelivers it to another worker (the first died before any report).
    second = await service.gate(ev1, member, address, raw1, at=at(30))
    assert isinstance(second, SendPermitted) and second.deliverable.attempt == 2
    await service.on_delivered(ev1, address, at=at(31))
    third = await service.gate(ev1, member, address, raw1, at=at(40))
    assert isinstance(third, Settled) and third.outcome.outcome is Outcome.DELIVERED


def test_schemas_export() -> None:
    for export in (
        verification_request_json_schema,
        verification_result_json_schema,
        paper_fallback_json_schema,
    ):
        schema = export()
        assert schema["$schema"].endswith("2020-12/schema")
        assert schema["$id"].startswith("https://eobblast.dev/schemas/")
    result = verification_result_json_schema()
    assert "email" not in result["$defs"]["VerificationChannel"]["enum"]


# --------------------------------------------------------------------------- group commit


def _metric(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


async def test_concurrent_gates_share_transactions_and_decide_as_alone(
    service: BounceService,
) -> None:
    # One member hard-bounced earlier: its next notice must be held even inside a batch.
    bounced, bounced_address = ids()
    first_id, first_raw = event(bounced, 0)
    await hard_bounce(service, first_id, bounced, bounced_address, first_raw)
    members = [ids() for _ in range(20)]
    calls = [(member, address, *event(member, n)) for member, address in members for n in (1, 2)]
    held_id, held_raw = event(bounced, 1)
    shared_before = _metric("eobblast_bounce_store_batches_total", {"kind": "shared"})

    gates = await asyncio.gather(
        *(service.gate(eid, m, a, raw, at=T0) for m, a, eid, raw in calls),
        service.gate(held_id, bounced, bounced_address, held_raw, at=T0),
    )

    assert _metric("eobblast_bounce_store_batches_total", {"kind": "shared"}) > shared_before
    *sent, held = gates
    assert all(isinstance(g, SendPermitted) for g in sent)
    assert [g.to for g in sent if isinstance(g, SendPermitted)] == [a for _, a, _, _ in calls]
    assert isinstance(held, Held) and held.event_id == held_id
    outcomes = await asyncio.gather(
        *(service.on_delivered(eid, a, at=at(1)) for _, a, eid, _ in calls)
    )
    assert {o.outcome for o in outcomes} == {Outcome.DELIVERED}
    # Settled once: a redelivered event is answered from the store, not sent again.
    again = await asyncio.gather(
        *(service.gate(eid, m, a, raw, at=at(2)) for m, a, eid, raw in calls)
    )
    assert all(isinstance(g, Settled) and g.outcome.outcome is Outcome.DELIVERED for g in again)


async def test_one_failing_call_does_not_fail_the_calls_it_was_batched_with(
    service: BounceService,
) -> None:
    members = [ids() for _ in range(6)]

    async def broken(work: object) -> object:
        raise LookupError("this caller's own failure")

    split_before = _metric("eobblast_bounce_store_batches_total", {"kind": "split"})
    results = await asyncio.gather(
        *(service.gate(*event(m, 1)[:1], m, a, event(m, 1)[1], at=T0) for m, a in members[:3]),
        service._grouped(T0, broken, member_ids=["M-broken"]),
        *(service.gate(*event(m, 1)[:1], m, a, event(m, 1)[1], at=T0) for m, a in members[3:]),
        return_exceptions=True,
    )
    assert _metric("eobblast_bounce_store_batches_total", {"kind": "split"}) > split_before
    failure = results.pop(3)
    assert isinstance(failure, LookupError)
    assert all(isinstance(g, SendPermitted) for g in results)
    # The shared attempt was rolled back: each rerun alone found its notice new (attempt 1).
    assert all(isinstance(g, SendPermitted) and g.deliverable.attempt == 1 for g in results)


async def test_raw_events_kept_before_zstd_still_read(tmp_path: Path) -> None:
    # Stores written by earlier versions hold zlib; new notices are kept as zstd frames.
    path = tmp_path / "bounces.db"
    store = await open_bounce_store(f"sqlite:///{path}")
    try:
        service = make_service(store, RecordingPublisher())
        member, address = ids()
        ev1, _ = event(member, 1)
        await send_ok(service, ev1, member, address)  # keeps {"event_id": ev1}
        ev0, raw0 = event(member, 0)
        with sqlite3.connect(path) as db:
            db.execute(
                "INSERT INTO bounce_payloads (eob_id, member_id, raw, stored_at)"
                " VALUES (?, ?, ?, 0)",
                (ev0, member, zlib.compress(raw0, 1)),
            )
            (kept,) = db.execute(
                "SELECT raw FROM bounce_payloads WHERE eob_id = ?", (ev1,)
            ).fetchone()
        assert bytes(kept).startswith(b"\x28\xb5\x2f\xfd")  # zstd's frame magic
        async with store.transaction({member}, dt.datetime.now(dt.UTC)) as tx:
            kept_now = await tx.payloads([ev0, ev1])
        assert kept_now == {ev0: raw0, ev1: orjson.dumps({"event_id": ev1})}
    finally:
        await store.close()


class _GoneTrail:
    """An audit trail whose database is gone: every append fails."""

    async def append(self, record: object) -> None:
        raise AuditError("audit database unavailable")


async def test_an_audit_record_the_bounce_service_cannot_write_is_counted(
    store: BounceStore,
) -> None:
    # It was only logged: a hard bounce's incident, a hold, a release or a paper fallback
    # missing from the trail paged nobody, where the workers' and the portal's gaps do.
    service = make_service(store, RecordingPublisher(), cast(AuditTrail, _GoneTrail()))
    gaps = REGISTRY.get_sample_value("eobblast_audit_write_failures_total") or 0.0
    member, address = ids()
    ev, raw = event(member, 1)
    await hard_bounce(service, ev, member, address, raw)  # handled all the same
    assert (REGISTRY.get_sample_value("eobblast_audit_write_failures_total") or 0.0) > gaps


async def test_raw_events_are_sealed_at_rest_and_earlier_ones_still_read(
    store: BounceStore, caplog: pytest.LogCaptureFixture
) -> None:
    # The raw events kept for resends (names, addresses, claim amounts) were only
    # compressed: anyone who could read the table or a backup read the PHI.
    store.sealer = KeyRing({"k1": os.urandom(32)}, "k1")
    service = make_service(store, RecordingPublisher())
    member, address = ids()
    ev1, raw1 = event(member, 1)
    gate = await service.gate(ev1, member, address, raw1, at=T0)
    assert isinstance(gate, SendPermitted)
    [(kept,)] = await store._read("SELECT raw FROM bounce_payloads WHERE eob_id = ?", [ev1])
    kept = bytes(kept)
    assert kept[:1] == b"\x01" and member.encode() not in kept
    with pytest.raises(zstandard.ZstdError):
        zstandard.ZstdDecompressor().decompress(kept)
    # A row kept before sealing (a zstd frame) still reads beside a sealed one.
    ev0, raw0 = event(member, 0)
    store.sealer, sealer = None, store.sealer
    async with store.transaction({member}, T0) as tx:
        await tx.put_payload(ev0, member, raw0)
    store.sealer = sealer
    async with store.transaction({member}, T0) as tx:
        assert await tx.payloads([ev0, ev1]) == {ev0: raw0, ev1: raw1}
    # Another host's key ring cannot open it: left out (its notice goes to paper), logged
    # by event id, never sent from here.
    store.sealer = KeyRing({"k1": os.urandom(32)}, "k1")
    with caplog.at_level(logging.ERROR, logger="eobblast.bounces"):
        async with store.transaction({member}, T0) as tx:
            assert await tx.payloads([ev0, ev1]) == {ev0: raw0}
    [logged] = [r for r in caplog.records if r.name == "eobblast.bounces"]
    assert logged.getMessage() == "kept raw event cannot be opened"
    assert getattr(logged, "event_id", None) == ev1


async def test_a_load_finds_named_notices_and_their_members_active_ones(
    store: BounceStore,
) -> None:
    # More ids than one statement takes: named notices whatever their status, every active
    # notice of the named members (not their settled ones), and those of a member reached
    # only through a named notice of its own.
    count = 1_100
    members = [f"{ids()[0]}-{n}" for n in range(count)]

    def notice(member_id: str, suffix: str, status: EobStatus) -> Eob:
        return Eob(f"{member_id}-{suffix}", member_id, f"{member_id}@example.com", status, T0)

    named = {m: notice(m, "named", EobStatus.DELIVERED) for m in members}
    active = {m: notice(m, "active", EobStatus.RETRY_SCHEDULED) for m in members}
    settled = {m: notice(m, "settled", EobStatus.PAPER_FALLBACK) for m in members}
    stranger = notice(ids()[0], "active", EobStatus.SENDING)
    written = [*named.values(), *active.values(), *settled.values(), stranger]
    async with store.transaction(set(members), T0) as tx:
        await tx.save(
            Slice(BounceBook(), MappingProxyType({})),
            BounceBook(eobs=MappingProxyType({e.eob_id: e for e in written})),
            {},
        )

    unnamed = members[-1]
    async with store.transaction(set(members), T0) as tx:
        loaded = await tx.load(member_ids=members[:-1], eob_ids=[e.eob_id for e in named.values()])

    expected = [*named.values(), *active.values()]
    assert dict(loaded.book.eobs) == {e.eob_id: e for e in expected}
    assert loaded.member_ids == set(members)
    assert active[unnamed].eob_id in loaded.book.eobs


async def test_a_delivery_record_with_a_wrong_member_hint_still_finds_the_notice(
    service: BounceService,
) -> None:
    # The member id only spares a lookup: the notice's own member is locked in the end.
    member, address = ids()
    ev1, _ = event(member, 1)
    to = await send_ok(service, ev1, member, address)
    other, _ = ids()
    outcome = await service.on_delivered(ev1, to, member_id=other, at=at(1))
    assert outcome.outcome is Outcome.DELIVERED


def rotated_config(tmp_path: Path, **bounces: Any) -> Config:
    return load_config(
        environ={},
        overrides={
            "bounces": {
                "store_url": f"sqlite:///{tmp_path / 'bounces.db'}",
                "bounce_domain": BOUNCE_DOMAIN,
                "verp_key_file": str(tmp_path / "verp-2.key"),
                "verp_key_id": 2,
                **bounces,
            }
        },
    )


async def test_after_a_key_rotation_mail_signed_with_the_old_key_still_maps(
    tmp_path: Path,
) -> None:
    # A bounce comes up to 5 days after the send: the key that signed its return path must
    # still open it after the next key took over.
    old_file = tmp_path / "verp-1.key"
    old_key = VerpKey(1, load_or_create_secret(old_file))
    config = rotated_config(tmp_path, verp_previous_keys=[f"1:{old_file}"])
    service = await open_bounces(
        config, ProtectionServices.policy_only(config), RecordingPublisher(), actor="t"
    )
    try:
        member, address = ids()
        ev1, _ = event(member, 1)
        await send_ok(service, ev1, member, address)
        await service.on_delivered(ev1, address, at=at(1))
        signed_before = make_return_path(ev1, old_key, BOUNCE_DOMAIN)
        assert service.return_path(ev1) != signed_before  # new mail: the new key
        dsn = delivery_status_notification(
            behaviour=Behaviour.BOUNCE_LATER,
            reporting_mta="mx.example.com",
            return_path=signed_before,
            recipient=address,
            returned_headers=f"To: {address}\r\n\r\n".encode(),
            arrival=at(1),
            queue_id="Q9",
        )
        report = await service.on_dsn(dsn, signed_before, at=at(30))
    finally:
        await service.store.close()
    assert report.inbound.mapped_by is MappedBy.VERP
    assert [(r.event_id, r.category) for r in report.results] == [
        (ev1, BounceCategory.HARD_ADDRESS)
    ]


async def test_previous_verp_keys_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match='"ID:FILE"'):
        rotated_config(tmp_path, verp_previous_keys=["verp-1.key"])
    with pytest.raises(ConfigError, match="an id of its own"):
        rotated_config(tmp_path, verp_previous_keys=[f"2:{tmp_path / 'x.key'}"])
    # A previous key that is not there is an error, never a fresh key that opens nothing.
    missing = rotated_config(tmp_path, verp_previous_keys=[f"1:{tmp_path / 'gone.key'}"])
    with pytest.raises(ConfigError, match="does not exist"):
        await open_bounces(
            missing, ProtectionServices.policy_only(missing), RecordingPublisher(), actor="t"
        )
    assert not (tmp_path / "gone.key").exists()


# --------------------------------------------------------------------------- postponed


async def test_a_send_shaping_held_back_is_sent_again_when_the_shaper_said(
    service: BounceService, audit: AuditTrail
) -> None:
    # No budget left this hour: the notice waits for the next one, counted as postponed,
    # with no bounce recorded against the address or in the trail.
    member, address = ids()
    ev1, raw1 = event(member, 1)
    postponed = REGISTRY.get_sample_value("eobblast_bounce_postponed_total") or 0.0
    soft = REGISTRY.get_sample_value(
        "eobblast_bounces_total", {"category": "soft", "provider": "other", "source": "sync"}
    )
    await send_ok(service, ev1, member, address)
    until = at(3000)
    outcome = await service.on_postponed(ev1, member, address, raw1, until, at=at(5))
    assert (outcome.outcome, outcome.reason) == (Outcome.DEFERRED, BounceReason.RETRY_SCHEDULED)
    assert outcome.retry_at == until and outcome.category is None
    assert REGISTRY.get_sample_value("eobblast_bounce_postponed_total") == postponed + 1
    assert (
        REGISTRY.get_sample_value(
            "eobblast_bounces_total", {"category": "soft", "provider": "other", "source": "sync"}
        )
        == soft
    )
    assert [r.action for r in await audit.records(ev1)] == []
    assert (await service.tick(until - dt.timedelta(seconds=1))).resends == ()
    (resend,) = (await service.tick(until)).resends
    assert (resend.event_id, resend.deliverable.to, resend.raw_event) == (ev1, address, raw1)
    await service.on_delivered(ev1, address, at=until)
    assert (await service.tick(until + service.send_lease * 2)).resends == ()


async def test_a_notice_held_back_past_its_age_limit_goes_to_paper(
    service: BounceService, publisher: RecordingPublisher
) -> None:
    member, address = ids()
    ev1, raw1 = event(member, 1)
    await send_ok(service, ev1, member, address)
    too_late = T0 + service.policy.retry.max_age + dt.timedelta(hours=1)
    outcome = await service.on_postponed(ev1, member, address, raw1, too_late, at=at(5))
    assert (outcome.outcome, outcome.reason) == (Outcome.FALLBACK, BounceReason.RETRIES_EXHAUSTED)
    (paper,) = [p for p in publisher.on("eob.paper-fallback") if p["event_id"] == ev1]
    assert paper["reason"] == "retries_exhausted"

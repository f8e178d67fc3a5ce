"""The dead-letter topic for operators: what is parked and why, and sending chosen records
back to the input topic once what rejected them is fixed.

A dead letter holds the original bytes and key: PHI and a member id. Nothing here prints,
logs or returns them to a caller: a listing shows the reason, the field, the event id, where
the record was read, its size and SHA-256. A replayed record goes back to the input topic as the
claims system published it, under the same key (the member id), with a header naming the
dead letter it came from: it lands after the member's later notices. The send ledger keeps
an event delivered meanwhile under the same event id, within its retention, from being
sent twice.

Given a `Check` (the workers' validation under the configuration at hand), an original that
it still refuses is not replayable (`still_refused`, with the reason code it gets now): sent
back, it would only be parked again.

The workers park more than input events there: an address-verification result they could
not read is parked too, its `source` naming the results topic. Such an original is no
`eob.issued/v1` event, and is never sent to the input topic (`other_topic`): the claims
system answers again on the results topic.

A replay sends PHI on its way again at someone's say-so: given a `ReplayAudit`, each
original the broker acknowledged is recorded in the audit trail (`dlq_replayed`: who ran
it, the event id, the opaque member reference, the reason it was parked, its position).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import datetime as dt
from collections import Counter
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import pydantic

from eobblast.events.schema import Rejection, validate_event
from eobblast.events.status import DeadLetter
from eobblast.observe.audit import AuditAction, AuditRecord, AuditTrail, member_ref
from eobblast.streams.kafka import (
    RECORD_ERRORS,
    BrokerUnavailable,
    KafkaError,
    KafkaSecurity,
    TopicRecord,
    make_producer,
    read_to_end,
    start_or_unavailable,
)

REPLAY_HEADER = "eobblast-replay-of"
UNREADABLE = "unreadable"
STILL_REFUSED = "still_refused"
OTHER_TOPIC = "other_topic"

# The reason code a worker would refuse an original with now, or None if it would take it.
Check = Callable[[bytes], str | None]


def refusal_check(*, allow_test_domains: bool) -> Check:
    """The workers' validation of an `eob.events` value under these settings, as a Check."""

    def check(original: bytes) -> str | None:
        event = validate_event(original, allow_test_domains=allow_test_domains)
        return str(event.reason) if isinstance(event, Rejection) else None

    return check


@dataclass(frozen=True, slots=True)
class Parked:
    """One record of the dead-letter topic; `letter` is None if it is not an eob.events.dlq/v1
    dead letter."""

    partition: int
    offset: int
    letter: DeadLetter | None
    # The reason code the check gave the original (None: accepted now, or not checked).
    refused_now: str | None = None
    # The letter was read from another topic than the input topic replay sends to.
    other_topic: bool = False

    @property
    def reason(self) -> str:
        """The rejection's reason code ("unreadable" for a record that is no dead letter)."""
        return str(self.letter.reason) if self.letter is not None else UNREADABLE

    @property
    def position(self) -> str:
        """partition:offset in the dead-letter topic."""
        return f"{self.partition}:{self.offset}"

    def not_replayable(self) -> str | None:
        """Why the original cannot be published again as it was, or None if it can."""
        letter = self.letter
        if letter is None:
            return UNREADABLE
        if self.other_topic:
            return OTHER_TOPIC  # a verification result, say: no event for the input topic
        if letter.truncated:
            if not letter.original_base64:
                return "original_not_kept"  # the DLQ topic refused the whole letter
            return "original_truncated"  # over 256 KiB: only a prefix was kept
        if not letter.original_size:
            return "original_empty"  # nothing to send (and refused again)
        if not letter.key_base64:
            return "key_missing"  # no member id to keep the order by: refused again
        if letter.key_truncated:
            return "key_truncated"
        if self.refused_now is not None:
            return STILL_REFUSED  # sent back, it would only be parked again
        return None

    def summary(self) -> dict[str, Any]:
        """What an operator may see: no original bytes, no key."""
        letter = self.letter
        row: dict[str, Any] = {"position": self.position, "reason": self.reason}
        row |= dict.fromkeys(
            ("rejected_at", "field", "event_id", "source", "original_size", "original_sha256")
        )
        if letter is not None:
            row |= {
                "rejected_at": letter.rejected_at.isoformat(),
                "field": letter.field,
                "event_id": letter.event_id,
                "source": f"{letter.source.topic}/{letter.source.partition}/{letter.source.offset}",
                "original_size": letter.original_size,
                "original_sha256": letter.original_sha256,
            }
        why_not = self.not_replayable()
        row["replayable"] = why_not is None
        row["not_replayable"] = why_not
        row["refused_now"] = self.refused_now
        return row


@dataclass(frozen=True, slots=True)
class Selection:
    """Which dead letters: those matching every criterion given (an empty one matches all)."""

    reasons: frozenset[str] = frozenset()
    event_ids: frozenset[str] = frozenset()
    positions: frozenset[str] = frozenset()

    @property
    def empty(self) -> bool:
        """Whether no criterion was given."""
        return not (self.reasons or self.event_ids or self.positions)

    def __contains__(self, parked: object) -> bool:
        if not isinstance(parked, Parked):
            return False
        letter = parked.letter
        return (
            (not self.reasons or parked.reason in self.reasons)
            and (not self.event_ids or (letter is not None and letter.event_id in self.event_ids))
            and (not self.positions or parked.position in self.positions)
        )


def _parked(record: TopicRecord, events_topic: str) -> Parked:
    """The dead letter of a DLQ record; replay would send its original to `events_topic`."""
    try:
        letter = DeadLetter.model_validate_json(record.value or b"")
        # What replay would send must decode: a damaged record is unreadable, not a crash.
        base64.b64decode(letter.original_base64, validate=True)
        base64.b64decode(letter.key_base64 or "", validate=True)
    except (pydantic.ValidationError, binascii.Error):
        letter = None
    elsewhere = letter is not None and letter.source.topic != events_topic
    return Parked(record.partition, record.offset, letter, other_topic=elsewhere)


def _checked(parked: Parked, check: Check) -> Parked:
    """`parked` with the check's verdict on its original, if it could be sent at all."""
    if parked.letter is None or parked.not_replayable() is not None:
        return parked
    return replace(parked, refused_now=check(base64.b64decode(parked.letter.original_base64)))


async def dead_letters(
    bootstrap: str,
    topic: str,
    selection: Selection = Selection(),
    check: Check | None = None,
    *,
    events_topic: str,
    security: KafkaSecurity,
) -> AsyncGenerator[Parked, None]:
    """The selected dead letters on `topic`, oldest first per partition; each original
    that could be sent again to `events_topic` is run through `check`, if given."""
    records = read_to_end(bootstrap, topic, client_id="eobblast-dlq", security=security)
    async with contextlib.aclosing(records):  # closed (its consumer stopped) if we stop early
        async for record in records:
            parked = _parked(record, events_topic)
            if parked in selection:
                yield parked if check is None else _checked(parked, check)


@dataclass(slots=True)
class ReplayReport:
    """What a replay did (or, dry, would do): replayed records (acknowledged by the broker)
    counted by reason code, skipped ones by cause, those still refused by the reason code
    they get now, the positions of those the broker refused, and how many chosen records
    were not acknowledged because the replay stopped part way."""

    replayed: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)  # by why not
    still_refused: Counter[str] = field(default_factory=Counter)  # by today's reason code
    refused_at: list[tuple[int, int]] = field(default_factory=list)  # (partition, offset)
    not_acknowledged: int = 0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready counts."""
        return {
            "replayed": sum(self.replayed.values()),
            "replayed_by_reason": dict(sorted(self.replayed.items())),
            "skipped": sum(self.skipped.values()),
            "skipped_by_cause": dict(sorted(self.skipped.items())),
            "still_refused_by_reason": dict(sorted(self.still_refused.items())),
            "refused_by_broker_at": [f"{p}:{o}" for p, o in sorted(self.refused_at)],
            "not_acknowledged": self.not_acknowledged,
        }


class ReplayInterrupted(Exception):
    """The broker failed a replay part way: `report` counts what it had acknowledged."""

    def __init__(self, report: ReplayReport, cause: BaseException) -> None:
        detail = cause.detail if isinstance(cause, BrokerUnavailable) else type(cause).__name__
        super().__init__(detail)
        self.report = report


class ReplayNotAudited(Exception):
    """Records were replayed (`report`), but the audit trail did not take their records."""

    def __init__(self, report: ReplayReport, cause: BaseException) -> None:
        # By type only: a driver's message can quote the row it choked on.
        super().__init__(type(cause).__name__)
        self.report = report


@dataclass(frozen=True, slots=True)
class ReplayAudit:
    """Where a replay is recorded: the trail, the member-reference key (its references
    match the workers'), and who runs the replay (a short token: an account name)."""

    trail: AuditTrail
    key: bytes
    actor: str


@dataclass(frozen=True, slots=True)
class _Sent:
    """One original handed to the producer: what the audit record needs, and its future."""

    reason: str
    position: tuple[int, int]
    future: asyncio.Future[Any]
    event_id: str | None = None
    key: bytes = field(default=b"", repr=False)  # the member id: never printed or returned

    def record(self, audit: ReplayAudit, now: dt.datetime) -> AuditRecord:
        """The audit record of this original, once the broker took it."""
        partition, offset = self.position
        try:
            reference = member_ref(audit.key, self.key.decode()) if self.key else None
        except UnicodeDecodeError:
            reference = None  # not a member id the workers would have keyed anything by
        return AuditRecord(
            # A letter without an event id (the original's was missing or unreadable when
            # it was parked) is named by its position in the dead-letter topic.
            event_id=self.event_id or f"dlq:{partition}:{offset}",
            action=AuditAction.DLQ_REPLAYED,
            actor=audit.actor,
            at=now,
            member_ref=reference,
            reason=self.reason,
            item_id=f"{partition}:{offset}",
        )


async def replay(
    bootstrap: str,
    dlq_topic: str,
    events_topic: str,
    selection: Selection,
    *,
    check: Check | None = None,
    dry_run: bool = False,
    security: KafkaSecurity,
    audit: ReplayAudit | None = None,
) -> ReplayReport:
    """Publish the selected dead letters' originals to `events_topic` again, each with its
    original key and a header naming its dead letter; acknowledged by the broker before
    this returns. Unreadable records, letters read from another topic than `events_topic`
    (verification results), originals kept only in part or empty, records without their
    whole key and, given a `check`, originals it still refuses are skipped;
    so is a record the broker refuses for itself (its size, a policy), and the rest go on.
    Given `audit`, each original the broker acknowledged is recorded in the audit trail,
    also when the broker fails part way (ReplayNotAudited if the trail refuses them).

    The dead letters to send are chosen in a first read of the topic, and sent in a second:
    one a worker parks again meanwhile is not sent a second time.
    If the broker fails part way, ReplayInterrupted carries the counts of what it took.
    """
    report = ReplayReport()
    wanted: dict[tuple[int, int], str] = {}
    letters = dead_letters(
        bootstrap, dlq_topic, selection, check, events_topic=events_topic, security=security
    )
    async for parked in letters:
        why_not = parked.not_replayable()
        if why_not is not None:
            report.skipped[why_not] += 1
            if parked.refused_now is not None:
                report.still_refused[parked.refused_now] += 1
        else:
            wanted[parked.partition, parked.offset] = parked.reason
    if dry_run or not wanted:
        report.replayed.update(wanted.values())
        return report
    chosen = len(wanted)
    producer = make_producer(bootstrap, client_id="eobblast-dlq-replay", security=security)
    await start_or_unavailable(producer, bootstrap, security)
    failure: BaseException | None = None
    acknowledged: list[_Sent] = []
    try:
        pending: list[_Sent] = []
        try:
            await _send_chosen(
                producer, bootstrap, dlq_topic, events_topic, wanted, pending, security
            )
        except (KafkaError, BrokerUnavailable) as exc:
            failure = exc
        for sent in pending:
            try:
                await sent.future
            except RECORD_ERRORS:
                report.refused_at.append(sent.position)
            except KafkaError as exc:
                failure = failure or exc
            else:
                report.replayed[sent.reason] += 1
                acknowledged.append(sent)
    finally:
        try:
            await producer.stop()
        except KafkaError as exc:
            failure = failure or exc
    if report.refused_at:
        report.skipped["refused_by_broker"] = len(report.refused_at)
    if failure is not None:
        report.not_acknowledged = chosen - sum(report.replayed.values()) - len(report.refused_at)
    if audit is not None and acknowledged:
        now = dt.datetime.now(dt.UTC)
        try:
            # Together: the trail's appends share commits (group commit).
            await asyncio.gather(*(audit.trail.append(s.record(audit, now)) for s in acknowledged))
        except Exception as exc:
            raise ReplayNotAudited(report, exc) from None
    if failure is not None:
        raise ReplayInterrupted(report, failure) from failure
    if wanted:
        report.skipped["gone"] = len(wanted)  # removed by retention between the two reads
    return report


async def _send_chosen(
    producer: Any,
    bootstrap: str,
    dlq_topic: str,
    events_topic: str,
    wanted: dict[tuple[int, int], str],
    pending: list[_Sent],
    security: KafkaSecurity,
) -> None:
    """Send the originals at the `wanted` positions (taking each out of it), appending each
    send (reason, position, future, event id and key) to `pending`; a record the producer
    refuses before sending it (too large) gets a failed future."""
    records = read_to_end(bootstrap, dlq_topic, client_id="eobblast-dlq", security=security)
    async with contextlib.aclosing(records):
        async for record in records:
            # Only the chosen ones are parsed again (the first read checked them).
            reason = wanted.pop((record.partition, record.offset), None)
            if reason is None:
                continue
            letter = _parked(record, events_topic).letter
            assert letter is not None and letter.key_base64
            origin = f"{dlq_topic}/{record.partition}/{record.offset}".encode()
            key = base64.b64decode(letter.key_base64)
            try:
                future = await producer.send(
                    events_topic,
                    base64.b64decode(letter.original_base64),
                    key=key,
                    headers=[(REPLAY_HEADER, origin)],
                )
            except RECORD_ERRORS as refused:
                future = asyncio.get_running_loop().create_future()
                future.set_exception(refused)
            position = (record.partition, record.offset)
            pending.append(_Sent(reason, position, future, letter.event_id, key))
            if not wanted:
                return

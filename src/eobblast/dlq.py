"""The dead-letter topic for operators: what is parked and why, and sending chosen records
back to the input topic once what rejected them is fixed.

A dead letter holds the original bytes and key: PHI and a member id. Nothing here prints,
logs or returns them to a caller: a listing shows the reason, the field, the event id, where
the record was read, its size and SHA-256. A replayed record goes back to the input topic as the
claims system published it, under the same key (the member id), with a header naming the
dead letter it came from: it lands after the member's later notices. The send ledger keeps
an event delivered meanwhile under the same event id, within its retention, from being
sent twice.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
from collections import Counter
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

import pydantic

from eobblast.events.status import DeadLetter
from eobblast.streams.kafka import (
    TopicRecord,
    make_producer,
    read_to_end,
    start_or_unavailable,
)

REPLAY_HEADER = "eobblast-replay-of"
UNREADABLE = "unreadable"


@dataclass(frozen=True, slots=True)
class Parked:
    """One record of the dead-letter topic; `letter` is None if it is not an eob.events.dlq/v1
    dead letter."""

    partition: int
    offset: int
    letter: DeadLetter | None

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
        if letter.truncated:
            return "original_truncated"  # over 1 MiB: only a prefix was kept
        if not letter.original_size:
            return "original_empty"  # nothing to send (and refused again)
        if not letter.key_base64:
            return "key_missing"  # no member id to keep the order by: refused again
        if letter.key_truncated:
            return "key_truncated"
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


def _parked(record: TopicRecord) -> Parked:
    try:
        letter = DeadLetter.model_validate_json(record.value or b"")
        # What replay would send must decode: a damaged record is unreadable, not a crash.
        base64.b64decode(letter.original_base64, validate=True)
        base64.b64decode(letter.key_base64 or "", validate=True)
    except (pydantic.ValidationError, binascii.Error):
        letter = None
    return Parked(record.partition, record.offset, letter)


async def dead_letters(
    bootstrap: str, topic: str, selection: Selection = Selection()
) -> AsyncGenerator[Parked, None]:
    """The selected dead letters on `topic`, oldest first per partition."""
    records = read_to_end(bootstrap, topic, client_id="eobblast-dlq")
    async with contextlib.aclosing(records):  # closed (its consumer stopped) if we stop early
        async for record in records:
            parked = _parked(record)
            if parked in selection:
                yield parked


@dataclass(slots=True)
class ReplayReport:
    """What a replay did (or, dry, would do): replayed records counted by reason code,
    skipped ones by cause."""

    replayed: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)  # by why not

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready counts."""
        return {
            "replayed": sum(self.replayed.values()),
            "replayed_by_reason": dict(sorted(self.replayed.items())),
            "skipped": sum(self.skipped.values()),
            "skipped_by_cause": dict(sorted(self.skipped.items())),
        }


async def replay(
    bootstrap: str,
    dlq_topic: str,
    events_topic: str,
    selection: Selection,
    *,
    dry_run: bool = False,
) -> ReplayReport:
    """Publish the selected dead letters' originals to `events_topic` again, each with its
    original key and a header naming its dead letter; acknowledged by the broker before
    this returns. Unreadable records, originals kept only in part or empty, and records
    without their whole key are skipped.

    The dead letters to send are chosen in a first read of the topic, and sent in a second:
    one the worker parks again meanwhile (a record still refused) is not sent a second time.
    """
    report = ReplayReport()
    wanted: dict[tuple[int, int], str] = {}
    async for parked in dead_letters(bootstrap, dlq_topic, selection):
        why_not = parked.not_replayable()
        if why_not is not None:
            report.skipped[why_not] += 1
        else:
            wanted[parked.partition, parked.offset] = parked.reason
    if dry_run or not wanted:
        report.replayed.update(wanted.values())
        return report
    producer = make_producer(bootstrap, client_id="eobblast-dlq-replay")
    await start_or_unavailable(producer, bootstrap)
    try:
        pending = []
        records = read_to_end(bootstrap, dlq_topic, client_id="eobblast-dlq")
        async with contextlib.aclosing(records):
            async for record in records:
                # Only the chosen ones are parsed again (the first read checked them).
                reason = wanted.pop((record.partition, record.offset), None)
                if reason is None:
                    continue
                letter = _parked(record).letter
                assert letter is not None and letter.key_base64
                origin = f"{dlq_topic}/{record.partition}/{record.offset}".encode()
                pending.append(
                    await producer.send(
                        events_topic,
                        base64.b64decode(letter.original_base64),
                        key=base64.b64decode(letter.key_base64),
                        headers=[(REPLAY_HEADER, origin)],
                    )
                )
                report.replayed[reason] += 1
                if not wanted:
                    break
        for sent in pending:
            await sent  # raises if the broker refused it: no report then
    finally:
        await producer.stop()
    if wanted:
        report.skipped["gone"] = len(wanted)  # removed by retention between the two reads
    return report

"""Status ids on eob.delivery: one id per fact, whichever attempt or process reports it."""

from __future__ import annotations

import datetime as dt
import time

import orjson

from eobblast.errors import Outcome, ReasonCode
from eobblast.events.status import DeliveryStatus
from eobblast.pipeline import EventOutcome
from eobblast.worker import status_record


def _status(outcome: Outcome, reason: ReasonCode, attempt: int, worker: str) -> DeliveryStatus:
    outcome_of_attempt = EventOutcome("EOB-1", outcome, reason, 0.0)
    value = status_record(outcome_of_attempt, "EOB-1", attempt, worker, None)
    return DeliveryStatus.model_validate(orjson.loads(value))


def test_a_paper_fallback_has_one_id_whichever_attempt_reports_it() -> None:
    # A timer on one worker sends the notice to paper (the outbox's status, attempt 1);
    # the worker whose resend it took over then finds it settled and reports attempt 3.
    from_outbox = _status(Outcome.FALLBACK, ReasonCode.VERIFICATION_FAILED, 1, "w-1")
    from_resend = _status(Outcome.FALLBACK, ReasonCode.VERIFICATION_FAILED, 3, "w-2")
    assert from_outbox.status_id == from_resend.status_id
    assert (from_outbox.attempt, from_resend.attempt) == (1, 3)


def test_other_statuses_keep_an_id_per_attempt() -> None:
    # A deferred first attempt and a delivered third are two facts, not a republish.
    ids = {
        _status(outcome, reason, attempt, "w-1").status_id
        for outcome, reason in (
            (Outcome.DEFERRED, ReasonCode.TEMPORARY_FAILURE),
            (Outcome.DELIVERED, ReasonCode.DELIVERED),
        )
        for attempt in (1, 3)
    }
    assert len(ids) == 4
    # The same status republished (after a crash) keeps its id.
    again = _status(Outcome.DELIVERED, ReasonCode.DELIVERED, 3, "w-2")
    assert again.status_id in ids


def test_a_record_timestamp_no_datetime_holds_counts_as_unknown() -> None:
    # A producer that sets CreateTime in microseconds or nanoseconds (Kafka takes it): the
    # status of an event already sent failed to build, and was tried again for ever.
    now_ms = int(time.time() * 1000)
    for stamp in (now_ms * 1000, now_ms * 1_000_000, 2**63 - 1, -1):
        assert _status_from(stamp).source_timestamp is None
    assert _status_from(now_ms).source_timestamp == dt.datetime.fromtimestamp(now_ms / 1000, dt.UTC)


def _status_from(source_ms: int) -> DeliveryStatus:
    outcome = EventOutcome("EOB-1", Outcome.DELIVERED, ReasonCode.DELIVERED, 0.0)
    value = status_record(outcome, "EOB-1", 1, "w-1", source_ms)
    return DeliveryStatus.model_validate(orjson.loads(value))

"""One worker process: consume eob.events, send, publish each outcome, commit behind it.

Commit discipline: an offset is committed only when every record before it has a recorded
outcome (its status event produced and acknowledged). In-flight records are bounded by
`pipeline.max_in_flight`; at the bound the worker waits for a slot and leaves the consumer
alone (aiokafka keeps at most one fetch per partition buffered), and only if it stays full
for long does it poll with its partitions paused, so the group does not evict it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import gc
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from eobblast.bounces.rules import load_rules
from eobblast.bounces.service import (
    BounceOutcome,
    BounceService,
    BounceTopics,
    DsnReport,
    Publisher,
    Resend,
    TopicRefused,
)
from eobblast.bounces.store import STORE_ERRORS, OutboxMessage, open_bounce_store
from eobblast.bounces.verp import VerpKey
from eobblast.config import Config
from eobblast.errors import Outcome, ReasonCode, StoreUnavailable
from eobblast.events import EobIssued
from eobblast.events.status import (
    DeadLetter,
    DeliveryStatus,
    SourcePosition,
    dead_letter,
    dead_letter_key,
    status_id,
    without_original,
)
from eobblast.events.verification import VerificationResultError, parse_verification_result
from eobblast.observe import metrics
from eobblast.pipeline import (
    EventOutcome,
    Pipeline,
    bounce_event_outcome,
    until_written,
)
from eobblast.protect.mta_sts_store import open_sts_store
from eobblast.protect.services import (
    ProtectionServices,
    hold_secrets,
    verp_secrets,
)
from eobblast.protect.tls_store import TlsSync, open_tls_store
from eobblast.state import ClaimKind, LedgerEntry, LedgerState, SendLedger, open_ledger
from eobblast.state.ledger import AGAIN, CLAIM_RENEW, PURGE_BATCH
from eobblast.streams.kafka import (
    CONNECT_ERRORS,
    DEFAULT_REBALANCE_TIMEOUT_MS,
    RECORD_ERRORS,
    TOPIC_ERRORS,
    AIOKafkaConsumer,
    AIOKafkaProducer,
    IllegalStateError,
    KafkaError,
    KafkaSecurity,
    ReadAgain,
    ReadAgainListener,
    TopicPartition,
    backoff_delay,
    connect_error_text,
    kafka_security,
    make_consumer,
    make_producer,
    metadata_heard_since,
    retrieved,
    wait_for_broker,
)
from eobblast.streams.offsets import OffsetTracker
from eobblast.transport import Transport

log = logging.getLogger("eobblast.worker")

# An offset commit waits no longer than this (aiokafka retries retriable errors without end).
COMMIT_TIMEOUT = 10.0
# What a status mark may fail with and be tried again at the next commit.
MARK_ERRORS: tuple[type[BaseException], ...] = (*STORE_ERRORS, TimeoutError)
# Rounds of cancelling abandoned tasks (CANCEL_ROUND s each) before giving up on them.
CANCEL_ROUNDS = 5
CANCEL_ROUND = 1.0
# What a bug raises. A record's attempts failing with the same one this many times in a row
# are given up (`Worker._give_up`): its bytes or its state fail it the same way every time,
# and trying it for ever would hold its partition's commits and an in-flight slot. Outages
# of a store or of Kafka (OSError, the drivers' errors, KafkaError, StoreUnavailable) and
# cancellations are none of these: they are waited out however long they last.
BUG_ERRORS: tuple[type[Exception], ...] = (
    ValueError,
    TypeError,
    LookupError,
    AttributeError,
    ArithmeticError,
    AssertionError,
)
GIVE_UP_AFTER = 5
# One bounce-service record (verification request, paper fallback) waits this long for Kafka,
# and at most METADATA_TIMEOUT of it for its topic's partitions (a topic the producer has
# published to is known at once). A topic refused is not tried again for REFUSED_FOR s,
# well inside the bounce outbox's claim (60 s), so the tick that takes its records again
# finds it asked afresh.
PUBLISH_TIMEOUT = 10.0
METADATA_TIMEOUT = 3.0
REFUSED_FOR = 30.0
# A stopping worker waits this long for its Kafka clients to stop. Longer means a rebalance
# holds a consumer's JoinGroup (Kafka answers it once every member has joined, or the
# rebalance timeout has passed), or the producer holds a record the broker never took: the
# client is then left to the process's end.
CLOSE_TIMEOUT = 3.0
# A stopped worker's stores, TLS knowledge and SMTP connections are closed within this
# (those steps have no timeout of their own), and the process exits.
EXIT_ALLOWANCE = 5.0
# A worker full of in-flight events this long (at most; a quarter of the consumer's
# max_poll_interval_ms if that is less) still polls, all partitions paused, so the group
# does not evict it.
POLL_WHEN_FULL = 30.0
# A worker takes new records once this fraction of its in-flight slots is free.
REFILL_FRACTION = 8
# How often each worker forgets the ledger's events past `[ledger] retention_days`, and
# the pause between two batches (a backlog goes at most ~10 batches a second, so the
# ledger's write lock stays free for claims most of the time).
LEDGER_PURGE_EVERY = 60.0
LEDGER_PURGE_PAUSE = 0.1
# A fetch response carries a partition's high watermark, but a full worker fetches nothing
# new (aiokafka holds the records it has; a long-full worker pauses its partitions): the
# backlog gauge asks the broker for the end offsets this often, within END_OFFSETS_TIMEOUT
# (read_committed: the last stable offsets, short of an open transaction's records).
END_OFFSETS_EVERY = 15.0
END_OFFSETS_TIMEOUT = 1.0
# When those go unanswered, how long the cluster's metadata may take to come instead (the
# brokers then count as answering: eobblast_kafka_answered_timestamp_seconds).
METADATA_ANSWER_TIMEOUT = 5.0
# How often a worker compares its clock with a PostgreSQL ledger server's, and the gap above
# which it warns: the ledger's leases use the server's clock, but the bounce store's retry
# times and leases and the shaping budgets use the workers'.
CLOCK_CHECK_EVERY = 60.0
CLOCK_CHECK_TIMEOUT = 10.0
CLOCK_SKEW_WARN = 2.0


def new_worker_id(index: int) -> str:
    """A unique id per process incarnation: a restarted worker is a different owner."""
    return f"{socket.gethostname()}-w{index}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass(slots=True)
class _InFlight:
    """Where one handed-out record is, for the stuck-event report."""

    partition: int
    offset: int
    since: float
    stage: str = "queued"
    event_id: str | None = None
    # Its dead letter is on the DLQ: an attempt run again does not park it a second time.
    parked: bool = False
    # The status it reports (outcome, key, attempt), once decided: given up, it still does.
    status: tuple[EventOutcome, str, int] | None = None
    # That status is of the attempt its event's ledger row settles: marked published once out.
    settled: bool = False


def _discard(tasks: dict[asyncio.Task[None], _InFlight], task: asyncio.Task[None]) -> None:
    tasks.pop(task, None)


async def _cancel_and_wait(tasks: set[asyncio.Task[None]], rounds: int = CANCEL_ROUNDS) -> None:
    """Cancel `tasks` and wait until they have ended (bounded).

    A cancellation can be lost: Python 3.11's `wait_for` (inside aiosmtplib) returns a
    result that arrived in the same turn and drops the cancel. A task that goes on after
    its partition moved could send and report an event its new owner also sends, so it is
    cancelled again until it ends.
    """
    for _ in range(rounds):
        if not tasks:
            return
        for task in tasks:
            task.cancel()
        _, tasks = await asyncio.wait(tasks, timeout=CANCEL_ROUND)
    if tasks:
        log.warning("tasks still running after cancellation", extra={"count": len(tasks)})


async def _ended_or_cancelled(tasks: Collection[asyncio.Task[None]], seconds: float) -> None:
    """Give `tasks` (at least one) `seconds` to end, then cancel what is left."""
    _, late = await asyncio.wait(tasks, timeout=seconds)
    await _cancel_and_wait(late)


def revocation_timeout_ms(grace_period: float) -> int:
    """The consumer's rebalance timeout: long enough for `partitions_revoked` to finish
    (in-flight work for up to the grace period, cancellation rounds, the status marks and
    the offset commit), or the group would drop this member while it still works, and its
    commit of the finished records would fail."""
    seconds = grace_period + CANCEL_ROUNDS * CANCEL_ROUND + 2 * COMMIT_TIMEOUT + 5.0
    return max(DEFAULT_REBALANCE_TIMEOUT_MS, int(seconds * 1000))


def stop_budget(grace_period: float) -> float:
    """The longest a worker takes to exit once told to stop (SIGTERM): a supervisor that
    kills it sooner cuts its last commit short, and every record since the one before is
    redelivered.

    In turn: what was under way when it was told (a commit's status marks and offsets, a
    clock check, end offsets: the longest of them); the grace period, which starts once
    that commit is done at the latest; the cancellation rounds of the bounce tasks, then
    those of the records; the last commit; the Kafka clients' stop; EXIT_ALLOWANCE.
    """
    under_way = max(
        2 * COMMIT_TIMEOUT, CLOCK_CHECK_TIMEOUT, END_OFFSETS_TIMEOUT + METADATA_ANSWER_TIMEOUT
    )
    cancelling = 2 * CANCEL_ROUNDS * CANCEL_ROUND
    last_commit = 2 * COMMIT_TIMEOUT
    return under_way + grace_period + cancelling + last_commit + CLOSE_TIMEOUT + EXIT_ALLOWANCE


async def _done_unless_stopped(
    future: asyncio.Future[Any], stop: asyncio.Event | asyncio.Future[Any]
) -> bool:
    """Wait until `future` is done or `stop` is set (an event, or a future that ends when
    it is); whether `future` is done.

    `future` is left running when `stop` comes first. A consumer's getmany waits for the
    end of a rebalance, which another member can hold open for its rebalance timeout:
    a stopping worker does not wait for it, and a getmany must never be cancelled while
    the consumer lives on (see `Worker._fetched`).
    """
    if future.done():
        return True
    if isinstance(stop, asyncio.Event):
        if stop.is_set():
            return False
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait((future, stopping), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
    elif not stop.done():
        await asyncio.wait((future, stop), return_when=asyncio.FIRST_COMPLETED)
    return future.done()


async def _ran_unless_stopped(work: Awaitable[Any], stop: asyncio.Event) -> bool:
    """Run `work` until it ends (True; its error is raised) or `stop` is set (False; it is
    cancelled, as it is if this task is)."""
    task = asyncio.ensure_future(work)
    try:
        ended = await _done_unless_stopped(task, stop)
    finally:
        if not task.done():
            task.add_done_callback(retrieved)
            task.cancel()
    if ended:
        task.result()
    return ended


async def _pause(seconds: float, stop: asyncio.Event) -> None:
    """Sleep `seconds`, or until `stop` is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


async def closed_in_time(closings: Mapping[asyncio.Future[Any], str]) -> None:
    """Wait for Kafka clients being stopped (each future named by its client), CLOSE_TIMEOUT
    at most (see there).

    A consumer whose JoinGroup a rebalance holds, or a producer with a record the broker
    never took, is left to the process's end; the group drops such a member after its
    session timeout.
    """
    if not closings:
        return
    done, late = await asyncio.wait(closings, timeout=CLOSE_TIMEOUT)
    for closing in done:
        error = None if closing.cancelled() else closing.exception()
        if error is not None and not isinstance(error, (KafkaError, OSError)):
            log.warning(
                "Kafka client close failed: %s",
                type(error).__name__,
                extra={"client": closings[closing]},
            )
    for closing in late:
        log.warning("Kafka client not closed in time", extra={"client": closings[closing]})


async def stop_in_time(client: str, stop: Callable[[], Awaitable[None]]) -> None:
    """Stop one Kafka client (`stop`, named `client` in logs), CLOSE_TIMEOUT at most."""
    await closed_in_time({_stopping(stop): client})


def _stopping(stop: Callable[[], Awaitable[None]]) -> asyncio.Future[None]:
    """A Kafka client's stop, started; left running when late, its error is not news."""
    closing = asyncio.ensure_future(stop())
    closing.add_done_callback(retrieved)
    return closing


async def _started(
    start: Callable[[], Awaitable[None]], stop: asyncio.Event, security: KafkaSecurity
) -> bool:
    """Start one Kafka client, trying again with backoff while the broker is away; False
    if `stop` was set first (a consumer's start waits for its first partitions, as long
    as a rebalance lasts)."""
    attempt = 0
    while not stop.is_set():
        try:
            # Stopped: the client is stopped next, which ends what its start left behind.
            return await _ran_unless_stopped(start(), stop)
        except CONNECT_ERRORS as error:
            attempt += 1
            if attempt % 10 == 1:
                log.warning(
                    "Kafka clients cannot start yet",
                    extra={"attempt": attempt, "error": connect_error_text(error, security)},
                )
            await _pause(backoff_delay(attempt), stop)
    return False


# gc thresholds for a worker's steady state (generation 0 objects, 1 and 2 collections).
WORKER_GC_THRESHOLDS = (20_000, 50, 100)


def settle_heap() -> None:
    """Once a worker is built: what exists now stays, and the collector runs less often.

    Everything built so far (modules, templates, schemas, keys) lives as long as the
    process: frozen out of the collector's sight, a full collection no longer walks it.
    Each event then allocates a few hundred container objects, nearly all freed without a
    cycle: at the default threshold (700) the collector ran ~90 times per 1,000 events,
    for ~2% of the worker's CPU, and found little. A collection after 20,000 objects still
    bounds the cyclic garbage that can pile up between collections.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*WORKER_GC_THRESHOLDS)


def _being_cancelled() -> bool:
    """Whether someone asked to cancel the running task itself."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


def source_time(source_ms: int | None) -> dt.datetime | None:
    """When a Kafka record was appended, from its timestamp (ms); None if it has none.

    A producer may set any CreateTime, and Kafka takes far-future ones by default: one in
    microseconds or nanoseconds (a common bug) is past what a datetime holds. It counts as
    unknown rather than failing the status of an event already sent, which would be tried
    again for ever and hold its partition's commits.
    """
    if source_ms is None or source_ms < 0:
        return None
    try:
        return dt.datetime.fromtimestamp(source_ms / 1000, dt.UTC)
    except (ValueError, OverflowError, OSError):
        return None


def status_record(
    outcome: EventOutcome, event_key: str, attempt: int, worker: str, source_ms: int | None
) -> bytes:
    """An eob.delivery/v1 status event for `outcome`, serialised (key: `event_key`).

    A notice goes to paper once, whichever attempt or process reports it: the worker whose
    resend found it settled, and the bounce store's outbox (attempt 1) when a timer or a
    verification result settled it. Its `fallback` status has one id, so consumers see
    one final status; `attempt` still says which attempt reported it. A copy held for want
    of consent is no attempt of the send that a copy with consent makes later (attempt 1,
    which the bounce service may hold for verification): its id is apart from theirs.
    """
    id_attempt = 1 if outcome.outcome is Outcome.FALLBACK else attempt
    id_status = str(outcome.outcome)
    if outcome.outcome is Outcome.HELD and outcome.reason is ReasonCode.NO_CONSENT:
        id_status += "/" + ReasonCode.NO_CONSENT
    status = DeliveryStatus(
        status_id=status_id(event_key, id_status, id_attempt),
        event_id=outcome.event_id,
        status=outcome.outcome,
        reason=outcome.reason,
        field=outcome.field,
        smtp_code=outcome.smtp_code,
        enhanced_status=outcome.enhanced_status,
        tls_version=outcome.tls_version,
        protection=outcome.protection,
        protection_reason=outcome.protection_reason,
        retry_at=outcome.retry_at,
        bounce_category=outcome.bounce_category,
        attempt=attempt,
        worker=worker,
        occurred_at=dt.datetime.now(dt.UTC),
        source_timestamp=source_time(source_ms),
    )
    return orjson.dumps(status.model_dump(mode="json", by_alias=True))


class _Listener(ReadAgainListener):
    """The worker's rebalance listener: the worker lets go of revoked partitions and
    drains them (`Worker.partitions_revoked`); its `ReadAgain` learns where assigned ones
    start before their records are handed out."""

    def __init__(self, worker: Worker) -> None:
        super().__init__(worker._holes)
        self._worker = worker

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._worker.partitions_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        log.info("partitions assigned", extra={"partitions": len(assigned)})
        await super().on_partitions_assigned(assigned)


class Worker:
    """Consumes events, delivers them through the pipeline and accounts for every one."""

    def __init__(
        self,
        config: Config,
        pipeline: Pipeline,
        ledger: SendLedger,
        *,
        worker_id: str,
        bounces: BounceService | None = None,
    ) -> None:
        self._config = config
        self._pipeline = pipeline
        self._ledger = ledger
        self._bounces = bounces
        self.worker_id = worker_id
        self._tracker: OffsetTracker[TopicPartition] = OffsetTracker()
        self._holes = self._read_again()
        # Per partition, its records' tasks and where each one is (for the oldest's age).
        self._tasks: dict[TopicPartition, dict[asyncio.Task[None], _InFlight]] = {}
        self._sending: dict[str, asyncio.Future[None]] = {}
        # Sent, outcome not yet in the ledger (its store was away, or the attempt was given
        # up as stuck): a second attempt of the record records this, never sends again.
        self._unrecorded: dict[str, tuple[EventOutcome, int]] = {}
        self._by_key: dict[bytes, asyncio.Task[None]] = {}
        self._slot_freed = asyncio.Event()
        # Status events acknowledged by Kafka, marked in the ledger in one batch per commit
        # and remembered here until then, so a duplicate arriving meanwhile is skipped:
        # event id -> the attempt whose status it is.
        self._unmarked: dict[str, int] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._stopping = False
        self._stop: asyncio.Event | None = None
        # Fetches left running when the worker was told to stop (see `_fetched`).
        self._abandoned_fetches: list[asyncio.Future[Any]] = []
        # End offsets the broker last gave, for the backlog gauge (`_ask_end_offsets`).
        self._ends: dict[TopicPartition, int] = {}
        # Kafka clients being stopped, and what each is (see `_closed`).
        self._closings: dict[asyncio.Future[Any], str] = {}
        # When the main loop saw `stop` (the grace period counts from there).
        self._stop_seen: float | None = None
        self._publisher: ProducerPublisher | None = None
        self.duplicates_skipped = 0
        # TLS context and SASL login for every Kafka client of this worker.
        self._security = kafka_security(config.kafka)

    async def run(self, stop: asyncio.Event) -> None:
        """Work until `stop` is set, then drain within the grace period and commit."""
        kafka = self._config.kafka
        self._stop = stop
        security = self._security
        if not await _ran_unless_stopped(wait_for_broker(kafka.bootstrap, security=security), stop):
            log.info(
                "worker stopped before the broker was reached", extra={"worker": self.worker_id}
            )
            return
        self._producer = make_producer(kafka.bootstrap, client_id=self.worker_id, security=security)
        self._publisher = ProducerPublisher(self._producer)
        self._consumer = make_consumer(
            kafka.bootstrap,
            kafka.group_id,
            [kafka.events_topic],
            client_id=self.worker_id,
            max_poll_records=kafka.max_poll_records,
            rebalance_listener=_Listener(self),
            session_timeout_ms=kafka.session_timeout_ms,
            heartbeat_interval_ms=kafka.heartbeat_interval_ms,
            max_poll_interval_ms=kafka.max_poll_interval_ms,
            rebalance_timeout_ms=revocation_timeout_ms(self._config.workers.grace_period),
            security=security,
        )
        # Until the last record is drained: another worker then waits for what this one
        # is sending rather than sending it too.
        renewing = asyncio.create_task(self._renew_claims())
        try:
            if not await self._start_clients(stop):
                return  # told to stop first: nothing was taken, the clients are closed
            metrics.KAFKA_ANSWERED.set(time.time())
            log.info(
                "worker started",
                extra={"worker": self.worker_id, "hole_settle": self._config.kafka.hole_settle},
            )
            async with asyncio.TaskGroup() as group:
                group.create_task(self._loop(stop))
                if self._config.ledger.retention_days > 0:
                    group.create_task(self._forget_settled(stop))
                group.create_task(self._watch_clock(stop))
                group.create_task(self._ask_end_offsets(stop))
                if self._bounces is not None:
                    # A resend under way, or a status its broker does not take, keeps these
                    # going after stop: they get the grace period the records get.
                    group.create_task(
                        self._within_grace(
                            stop,
                            group.create_task(self._bounce_timers(stop)),
                            group.create_task(self._verification_results(stop)),
                        )
                    )
        finally:
            try:
                await self._drain_and_close()
            finally:
                renewing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await renewing

    async def _within_grace(self, stop: asyncio.Event, *tasks: asyncio.Task[None]) -> None:
        """Once `stop` is set, give `tasks` the rest of the grace period, then cancel them
        (a resend cut short is sent again once its lease runs out, as a record's is)."""
        await _done_unless_stopped(asyncio.gather(*tasks, return_exceptions=True), stop)
        if not stop.is_set():
            return
        await _ended_or_cancelled(tasks, self._grace_left())

    def _grace_left(self) -> float:
        """What is left of the grace period, counted from when the worker first saw that it
        is stopping (or from now)."""
        if self._stop_seen is None:
            self._stop_seen = time.monotonic()
        elapsed = time.monotonic() - self._stop_seen
        return max(0.0, self._config.workers.grace_period - elapsed)

    async def _renew_claims(self) -> None:
        """Every CLAIM_RENEW s: renew the claims of what this worker is sending or has sent
        without recording yet, and record the outcomes of records given up meanwhile
        (partition revoked, worker stopping) once the ledger takes them."""
        while True:
            await asyncio.sleep(CLAIM_RENEW)
            try:
                await self._ledger.renew([*self._sending, *self._unrecorded], self.worker_id)
            except Exception as exc:
                # Not only the store's errors: a renewer that died would let every claim
                # of this worker run out while it still sends (a second email each).
                log.warning("claims not renewed: %s", type(exc).__name__)
                continue
            # The outcomes of records whose task is gone, all at once: the ledger writes
            # them in one transaction (a store away fails them in one bounded wait, not one
            # each while the claims run out), and one it refuses for good (a bug) is split
            # out from the others, which must not stay unwritten, their copies elsewhere
            # waiting on them for ever.
            left = [
                (event_id, outcome)
                for event_id, (outcome, _) in self._unrecorded.items()
                if event_id not in self._sending
            ]
            results = await asyncio.gather(
                *(self._ledger.finish(e, o.outcome, o.reason) for e, o in left),
                return_exceptions=True,
            )
            failed = [r for r in results if isinstance(r, BaseException)]
            for (event_id, _), result in zip(left, results, strict=True):
                if not isinstance(result, BaseException):
                    self._unrecorded.pop(event_id, None)
            if failed:
                log.warning("outcomes not recorded yet: %s", type(failed[0]).__name__)

    async def _forget_settled(self, stop: asyncio.Event) -> None:
        """Every LEDGER_PURGE_EVERY s: drop the ledger's events settled and reported longer
        ago than the retention (unreported: twice that), in batches (each a short
        transaction of its own)."""
        window = self._config.ledger.retention_days * 86400.0
        while not stop.is_set():
            await _pause(LEDGER_PURGE_EVERY, stop)
            now = time.time()
            # An event whose status mark was lost (its worker stopped or crashed before
            # writing it) is kept for a second window: its status went out, or a
            # redelivery of its record would find the outcome and publish it.
            before, unmarked_before = now - window, now - 2 * window
            forgotten = 0
            try:
                while not stop.is_set():
                    batch = await self._ledger.purge(before, unmarked_before)
                    forgotten += batch
                    if batch < PURGE_BATCH:
                        break
                    await asyncio.sleep(LEDGER_PURGE_PAUSE)
            except STORE_ERRORS as exc:
                log.warning("ledger not purged: %s", type(exc).__name__)
            metrics.LEDGER_PURGED.inc(forgotten)
            if forgotten:
                log.info("ledger purged", extra={"events": forgotten})

    async def _watch_clock(self, stop: asyncio.Event) -> None:
        """Every CLOCK_CHECK_EVERY s, from the start: this machine's clock against the ledger
        server's (`eobblast_clock_skew_seconds`), with a warning past CLOCK_SKEW_WARN. A
        ledger on this machine (SQLite) shares its clock: nothing to watch."""
        while not stop.is_set():
            try:
                async with asyncio.timeout(CLOCK_CHECK_TIMEOUT):
                    offset = await self._ledger.clock_offset()
            except Exception as exc:  # a check only: never a reason to restart the worker
                log.warning("clock not compared with the ledger: %s", type(exc).__name__)
            else:
                if offset is None:
                    return
                metrics.CLOCK_SKEW.set(abs(offset))
                if abs(offset) > CLOCK_SKEW_WARN:
                    # Positive: the server's clock reads later than this machine's.
                    log.warning(
                        "clock differs from the ledger server's; keep the machines' clocks"
                        " in step (NTP)",
                        extra={"server_minus_local_seconds": round(offset, 1)},
                    )
            await _pause(CLOCK_CHECK_EVERY, stop)

    async def _ask_end_offsets(self, stop: asyncio.Event) -> None:
        """Every END_OFFSETS_EVERY s, the end offsets of this worker's partitions, for the
        backlog gauge (see END_OFFSETS_EVERY); off the take loop, which never waits for
        them. An answer also renews `eobblast_kafka_answered_timestamp_seconds`, which
        stops when the brokers are out of reach (aiokafka reconnects on its own, and from
        the take loop an idle worker looks like one that cannot fetch). A worker without
        partitions asks for the end offset of the events topic's first partition: one small
        answer, where the cluster's metadata lists every topic. Without an answer from
        every leader asked, the cluster's metadata is asked for instead: any broker's
        answer counts."""
        consumer = self._consumer
        assert consumer is not None
        events_topic = self._config.kafka.events_topic
        while not stop.is_set():
            answered = False
            try:
                asked = assigned = list(consumer.assignment())
                # Only a partition the metadata knows: another is asked for again and again
                # until the timeout (the cluster's metadata, below, instead at once).
                if not assigned and 0 in (consumer.partitions_for_topic(events_topic) or ()):
                    asked = [TopicPartition(events_topic, 0)]
                if asked:
                    async with asyncio.timeout(END_OFFSETS_TIMEOUT):
                        ends = await consumer.end_offsets(asked)
                    if assigned:
                        self._ends = {tp: int(end) for tp, end in ends.items()}
                    answered = True
            # A timeout (an OSError), the broker away, a login refused again.
            except CONNECT_ERRORS:
                pass  # the fetches' high watermarks meanwhile; asked again next time
            if not answered:
                with contextlib.suppress(*CONNECT_ERRORS):
                    async with asyncio.timeout(METADATA_ANSWER_TIMEOUT):
                        await consumer.topics()
                    answered = True
            if answered:
                metrics.KAFKA_ANSWERED.set(time.time())
            await _pause(END_OFFSETS_EVERY, stop)

    async def publish(self, topic: str, key: bytes, value: bytes) -> None:
        """The bounce service's Publisher (`ProducerPublisher`).

        It raises rather than retrying: the record stays in the bounce store's outbox and
        `tick` publishes it later. Retrying here would hold the bounce store's shared
        transaction queue, and with it every gate and delivery record of this worker.
        """
        assert self._publisher is not None
        await self._publisher.publish(topic, key, value)

    async def _bounce_timers(self, stop: asyncio.Event) -> None:
        """Due retries, lost resends and verification deadlines, claimed by one worker each."""
        assert self._bounces is not None
        while not stop.is_set():
            try:
                result = await self._bounces.tick()
                await self._settle(result.resends, result.outcomes)
            except Exception as exc:
                # Claims run out and another tick (here or elsewhere) takes the timers again.
                log.warning("bounce timers failed: %s", type(exc).__name__)
            await _pause(self._config.bounces.tick_interval, stop)

    def _read_again(self) -> ReadAgain:
        """A reader's hole checks, as `kafka.hole_settle` says (one per consumer)."""
        return ReadAgain(self._config.kafka.hole_settle)

    async def _verification_results(self, stop: asyncio.Event) -> None:
        """Consume AddressVerified / AddressVerificationFailed; release or fall back."""
        assert self._bounces is not None
        kafka, settings = self._config.kafka, self._config.bounces
        holes = self._read_again()
        consumer = make_consumer(
            kafka.bootstrap,
            settings.results_group_id,
            [settings.results_topic],
            client_id=f"{self.worker_id}-verification",
            max_poll_records=100,
            session_timeout_ms=kafka.session_timeout_ms,
            heartbeat_interval_ms=kafka.heartbeat_interval_ms,
            rebalance_listener=holes.listener(),
            security=self._security,
        )
        failures = 0
        try:
            # Retried like the main clients': a broker away at start-up would otherwise end
            # this task, and with it the worker and its deliveries.
            if not await _started(consumer.start, stop, self._security):
                return
            while not stop.is_set():
                try:
                    await self._verification_batch(consumer, holes, stop)
                    failures = 0
                except Exception as exc:
                    # Kafka trouble, a rebalance mid-batch (CommitFailedError), a busy store:
                    # the uncommitted answers come again, and applying one twice changes
                    # nothing. Stopping the worker for it would stop its deliveries too.
                    failures += 1
                    log.warning("verification results failed: %s", type(exc).__name__)
                    await _pause(backoff_delay(failures), stop)
        finally:
            # Only started here: `_closed` waits for it with the worker's other clients.
            self._close("verification consumer", consumer.stop)

    async def _verification_batch(
        self, consumer: AIOKafkaConsumer, holes: ReadAgain, stop: asyncio.Event
    ) -> None:
        assert self._bounces is not None
        fetching = asyncio.ensure_future(consumer.getmany(timeout_ms=200))
        if not await self._fetched(fetching, stop):
            return
        batch = await holes.take(consumer, fetching.result())
        # Where each partition of the batch starts again if it fails: the consumer's
        # position is past the whole batch already, and the next batch's commit would
        # otherwise pass over the answers not applied.
        again = {tp: records[0].offset for tp, records in batch.items()}
        try:
            for tp, records in batch.items():
                for record in records:
                    if stop.is_set():
                        # What is left (this partition's rest included: nothing of it is
                        # committed) comes again to whoever reads the results next.
                        return
                    if record.value is None:
                        # A tombstone (the topic is compacted, a key erased): a deletion
                        # marker, not a result to apply or to park.
                        continue
                    try:
                        result = parse_verification_result(
                            record.value,
                            allow_test_domains=self._config.pipeline.allow_test_domains,
                        )
                    except VerificationResultError as refused:
                        await self._refuse_result(tp, record, refused)
                        # Committed at once (what came before it is applied): a failure
                        # later in the batch must not park and count it a second time.
                        async with asyncio.timeout(COMMIT_TIMEOUT):
                            await consumer.commit({tp: record.offset + 1})
                        again[tp] = record.offset + 1
                        continue
                    decided = await self._bounces.on_verification_result(result)
                    await self._settle(decided.resends, decided.outcomes)
                # Only once every release of the batch went out (or is leased for tick).
                async with asyncio.timeout(COMMIT_TIMEOUT):
                    await consumer.commit({tp: records[-1].offset + 1})
                again.pop(tp, None)
        except BaseException:
            for tp, offset in again.items():
                # A partition this consumer no longer has is its new owner's to read.
                with contextlib.suppress(IllegalStateError):
                    consumer.seek(tp, offset)
            raise

    async def _refuse_result(
        self, tp: TopicPartition, record: Any, refused: VerificationResultError
    ) -> None:
        """Park a verification result that cannot be read, before its offset is committed,
        and count it: the member's held notices would otherwise go to paper at their
        deadline with nobody knowing why."""
        position = SourcePosition(topic=tp.topic, partition=tp.partition, offset=record.offset)
        # The reason and the field, never the value (an address, a member id).
        log.warning(
            "verification result refused; parked on the DLQ",
            extra={
                "reason": str(refused.reason),
                "field": refused.field,
                "source": f"{tp.topic}/{tp.partition}/{record.offset}",
            },
        )
        await self._park(record.value, record.key, position, refused.reason, refused.field)
        metrics.VERIFICATION_RESULTS_REFUSED.labels(refused.reason).inc()

    async def _settle(self, resends: Sequence[Resend], outcomes: Sequence[BounceOutcome]) -> None:
        """Send what the bounce service hands back; record every notice's new outcome."""
        assert self._bounces is not None
        for decided in outcomes:
            outcome = bounce_event_outcome(decided, 0.0)
            # Its status went out through the bounce store's outbox, committed with it
            # (a worker's bounce service comes from `open_bounces`, which sets status_record).
            await self._finish(decided.event_id, outcome)
            self._pipeline.observe(outcome)
        for resend in resends:
            if self._stopping or (self._stop is not None and self._stop.is_set()):
                # Stopping: each resend is a whole delivery, and the drain waits for this.
                # What is left keeps its lease, runs out and is handed out again by a tick.
                break
            assert self._bounces is not None
            try:
                # Handed out with others: the address may have bounced since, for one of them.
                confirmed = await self._bounces.confirm_resend(resend)
            except STORE_ERRORS:
                log.warning(
                    "resend put off: store unavailable", extra={"event_id": resend.event_id}
                )
                continue
            if not confirmed:
                continue
            start = time.perf_counter()
            checked = self._pipeline.validate(resend.raw_event, start)
            if isinstance(checked, EventOutcome):
                # Validated once already: only a schema change could get here. It stays in
                # the bounce store, handed out again as its lease runs out: logged each time.
                log.warning(
                    "resend refused by validation",
                    extra={"event_id": resend.event_id, "reason": checked.reason},
                )
                continue
            try:
                outcome = await self._pipeline.deliver(
                    checked, start, raw=resend.raw_event, resend=resend
                )
            except StoreUnavailable:
                # Nothing sent; its lease runs out and a later tick hands it out again. The
                # others still go (a verification batch must not stop half-way).
                log.warning(
                    "resend put off: store unavailable", extra={"event_id": resend.event_id}
                )
                continue
            await self._record(outcome, resend.event_id, resend.deliverable.attempt, None)

    async def _start_clients(self, stop: asyncio.Event) -> bool:
        """Start the producer, then the consumer; False if `stop` came first."""
        assert self._producer is not None and self._consumer is not None
        # One at a time: a producer started twice (its consumer failing to start after it)
        # would run two sender tasks, one of them never stopped.
        security = self._security
        return await _started(self._producer.start, stop, security) and await _started(
            self._consumer.start, stop, security
        )

    async def _loop(self, stop: asyncio.Event) -> None:
        # One waiter for every fetch of the loop: a fetch is a few events, a task each.
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await self._take_until(stop, stopping)
        finally:
            stopping.cancel()
        if stop.is_set() and self._stop_seen is None:
            # The grace period starts now, for records in flight and the bounce tasks alike.
            self._stop_seen = time.monotonic()

    async def _take_until(self, stop: asyncio.Event, stopping: asyncio.Future[Any]) -> None:
        assert self._consumer is not None
        consumer = self._consumer
        limit = max(1, self._config.pipeline.max_in_flight)
        commit_every = self._config.kafka.commit_interval
        next_commit = time.monotonic() + commit_every
        polled = time.monotonic()
        # Records are taken a few at a time: one fetch call per record costs more than
        # the slots left empty for a moment.
        refill = max(1, limit // REFILL_FRACTION)
        poll_when_full = min(POLL_WHEN_FULL, self._config.kafka.max_poll_interval_ms / 4000)
        while not stop.is_set():
            free = limit - self._tracker.in_flight
            if free < refill:
                # Full: wake as soon as a record finishes. The consumer is left alone: a
                # paused partition loses what aiokafka prefetched for it, which it would
                # then fetch (and decode) again for every record taken after a resume.
                self._slot_freed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.1):
                        await self._slot_freed.wait()
                if time.monotonic() - polled >= poll_when_full:
                    # Full this long means something is stuck: poll, every partition
                    # paused, so the group keeps this member (max_poll_interval_ms).
                    consumer.pause(*consumer.assignment())
                    await self._fetch(consumer, 0, 1, stopping)
                    polled = time.monotonic()
            else:
                if paused := consumer.paused():
                    consumer.resume(*paused)
                await self._fetch(consumer, 100, free, stopping)
                polled = time.monotonic()
            if time.monotonic() >= next_commit:
                await self._commit()
                self._watch()
                await self._measure_backlog(consumer)
                next_commit = time.monotonic() + commit_every
            metrics.IN_FLIGHT.set(self._tracker.in_flight)

    async def _fetch(
        self, consumer: AIOKafkaConsumer, wait_ms: int, limit: int, stop: asyncio.Future[Any]
    ) -> None:
        """Take at most `limit` records and start a task for each (none once stopping)."""
        # During a rebalance this waits for the new assignment, unless the worker is told
        # to stop (see `_fetched`).
        fetching = asyncio.ensure_future(consumer.getmany(timeout_ms=wait_ms, max_records=limit))
        if not await self._fetched(fetching, stop):
            return
        try:
            batch = fetching.result()
        except KafkaError:
            log.warning("fetch failed; retrying", exc_info=True)
            await asyncio.sleep(0.5)
            return
        # Not of a partition revoked meanwhile (its new owner reads it from the committed
        # offset), nor of one the listener has not taken up yet (read again once it has).
        taken = await self._holes.take(consumer, batch)
        now = time.monotonic()
        for tp, records in taken.items():
            tasks = self._tasks.setdefault(tp, {})
            for record in records:
                self._tracker.handed_out(tp, record.offset)
                info = _InFlight(tp.partition, record.offset, now)
                task = asyncio.create_task(self._handle(tp, record, info))
                tasks[task] = info
                task.add_done_callback(functools.partial(_discard, tasks))

    async def _fetched(
        self, fetching: asyncio.Future[Any], stop: asyncio.Event | asyncio.Future[Any]
    ) -> bool:
        """Whether a getmany finished before `stop` was set (or this task was cancelled).

        One that did not is left running, never cancelled while its consumer lives: aiokafka
        counts a fetch under way in a context that a cancellation leaves open, which turns
        its max_poll_interval watchdog off for good. It is cancelled once the worker's
        consumers are stopped, and what it returns is never handed out, so never committed.
        """
        try:
            await _done_unless_stopped(fetching, stop)
        finally:
            if not fetching.done():
                fetching.add_done_callback(retrieved)
                self._abandoned_fetches.append(fetching)
        return fetching.done()

    def _watch(self) -> None:
        """The age of the oldest event in flight, for the gauge."""
        now = time.monotonic()
        ages = (now - info.since for tasks in self._tasks.values() for info in tasks.values())
        oldest = max(ages, default=0.0)
        metrics.OLDEST_IN_FLIGHT.set(oldest)

    async def _commit(self, only: Iterable[TopicPartition] | None = None) -> None:
        assert self._consumer is not None
        # A mark waits while its outcome is not in the ledger yet (a record given up after
        # its send; the claim renewer writes it): the ledger ignores a mark of an unsettled
        # row, and the mark would be lost.
        published = [(e, a) for e, a in self._unmarked.items() if e not in self._unrecorded]
        if published:
            # Losing these marks in a crash only means a redelivered event's status is
            # published again (same status_id), never a second email. Ids acknowledged
            # while the marks are written wait for the next commit, as do all of them
            # while the ledger is away: the offsets are committed all the same.
            try:
                async with asyncio.timeout(COMMIT_TIMEOUT):
                    await self._ledger.mark_published(published)
            except MARK_ERRORS as exc:
                metrics.LEDGER_MARK_FAILURES.inc()
                log.warning("status marks not written yet: %s", type(exc).__name__)
            else:
                for event_id, attempt in published:
                    if self._unmarked.get(event_id) == attempt:
                        del self._unmarked[event_id]
        offsets = self._tracker.committable()
        if only is not None:
            keep = set(only)
            offsets = {tp: off for tp, off in offsets.items() if tp in keep}
        if not offsets:
            return
        try:
            async with asyncio.timeout(COMMIT_TIMEOUT):
                await self._consumer.commit(offsets)
        except (KafkaError, TimeoutError) as exc:
            # Not fatal: the records are redelivered and the ledger stops a second send.
            log.warning("offset commit failed: %s", type(exc).__name__)
            return
        self._tracker.mark_committed(offsets)

    async def _measure_backlog(self, consumer: AIOKafkaConsumer) -> None:
        """The backlog gauge: for this worker's partitions, the records up to the end of
        each not taken yet, plus the records in flight. The end is the later of the last
        fetch's high watermark (open transactions' records included) and the end offset
        the broker last gave (`_ask_end_offsets`, the last stable offset: a full worker
        fetches nothing new). A partition whose end is not known yet counts
        once it is."""
        waiting = 0
        for tp in list(consumer.assignment()):
            if tp not in consumer.assignment():
                continue  # revoked while this awaited
            end = max(consumer.highwater(tp) or 0, self._ends.get(tp, 0))
            if not end:
                continue
            try:
                # Known once a fetch answered or the partition was assigned: no request.
                async with asyncio.timeout(END_OFFSETS_TIMEOUT):
                    taken = await consumer.position(tp)
            except (KafkaError, TimeoutError):
                continue  # revoked meanwhile, or not known after all: next time
            waiting += max(0, end - taken)
        metrics.BACKLOG.set(waiting + self._tracker.in_flight)

    async def partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        """Let go of revoked partitions, finish their in-flight work (bounded), commit."""
        self._holes.revoked(revoked)  # first, before any wait: none is handed out now
        pending = [task for tp in revoked for task in self._tasks.get(tp, ())]
        try:
            if pending:
                # Abandoned after that: redelivered to the new owner, the ledger decides.
                await _ended_or_cancelled(pending, self._config.workers.grace_period)
            await self._commit(revoked)
        finally:
            self._tracker.forget(revoked)
            for tp in revoked:
                self._tasks.pop(tp, None)
        log.info("partitions revoked", extra={"partitions": len(revoked)})

    async def _drain_and_close(self) -> None:
        self._stopping = True
        pending = [task for tasks in self._tasks.values() for task in tasks]
        if pending:
            await _ended_or_cancelled(pending, self._grace_left())
        if self._consumer is not None:
            with contextlib.suppress(KafkaError, OSError):
                await self._commit()
            self._close("consumer", self._consumer.stop)
        if self._producer is not None:
            self._close("producer", self._producer.stop)
        await self._closed()
        for fetching in self._abandoned_fetches:
            # Their consumers are closed, or left to the process's end: the fetch context
            # no longer matters.
            fetching.cancel()
        log.info("worker stopped", extra={"worker": self.worker_id})

    def _close(self, what: str, stop: Callable[[], Awaitable[None]]) -> None:
        """Start stopping a Kafka client; `_closed` waits for every one started."""
        self._closings[_stopping(stop)] = what

    async def _closed(self) -> None:
        """Wait for the clients being stopped, CLOSE_TIMEOUT at most (`closed_in_time`)."""
        await closed_in_time(self._closings)
        self._closings.clear()

    async def _handle(self, tp: TopicPartition, record: Any, info: _InFlight) -> None:
        # One member's notices are sent in the order they were published: a record waits
        # for the previous record with the same key (the member id) to finish. A record
        # without a key is refused (missing_key): it has no order to keep.
        key: bytes | None = record.key
        previous = self._by_key.get(key) if key else None
        current = asyncio.current_task()
        assert current is not None
        if key:
            self._by_key[key] = current
        try:
            published = await self._attempts(tp, record, info, previous)
        finally:
            if key and self._by_key.get(key) is current:
                del self._by_key[key]
        if published:
            self._tracker.mark_done(tp, record.offset)
            self._slot_freed.set()

    async def _attempts(
        self,
        tp: TopicPartition,
        record: Any,
        info: _InFlight,
        previous: asyncio.Task[None] | None,
    ) -> bool:
        """Run the record until it is accounted for: a record left half-done would hold its
        partition's commits until a restart. An attempt that fails, or that outlives
        `stuck_after` (every step has its own timeout, so something hung), is reported and
        run again; the send ledger and the bounce gate decide what a second attempt sends
        (at most one more email, as after a crash). Attempts failing with the same bug
        GIVE_UP_AFTER times in a row end it (`_give_up`)."""
        limit = self._config.workers.stuck_after
        failures = 0
        bug: type[BaseException] | None = None
        bugs = 0  # attempts in a row that failed with `bug`
        while True:
            started = time.monotonic()
            deadline = asyncio.timeout(limit if limit > 0 else None)
            try:
                async with deadline:
                    if previous is not None and not previous.done():
                        info.stage = "ordering"  # after the member's previous notice
                        await asyncio.wait([previous])
                    if bugs >= GIVE_UP_AFTER:
                        assert bug is not None
                        return await self._give_up(tp, record, info, bug)
                    return await self._process(tp, record, info)
            except (Exception, asyncio.CancelledError) as exc:
                if isinstance(exc, TimeoutError) and deadline.expired():
                    self._report_stuck(info, time.monotonic() - started)
                    continue
                if isinstance(exc, asyncio.CancelledError) and _being_cancelled():
                    raise  # this record's task is being cancelled (revoked, stopping)
                # Anything else, a cancellation or timeout meant for something this attempt
                # awaited included, is a failure: otherwise the record would end here with
                # no status and no log line.
                failures += 1
                if bugs < GIVE_UP_AFTER:  # giving up: what fails then is only tried again
                    if not isinstance(exc, BUG_ERRORS):
                        bug, bugs = None, 0
                    elif type(exc) is bug:
                        bugs += 1
                    else:
                        bug, bugs = type(exc), 1
                log.exception(
                    "record could not be accounted for; trying again",
                    extra={"partition": tp.partition, "offset": record.offset},
                )
                await asyncio.sleep(backoff_delay(failures))

    def _report_stuck(self, info: _InFlight, seconds: float) -> None:
        metrics.STUCK.labels(info.stage).inc()
        log.warning(
            "event in flight too long; trying again",
            extra={
                "partition": info.partition,
                "offset": info.offset,
                "event_id": info.event_id,
                "stage": info.stage,
                "seconds": round(seconds, 1),
            },
        )

    async def _give_up(
        self, tp: TopicPartition, record: Any, info: _InFlight, bug: type[BaseException]
    ) -> bool:
        """Account for a record whose attempts failed with the same bug GIVE_UP_AFTER times,
        so its partition moves on.

        The status it was reporting goes out, without its source time (the record's own
        metadata may be what failed). Without one, its event's outcome as this worker sent
        it or as the ledger recorded it: an event already sent is never reported failed.
        A status of the attempt its event's ledger row settles is marked published, as on
        the other paths, so a later copy does not publish it again. Otherwise nothing was
        sent: the record is parked (internal_error), for a replay once the bug is fixed, and
        reported failed; that status settles no ledger row (the replay claims the event), so
        it is not marked.
        """
        info.stage = "give_up"
        metrics.RECORDS_GIVEN_UP.inc()
        log.error(
            "record failed the same way %d times; given up",
            GIVE_UP_AFTER,
            extra={
                "partition": tp.partition,
                "offset": record.offset,
                "event_id": info.event_id,
                "error": bug.__name__,
            },
        )
        if info.status is not None:
            outcome, event_key, attempt = info.status
            await self._publish_status(outcome, event_key, attempt, None, settled=info.settled)
            return True
        event_id = info.event_id
        if event_id is not None:
            sent = self._unrecorded.get(event_id)
            if sent is not None:
                # The claim renewer writes it to the ledger now that its task is done.
                await self._report(sent[0], event_id, sent[1], None, info, settled=True)
                return True
            entry = await self._ledger.get(event_id)
            if entry is not None and entry.state is LedgerState.FINAL and not entry.withheld:
                return await self._republish(entry, None, info)
        position = SourcePosition(topic=tp.topic, partition=tp.partition, offset=record.offset)
        failed = EventOutcome(event_id, Outcome.FAILED, ReasonCode.INTERNAL_ERROR, 0.0)
        await self._park_once(failed, record.value, record.key, position, info)
        await self._publish_status(failed, event_id or position.key(), 1, None, info)
        return True

    async def _process(self, tp: TopicPartition, record: Any, info: _InFlight) -> bool:
        info.stage = "input"  # validation, or a dead letter for bad input
        start = time.perf_counter()
        position = SourcePosition(topic=tp.topic, partition=tp.partition, offset=record.offset)
        value: bytes | None = record.value
        key: bytes | None = record.key
        if not value:
            outcome = EventOutcome(None, Outcome.REJECTED, ReasonCode.EMPTY_VALUE, 0.0)
            return await self._reject(outcome, value, key, position, record.timestamp, info)
        if not key:
            checked = self._pipeline.validate(value, start)
            event_id = checked.event_id
            outcome = EventOutcome(event_id, Outcome.REJECTED, ReasonCode.MISSING_KEY, 0.0)
            return await self._reject(outcome, value, key, position, record.timestamp, info)
        checked = self._pipeline.validate(value, start)
        if isinstance(checked, EventOutcome):
            return await self._reject(checked, value, key, position, record.timestamp, info)
        event_id = info.event_id = checked.event_id
        withheld = self._pipeline.withheld(checked, start)
        if withheld is not None:
            return await self._withhold(checked, withheld, record.timestamp, info)
        elsewhere = 0
        while True:
            # The same event id, published twice, may be sending in this worker right now:
            # looked at before and after every claim, whatever the ledger says of the owner.
            running = self._sending.get(event_id)
            if running is None:
                if event_id in self._unrecorded:
                    # Sent by an earlier attempt here, its outcome not in the ledger yet
                    # (the store was away, or the attempt was given up): recorded now,
                    # never sent again.
                    with self._holding(event_id):
                        await self._record_sent(event_id, record.timestamp, info)
                    return True
                info.stage = "claim"
                # Without a bounce service nobody resends a deferred notice: a copy the
                # claims system publishes again is its retry, and is sent.
                retry_deferred = self._bounces is None
                claim = await self._ledger.claim(
                    event_id, self.worker_id, retry_deferred=retry_deferred
                )
                if claim.kind is ClaimKind.IN_FLIGHT and event_id not in self._sending:
                    # Ours but not running: left over from an attempt that failed or was
                    # cancelled here (not a crash resend, so not counted as one).
                    claim = await self._ledger.claim(
                        event_id, self.worker_id + AGAIN, retry_deferred=retry_deferred
                    )
                if claim.kind is ClaimKind.ELSEWHERE:
                    # A live worker is sending it (it lost the partition, or the claims
                    # system published a second copy under another key): its outcome
                    # decides; until then, look again.
                    metrics.CLAIM_WAITS.inc()
                    elsewhere += 1
                    await asyncio.sleep(backoff_delay(elsewhere, base=0.5, cap=5.0))
                    continue
                running = self._sending.get(event_id)
                if running is None:
                    break
            info.stage = "same_event"
            await asyncio.shield(running)
        if claim.kind is ClaimKind.DONE:
            assert claim.entry is not None
            info.stage = "publish"
            return await self._republish(claim.entry, record.timestamp, info)
        # A crash resend takes over another incarnation's claim; this worker's own "-again"
        # claim (an attempt tried here once more) is not one.
        previous_owner = claim.entry.owner if claim.entry is not None else ""
        crashed = claim.entry is not None and claim.entry.state is not LedgerState.FINAL
        if (
            claim.kind is ClaimKind.RETRY
            and crashed
            and not previous_owner.startswith(self.worker_id)
        ):
            metrics.RESENDS.inc()
        with self._holding(event_id):
            info.stage = "deliver"
            outcome = await self._pipeline.deliver(checked, start, raw=value)
            attempt = 1 if claim.entry is None else claim.entry.attempts + 1
            self._unrecorded[event_id] = (outcome, attempt)
            await self._record_sent(event_id, record.timestamp, info)
        return True

    @contextlib.contextmanager
    def _holding(self, event_id: str) -> Iterator[None]:
        """This worker is sending or recording the event: other copies of it wait, and
        its claim is renewed."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sending[event_id] = future
        try:
            yield
        finally:
            # Waiters (the same event published twice) look again only once all is recorded.
            self._sending.pop(event_id, None)
            future.set_result(None)

    async def _record_sent(self, event_id: str, source_ms: int | None, info: _InFlight) -> None:
        """The outcome of a send (in `_unrecorded` until the ledger has it), then its status."""
        outcome, attempt = self._unrecorded[event_id]
        info.stage = "record"
        await self._finish(event_id, outcome)
        self._unrecorded.pop(event_id, None)
        if self._unmarked.get(event_id) == attempt:
            # Reported already: its first record was given up once sent (`_give_up`), and
            # this is a copy of the event.
            self.duplicates_skipped += 1
            metrics.DUPLICATES.inc()
            return
        await self._report(outcome, event_id, attempt, source_ms, info, settled=True)

    async def _withhold(
        self, event: EobIssued, held: EventOutcome, source_ms: int | None, info: _InFlight
    ) -> bool:
        """A copy without the member's e-delivery consent: held, nothing sent, so never
        claimed. The ledger then keeps no copy carrying consent from being claimed and sent
        (attempt 1, as any event); a copy of an event such a copy settled, or is sending,
        is a duplicate of it. Each held copy is audited and reported, under the same
        status_id."""
        assert held.event_id is not None
        if await self._reported_by_another_copy(held.event_id, source_ms, info):
            return True
        await self._pipeline.record_withheld(event)
        await self._report(held, held.event_id, 1, source_ms, info)
        return True

    async def _reported_by_another_copy(
        self, event_id: str, source_ms: int | None, info: _InFlight
    ) -> bool:
        """Whether another copy of the event settled it (its recorded status is published
        again if it is not out yet) or is sending it (that copy reports it): this record is
        then a duplicate, and reports nothing of its own."""
        info.stage = "claim"
        entry = await self._ledger.get(event_id)
        if entry is None or entry.withheld:
            return False
        if entry.state is LedgerState.FINAL:
            info.stage = "publish"
            return await self._republish(entry, source_ms, info)
        self.duplicates_skipped += 1  # its sending copy reports it
        metrics.DUPLICATES.inc()
        return True

    async def _republish(self, entry: LedgerEntry, source_ms: int | None, info: _InFlight) -> bool:
        # Skipped only if this very attempt's status is out: a status of an earlier attempt
        # here (taken over since, by a worker that died before publishing) is not it.
        if entry.status_published or self._unmarked.get(entry.event_id) == entry.attempts:
            self.duplicates_skipped += 1
            metrics.DUPLICATES.inc()
            return True
        outcome = EventOutcome(
            entry.event_id,
            Outcome(entry.outcome or Outcome.FAILED),
            ReasonCode(entry.reason or ReasonCode.INTERNAL_ERROR),
            0.0,
        )
        await self._publish_status(
            outcome, entry.event_id, entry.attempts, source_ms, info, settled=True
        )
        return True

    async def _reject(
        self,
        outcome: EventOutcome,
        value: bytes | None,
        key: bytes | None,
        position: SourcePosition,
        source_ms: int | None,
        info: _InFlight,
    ) -> bool:
        await self._park_once(outcome, value, key, position, info)
        # A bad copy (no key, or failing validation) of an event another copy settled: its
        # status stands, a rejection under the same event id would contradict it.
        if outcome.event_id is not None and await self._reported_by_another_copy(
            outcome.event_id, source_ms, info
        ):
            return True
        await self._publish_status(outcome, outcome.event_id or position.key(), 1, source_ms, info)
        return True

    async def _park_once(
        self,
        outcome: EventOutcome,
        value: bytes | None,
        key: bytes | None,
        position: SourcePosition,
        info: _InFlight,
    ) -> None:
        """Park the record and count its outcome, unless an earlier attempt did."""
        if not info.parked:
            await self._park(
                value, key, position, outcome.reason, outcome.field, event_id=outcome.event_id
            )
            info.parked = True
            self._pipeline.observe(outcome)

    async def _park(
        self,
        value: bytes | None,
        key: bytes | None,
        position: SourcePosition,
        reason: ReasonCode,
        field: str | None,
        *,
        event_id: str | None = None,
    ) -> None:
        """A refused record onto the dead-letter topic, acknowledged by Kafka (without its
        original's bytes if the topic refuses the whole letter)."""
        letter = dead_letter(
            value, key, reason=reason, field=field, event_id=event_id, source=position
        )

        def cut() -> bytes | None:
            smaller = without_original(letter)
            if smaller is letter:
                return None  # nothing to leave out
            metrics.DEAD_LETTERS_CUT.inc()
            return _letter_bytes(smaller)

        dlq_topic = self._config.kafka.dlq_topic
        await self._send(dlq_topic, dead_letter_key(key), _letter_bytes(letter), cut=cut)

    async def _record(
        self,
        outcome: EventOutcome,
        event_id: str,
        attempt: int,
        source_ms: int | None,
        info: _InFlight | None = None,
    ) -> None:
        """A final outcome kept in order: the ledger, the metrics, then the status event."""
        if info is not None:
            info.stage = "record"
        await self._finish(event_id, outcome)
        await self._report(outcome, event_id, attempt, source_ms, info)

    async def _report(
        self,
        outcome: EventOutcome,
        event_id: str,
        attempt: int,
        source_ms: int | None,
        info: _InFlight | None = None,
        *,
        settled: bool = False,
    ) -> None:
        """A recorded outcome into the metrics and the status topic."""
        self._pipeline.observe(outcome)
        if info is not None:
            info.stage = "publish"
        await self._publish_status(outcome, event_id, attempt, source_ms, info, settled=settled)

    async def _finish(self, event_id: str, outcome: EventOutcome) -> None:
        """The outcome into the ledger, however long its store is away: running the record
        again would find its claim and send a second copy. The status waits meanwhile.
        Stopping, an outcome still unwritten is left to the claim's lease (as after a
        crash), not allowed to hold the worker past its grace period."""
        stop = self._stop
        await until_written(
            lambda: self._ledger.finish(event_id, outcome.outcome, outcome.reason),
            what="send ledger",
            event_id=event_id,
            retries=metrics.LEDGER_FINISH_RETRIES,
            give_up=lambda: stop is not None and stop.is_set(),
        )

    async def _publish_status(
        self,
        outcome: EventOutcome,
        event_key: str,
        attempt: int,
        source_ms: int | None,
        info: _InFlight | None = None,
        *,
        settled: bool = False,
    ) -> None:
        """Publish a status event; `settled`: it is of the attempt the event's ledger row
        settles (`event_key` is its event id), marked published at the next commit and
        skipped meanwhile by a copy of the event here (`_republish`)."""
        if info is not None:
            info.status = (outcome, event_key, attempt)
            info.settled = settled
        value = status_record(outcome, event_key, attempt, self.worker_id, source_ms)
        await self._send(self._config.kafka.delivery_topic, event_key.encode(), value)
        if settled:
            self._unmarked[event_key] = attempt

    async def _send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes,
        *,
        cut: Callable[[], bytes | None] | None = None,
    ) -> None:
        """Produce one record, retrying until Kafka has it: a status or dead letter must be
        there before its offset may be committed. A record the topic refuses for itself
        (its size, a policy) is sent as `cut()` instead, if given and it has a smaller
        one: retrying the same bytes would hold the partition for ever."""
        assert self._producer is not None
        attempt = 0
        while True:
            try:
                await self._producer.send_and_wait(topic, value, key=key)
                return
            except KafkaError as exc:
                error = type(exc).__name__
                refused = isinstance(exc, RECORD_ERRORS)
                smaller = cut() if cut is not None and refused else None
                cut = None
                if smaller is not None:
                    log.warning(
                        "record refused by its topic; sending it cut",
                        extra={"topic": topic, "error": error},
                    )
                    value = smaller
                    continue
                attempt += 1
                if attempt % 20 == 1:
                    # A record its topic refuses as it is waits for the topic's settings to
                    # change (max.message.bytes, a policy): an operator's, so an error.
                    level = logging.ERROR if refused else logging.WARNING
                    what = "record refused by its topic" if refused else "publish failed"
                    log.log(
                        level,
                        f"{what}; retrying",
                        extra={"topic": topic, "error": error, "attempt": attempt},
                    )
                await asyncio.sleep(backoff_delay(attempt))


def _letter_bytes(letter: DeadLetter) -> bytes:
    return orjson.dumps(letter.model_dump(mode="json", by_alias=True))


async def open_bounces(
    config: Config,
    protection: ProtectionServices,
    publisher: Publisher,
    *,
    actor: str,
    create_key: bool = True,
    worker_id: str | None = None,
) -> BounceService:
    """The bounce service as configured (its store opened; close `service.store`).

    The VERP key is created on first use, unless not `create_key` (the bounce listener):
    then a missing key is a ConfigError, as a new one would open no return path. The bounce
    store records the keys' fingerprints: a ConfigError if it records others (another
    host's), or if a missing key would be made where it records one. The status events it
    writes name `worker_id` (default: `actor`) as their worker.
    """
    settings = config.bounces
    shared = verp_secrets(config)
    held = await hold_secrets(shared, create=create_key)
    # The current key signs; the previous ones still open what was signed with them.
    verp_keys = [VerpKey(int(secret.single_id), held.key(secret)) for secret in shared]
    store = await open_bounce_store(settings.store_url)
    if protection.escrow is not None:
        # The raw events kept for resends carry PHI: sealed at rest, as escrowed notices are.
        store.sealer = protection.escrow.keys
    delivery_topic = config.kafka.delivery_topic

    def status_of(decided: BounceOutcome) -> OutboxMessage:
        outcome = bounce_event_outcome(decided, 0.0)
        value = status_record(outcome, decided.event_id, 1, worker_id or actor, None)
        return OutboxMessage(delivery_topic, decided.event_id.encode(), value)

    return BounceService(
        store,
        publisher,
        rules=load_rules(settings.rules_file) if settings.rules_file else None,
        verp_keys=verp_keys,
        bounce_domain=settings.bounce_domain,
        verp_prefix=settings.verp_prefix,
        audit=protection.audit,
        # Keys the trail's references and the verification requests' ids (the same on
        # every host, as `portal_secrets` makes sure).
        reference_key=protection.audit_key if protection.audit is not None else None,
        actor=actor,
        topics=BounceTopics(
            settings.verification_topic, settings.paper_topic, settings.results_topic
        ),
        send_lease=dt.timedelta(seconds=settings.send_lease_seconds),
        payload_retention=dt.timedelta(hours=settings.payload_retention_hours),
        status_record=status_of,
    )


async def publish_acknowledged(
    producer: AIOKafkaProducer, topic: str, key: bytes, value: bytes
) -> None:
    """One record, acknowledged by Kafka within PUBLISH_TIMEOUT (else TimeoutError).

    Trouble with the topic alone raises TopicRefused, so the bounce service holds back
    only that topic's records: the producer waits up to its request timeout for a topic
    it does not know, which here ends after METADATA_TIMEOUT.
    """
    try:
        async with asyncio.timeout(PUBLISH_TIMEOUT):
            asked = time.time()
            try:
                async with asyncio.timeout(METADATA_TIMEOUT):
                    await producer.partitions_for(topic)
            except TimeoutError:
                if not metadata_heard_since(producer, asked):
                    raise  # the broker did not answer: its trouble, not the topic's
                raise TopicRefused("topic not known to the broker") from None
            await producer.send_and_wait(topic, value, key=key)
    except TOPIC_ERRORS as exc:
        raise TopicRefused(type(exc).__name__) from None
    except RECORD_ERRORS as exc:
        raise TopicRefused(type(exc).__name__, record_only=True) from None


class ProducerPublisher:
    """The bounce service's Publisher over a started Kafka producer (`publish_acknowledged`).

    A topic refused once is refused again at once for REFUSED_FOR seconds: each try at a
    topic the broker does not know waits METADATA_TIMEOUT, and the bounce service publishes
    while its shared transaction queue waits. Its records stay in the outbox for `tick`.
    """

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self._producer = producer
        self._refused: dict[str, float] = {}  # topic: until when (monotonic)

    async def publish(self, topic: str, key: bytes, value: bytes) -> None:
        """Produce one record and wait until Kafka has it."""
        until = self._refused.get(topic)
        if until is not None:
            if time.monotonic() < until:
                raise TopicRefused("topic refused a moment ago")
            del self._refused[topic]
        try:
            await publish_acknowledged(self._producer, topic, key, value)
        except TopicRefused as refused:
            if not refused.record_only:
                self._refused[topic] = time.monotonic() + REFUSED_FOR
            raise


def dsn_handler(
    service: BounceService, producer: AIOKafkaProducer
) -> Callable[[bytes, str], Awaitable[DsnReport]]:
    """The bounce listener's handler: apply a DSN, then publish the notice's new status
    (the record the service's outbox would carry: `open_bounces`)."""
    record = service.status_record
    assert record is not None, "a service from open_bounces"

    async def handle(raw: bytes, envelope_to: str) -> DsnReport:
        report = await service.on_dsn(raw, envelope_to)
        for result in report.results:
            # The notice's status changed after its delivery status was published.
            status = record(result.outcome)
            await producer.send_and_wait(status.topic, status.value, key=status.key)
        return report

    return handle


class _LateBound:
    """A Publisher that forwards to the worker once it exists (they need each other)."""

    target: Publisher | None = None

    async def publish(self, topic: str, key: bytes, value: bytes) -> None:
        assert self.target is not None
        await self.target.publish(topic, key, value)


async def run_worker(config: Config, index: int, stop: asyncio.Event) -> None:
    """Build the pipeline, the ledger and the worker, and run until `stop` is set."""
    # From the start: until set the gauge reads 0, which the alert and dashboard leave out,
    # so a worker still building its pipeline would not count as waiting for Kafka.
    metrics.KAFKA_ANSWERED.set(time.time())
    worker_id = new_worker_id(index)
    fetch = config.protection.mta_sts_fetch
    # Fetched MTA-STS policies, beside the ledger: what the other workers (and this one
    # before a restart) fetched holds when a refresh fails (RFC 8461 section 5.1).
    sts_store = await open_sts_store(config.ledger.url) if fetch else None
    try:
        transport = await Transport.open(
            config.transport, config.shaping, mta_sts_fetch=fetch, mta_sts_store=sts_store
        )
    except BaseException:
        if sts_store is not None:
            await sts_store.close()
        raise
    ledger = await open_ledger(config.ledger.url)
    protection = await ProtectionServices.open(config)
    publisher = _LateBound()
    bounces = None
    if config.bounces.enabled:
        bounces = await open_bounces(
            config, protection, publisher, actor=f"worker-{index}", worker_id=worker_id
        )
    pipeline = Pipeline(
        config, transport, protection=protection, actor=f"worker-{index}", bounces=bounces
    )
    worker = Worker(config, pipeline, ledger, worker_id=worker_id, bounces=bounces)
    publisher.target = worker
    # What the other workers (and this one before a restart) learned of receivers' TLS.
    tls = TlsSync(protection.tls, await open_tls_store(config.ledger.url))
    await tls.sync()
    metrics.show_rejections_from_zero()
    sharing = asyncio.create_task(tls.run(stop, config.protection.tls_sync_seconds))
    settle_heap()
    try:
        await worker.run(stop)
    finally:
        stop.set()  # the worker is done (or failed): the sharing loop ends after its round
        try:
            await sharing
            await tls.close()  # a last round: what this worker learned outlives it
        except Exception as exc:
            log.warning("TLS knowledge not saved at stop: %s", type(exc).__name__)
        await transport.aclose()  # and the MTA-STS policy store
        await ledger.close()
        await protection.close()
        if bounces is not None:
            await bounces.store.close()

"""Kafka-fed workers against a real broker (Tansu), the sandbox, and the send ledger."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import email
import email.policy
import functools
import hashlib
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import aiosmtplib
import httpx
import orjson
import pytest
import tomli_w
from aiokafka import AIOKafkaConsumer  # type: ignore[import-untyped]
from cryptography.hazmat.primitives.asymmetric import rsa
from prometheus_client.parser import text_string_to_metric_families

from eobblast import worker as worker_module
from eobblast.bounces.service import BounceService, TopicRefused
from eobblast.bounces.state import EobStatus
from eobblast.bounces.store import BounceStore, StoreBusy, open_bounce_store
from eobblast.config import Config, load_config
from eobblast.demo import member_key, prepare_keys
from eobblast.events.schema import MAX_EVENT_BYTES
from eobblast.events.status import DeadLetter, DeliveryStatus, status_id
from eobblast.events.synthetic import PAYERS
from eobblast.events.verification import (
    AddressVerificationFailed,
    AddressVerified,
    FailureReason,
    VerificationChannel,
    dump,
)
from eobblast.observe import metrics
from eobblast.observe.audit import AuditAction, AuditError, AuditRecord, AuditTrail, open_audit
from eobblast.observe.metrics import REGISTRY
from eobblast.pipeline import Pipeline
from eobblast.protect import dkim
from eobblast.protect.escrow import EscrowStore
from eobblast.protect.services import ProtectionServices
from eobblast.protect.testcerts import MemberCertificates
from eobblast.sandbox import Behaviour, Sandbox, make_test_pki
from eobblast.state import (
    Claim,
    ClaimKind,
    LedgerEntry,
    LedgerState,
    SendLedger,
    open_ledger,
)
from eobblast.state import ledger as ledger_module
from eobblast.state.ledger import PURGE_BATCH
from eobblast.streams import EmbeddedBroker, TopicPartition, make_consumer, make_producer
from eobblast.streams.kafka import PLAINTEXT, ReadAgain, RebalanceListener, read_to_end
from eobblast.supervisor import Supervisor
from eobblast.worker import Worker, new_worker_id, open_bounces
from tests.conftest import service_logging, splice, throwaway_pg_schema
from tests.integration.worker_stack import (
    Stack,
    accept_domains,
    distinct_final,
    prepare,
    read_topic,
    sandbox_stack,
    start_eobblast_run,
    start_worker,
    statuses,
    until,
)
from tests.kafka_fixtures import ApiVersionsShim, free_port


@pytest.fixture
def pg_ledger_url() -> Iterator[str]:
    """A fresh schema on the machine's PostgreSQL, dropped afterwards (skips without one)."""
    with throwaway_pg_schema("worker") as url:
        yield url


HARD_REJECT = "reject-hard-"


@pytest.fixture
async def stack(
    broker: EmbeddedBroker,
    tmp_path: Path,
) -> AsyncIterator[Stack]:
    async with _stack_on(broker, tmp_path) as built:
        yield built


@contextlib.asynccontextmanager
async def _stack_on(broker: EmbeddedBroker, tmp_path: Path) -> AsyncIterator[Stack]:
    # Recipients whose local part starts with "reject-hard-" are refused (550 5.1.1).
    rules = ((HARD_REJECT, Behaviour.REJECT),)
    domains = [replace(d, recipient_rules=rules) for d in accept_domains(20)]
    async with sandbox_stack(broker, tmp_path, domains) as built:
        yield built


@pytest.fixture
async def own_stack(tmp_path: Path) -> AsyncIterator[Stack]:
    """A stack on a broker of its own: the session's broker has served every test before
    it, and the crash test's 20,000 events and rebalances should not depend on that."""
    async with (
        EmbeddedBroker(log_dir=tmp_path / "tansu") as broker,
        _stack_on(broker, tmp_path) as built,
    ):
        yield built


async def test_worker_delivers_reports_and_commits(stack: Stack) -> None:
    values = stack.events(150)
    await stack.publish(values)
    config = stack.config()
    _, stop, task = await start_worker(config)
    records = await read_topic(stack.broker.bootstrap, stack.delivery_topic, until=150)
    stop.set()
    await asyncio.wait_for(task, 30)
    grouped = statuses(records)
    assert len(grouped) == 150
    assert set(distinct_final(grouped).values()) == {1}
    delivered = [s[0] for s in grouped.values() if s[0].status == "delivered"]
    assert len(delivered) == 150 == sum(stack.sandbox.counts.values())
    assert all(s.tls_version in ("TLSv1.2", "TLSv1.3") for s in delivered)
    assert all(s.source_timestamp is not None for s in delivered)
    # Offsets were committed behind the outcomes: a new worker in the group finds nothing.
    _, stop2, task2 = await start_worker(config, 1)
    await asyncio.sleep(4)
    stop2.set()
    await asyncio.wait_for(task2, 30)
    assert sum(stack.sandbox.counts.values()) == 150
    assert (
        len(await read_topic(stack.broker.bootstrap, stack.delivery_topic, until=151, seconds=3))
        == 150
    )


async def test_poison_input_is_parked_and_the_worker_goes_on(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="eobblast")
    good = stack.events(2, seed=9)
    poison = [
        (b"member-1", b"this is not json"),
        (b"member-2", orjson.dumps({"schema": "eob.issued/v9", "event_id": "e-wrong"})),
        (b"member-3", b'{"event_id": "' + b"x" * (10 * 1024 * 1024) + b'"}'),
        (b"", good[0]),
        (b"member-5", b'{"event_id": "\xff\xfe"}'),
        (b"member-6", b""),
    ]
    await stack.publish([v for _, v in poison] + [good[1]], keys=[k for k, _ in poison] + [b"m7"])
    _, stop, task = await start_worker(stack.config())
    status_records = await read_topic(stack.broker.bootstrap, stack.delivery_topic, until=7)
    dlq_records = await read_topic(stack.broker.bootstrap, stack.dlq_topic, until=6)
    stop.set()
    await asyncio.wait_for(task, 30)
    letters = [DeadLetter.model_validate_json(v) for _, v in dlq_records]
    reasons = sorted(str(letter.reason) for letter in letters)
    assert reasons == sorted(
        [
            "invalid_json",
            "unsupported_schema",
            "event_too_large",
            "missing_key",
            "invalid_utf8",
            "empty_value",
        ]
    )
    # Each one logged once, under the reason it is parked and counted with: the record
    # without a key is a valid event, and says missing_key, not what validation said.
    logged = [r for r in caplog.records if r.getMessage() == "event rejected"]
    assert sorted(str(getattr(r, "reason", None)) for r in logged) == reasons
    by_reason = {str(letter.reason): letter for letter in letters}
    assert base64.b64decode(by_reason["invalid_json"].original_base64) == b"this is not json"
    big = by_reason["event_too_large"]
    assert big.truncated and big.original_size > 10 * 1024 * 1024
    # A prefix as large as the largest event accepted: the dead letter fits a DLQ topic
    # with Apache Kafka's default max.message.bytes (1 MiB).
    assert len(base64.b64decode(big.original_base64)) == MAX_EVENT_BYTES
    assert max(len(v) for _, v in dlq_records) < 1_000_000
    assert by_reason["unsupported_schema"].event_id == "e-wrong"
    grouped = statuses(status_records)
    assert len(grouped) == 7
    # the good event after all the poison was delivered
    assert sum(stack.sandbox.counts.values()) == 1


async def test_records_stamped_in_microseconds_or_nanoseconds_are_accounted_for_once(
    stack: Stack,
) -> None:
    # A claims system whose producer sets CreateTime in microseconds (Kafka takes far-future
    # timestamps): building the status raised after the send or the dead letter, and the
    # record was tried again for ever: a dead letter each time, its partition never committed.
    sent, rejected = stack.events(2, seed=23)
    now_ms = int(time.time() * 1000)
    records = [
        (member_key(sent), sent, now_ms * 1000),
        (b"M-unreadable", b"not json", now_ms * 1000),
        (member_key(rejected), rejected, now_ms * 1_000_000),
    ]
    producer = make_producer(stack.broker.bootstrap, client_id="claims", security=PLAINTEXT)
    await producer.start()
    try:
        for key, value, stamp in records:
            await producer.send_and_wait(stack.events_topic, value, key=key, timestamp_ms=stamp)
    finally:
        await producer.stop()
    config = stack.config()
    _, stop, task = await start_worker(config)
    try:
        found = await read_topic(stack.broker.bootstrap, stack.delivery_topic, until=3, seconds=30)
        await asyncio.sleep(1.0)  # time for attempts tried again, and for commits
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    grouped = statuses(found)
    assert len(grouped) == 3, f"statuses for {sorted(grouped)}"
    assert set(distinct_final(grouped).values()) == {1}
    assert all(s.source_timestamp is None for items in grouped.values() for s in items)
    assert sorted(items[0].status for items in grouped.values()) == [
        "delivered",
        "delivered",
        "rejected",
    ]
    assert sum(stack.sandbox.counts.values()) == 2
    letters = await read_topic(stack.broker.bootstrap, stack.dlq_topic, until=2, seconds=3)
    assert len(letters) == 1
    ends = await _end_offsets(stack.broker.bootstrap, stack.events_topic)
    committed = await _committed_offsets(
        stack.broker.bootstrap, config.kafka.group_id, stack.events_topic, list(ends)
    )
    assert committed == {p: end for p, end in ends.items() if end}


async def test_a_rejected_record_run_again_is_parked_and_counted_once(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its status failed after its dead letter was on the DLQ: every attempt run again parked
    # (and counted) another.
    status_record = worker_module.status_record
    bugs = [ValueError("a status that cannot be built, once")]

    def failing_once(outcome: Any, *args: Any) -> bytes:
        if outcome.outcome == "rejected" and bugs:
            raise bugs.pop()
        return status_record(outcome, *args)

    monkeypatch.setattr(worker_module, "status_record", failing_once)
    rejected = _sample("eobblast_events_total", outcome="rejected", reason="invalid_json")
    await stack.publish([b"not json"], keys=[b"M-unreadable"])
    _, stop, task = await start_worker(stack.config())
    try:
        found = await read_topic(stack.broker.bootstrap, stack.delivery_topic, until=1)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    assert not bugs and len(found) == 1
    letters = await read_topic(stack.broker.bootstrap, stack.dlq_topic, until=2, seconds=3)
    assert len(letters) == 1
    assert _sample("eobblast_events_total", outcome="rejected", reason="invalid_json") == (
        rejected + 1
    )


async def test_a_bad_copy_of_an_event_already_sent_is_parked_without_a_second_status(
    stack: Stack,
) -> None:
    # A copy republished without its key, or one that fails validation but carries the
    # event's id, was reported rejected under that id: two final statuses for one event.
    (value,) = stack.events(1, seed=26)
    doc = orjson.loads(value)
    event_id = doc["event_id"]
    doc["unexpected"] = True
    invalid = orjson.dumps(doc)
    worker, stop, task = await start_worker(stack.config())
    topic = (stack.broker.bootstrap, stack.delivery_topic)
    try:
        await stack.publish([value])
        await read_topic(*topic, until=1)
        await stack.publish([value, invalid], keys=[b"", member_key(value)])
        letters = await read_topic(stack.broker.bootstrap, stack.dlq_topic, until=2)
        found = await read_topic(*topic, until=2, seconds=3)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    parked = sorted(
        (str(letter.reason), letter.event_id)
        for letter in (DeadLetter.model_validate_json(v) for _, v in letters)
    )
    assert parked == [("missing_key", event_id), ("unknown_field", event_id)]
    grouped = statuses(found)
    assert list(grouped) == [event_id]
    assert {s.status for s in grouped[event_id]} == {"delivered"}
    assert worker.duplicates_skipped == 2
    assert sum(stack.sandbox.counts.values()) == 1


async def test_a_dead_letter_its_topic_refuses_whole_is_parked_without_the_original(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The worker's producer takes records up to 64 KiB, as a DLQ topic whose max.message.bytes
    # is 64 KiB would: before, the worker retried the same dead letter for ever and the
    # partition behind it stopped.
    monkeypatch.setattr(
        worker_module, "make_producer", functools.partial(make_producer, max_request_size=65536)
    )
    cut_before = REGISTRY.get_sample_value("eobblast_dead_letters_cut_total") or 0.0
    poison = b"{" + b"x" * (200 * 1024)  # not JSON, under the 256 KiB event limit
    good = stack.events(1, seed=12)
    await stack.publish([poison, good[0]], keys=[b"member-1", b"member-2"])
    _, stop, task = await start_worker(stack.config())
    status_records = await read_topic(stack.broker.bootstrap, stack.delivery_topic, until=2)
    dlq_records = await read_topic(stack.broker.bootstrap, stack.dlq_topic, until=1)
    stop.set()
    await asyncio.wait_for(task, 30)
    [(_, value)] = dlq_records
    letter = DeadLetter.model_validate_json(value)
    assert str(letter.reason) == "invalid_json"
    assert letter.original_base64 == "" and letter.truncated
    assert letter.original_size == len(poison)
    assert letter.original_sha256 == hashlib.sha256(poison).hexdigest()
    assert letter.source.topic == stack.events_topic
    assert REGISTRY.get_sample_value("eobblast_dead_letters_cut_total") == cut_before + 1
    # The record after it was worked: its partition did not stop.
    grouped = statuses(status_records)
    assert sorted(s.status for items in grouped.values() for s in items) == [
        "delivered",
        "rejected",
    ]
    assert sum(stack.sandbox.counts.values()) == 1


async def test_a_notice_held_for_want_of_consent_goes_out_once_consent_comes(
    stack: Stack,
) -> None:
    # Held for no consent was final in the ledger: the claims system's copy published once
    # the member had consented got the old `held` status again, and no email.
    (value,) = stack.events(1, seed=61)
    doc = orjson.loads(value)
    doc["member"]["consent"]["electronic_delivery"] = False
    withheld = orjson.dumps(doc)
    doc["member"]["consent"]["electronic_delivery"] = True
    consented = orjson.dumps(doc)
    event_id = doc["event_id"]
    worker, stop, task = await start_worker(stack.config(), bounce_store_as=lambda store: store)
    topic = (stack.broker.bootstrap, stack.delivery_topic)

    async def statuses_of_event(count: int) -> list[DeliveryStatus]:
        async def seen() -> list[DeliveryStatus]:  # (read_topic counts keys: these share one)
            found = statuses(await read_topic(*topic, until=1)).get(event_id, [])
            return found if len(found) >= count else []

        found = await until(f"{count} statuses", seen, seconds=60, every=0.2)
        assert len(found) == count
        return found

    async def skipped(before: int) -> None:
        async def more() -> bool:
            return worker.duplicates_skipped > before

        await until("a duplicate skipped", more)

    try:
        # Twice without consent (a redelivery, or the claims system's second copy): held
        # each time, the same status, and nothing claimed in the ledger.
        await stack.publish([withheld, withheld])
        first, second = await statuses_of_event(2)
        assert (first.status, first.reason, first.attempt) == ("held", "no_consent", 1)
        assert second.status_id == first.status_id
        # Apart from the statuses of the send a copy with consent makes (attempt 1 too,
        # which the bounce service may hold for verification).
        assert first.status_id != status_id(event_id, "held", 1)
        assert await worker._ledger.get(event_id) is None
        assert sum(stack.sandbox.counts.values()) == 0
        # With consent now on file: sent, as the event's first attempt.
        await stack.publish([consented])
        sent = (await statuses_of_event(3))[-1]
        assert (sent.status, sent.attempt) == ("delivered", 1)
        # Copies after it, with consent or without, are duplicates: no second email.
        for copy in (consented, withheld):
            before = worker.duplicates_skipped
            await stack.publish([copy])
            await skipped(before)
        assert sum(stack.sandbox.counts.values()) == 1
        assert len(await statuses_of_event(3)) == 3
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def test_a_bad_copy_of_an_event_only_held_is_reported_rejected_and_a_good_one_still_sent(
    stack: Stack,
) -> None:
    # Held is not settled: nothing was sent. A copy the claims system publishes again
    # (once the member consented, say) that fails validation must be reported as such,
    # and a good copy after it is still sent, its status the event's latest.
    (value,) = stack.events(1, seed=62)
    doc = orjson.loads(value)
    event_id = doc["event_id"]
    doc["member"]["consent"]["electronic_delivery"] = False
    withheld = orjson.dumps(doc)
    doc["member"]["consent"]["electronic_delivery"] = True
    consented = orjson.dumps(doc)
    invalid = orjson.dumps({**doc, "unexpected": True})
    _, stop, task = await start_worker(stack.config())
    found: list[tuple[bytes | None, bytes]] = []

    async def all_three() -> bool:
        # One key (the event id) for all: read a while rather than until a count of keys.
        found[:] = await read_topic(
            stack.broker.bootstrap, stack.delivery_topic, until=2, seconds=1
        )
        return len(found) >= 3

    try:
        # One member's copies, handled in the order published.
        await stack.publish([withheld, invalid, consented])
        await until("three statuses", all_three, seconds=30)
        letters = await read_topic(stack.broker.bootstrap, stack.dlq_topic, until=1)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    grouped = statuses(found)
    assert list(grouped) == [event_id]
    assert [(s.status, s.attempt) for s in grouped[event_id]] == [
        ("held", 1),
        ("rejected", 1),
        ("delivered", 1),
    ]
    (letter,) = [DeadLetter.model_validate_json(v) for _, v in letters]
    assert (letter.reason, letter.event_id) == ("unknown_field", event_id)
    assert sum(stack.sandbox.counts.values()) == 1


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
async def test_republished_and_redelivered_events_are_sent_once(
    stack: Stack, store: str, request: pytest.FixtureRequest
) -> None:
    if store == "postgresql":
        stack.ledger_url = request.getfixturevalue("pg_ledger_url")
    values = stack.events(20, seed=4)
    # a claims system that publishes the same events twice (and one of them a third time)
    await stack.publish(values + values + values[:1])
    config = stack.config()
    worker, stop, task = await start_worker(config)
    records = await read_topic(stack.broker.bootstrap, stack.delivery_topic, until=20)
    await asyncio.sleep(1.0)
    stop.set()
    await asyncio.wait_for(task, 30)
    assert sum(stack.sandbox.counts.values()) == 20
    assert len(statuses(records)) == 20
    assert worker.duplicates_skipped == 21
    # Kafka redelivers everything to a new group: the ledger still says "sent", nobody resends.
    regroup = replace(config, kafka=replace(config.kafka, group_id=config.kafka.group_id + "-2"))
    worker2, stop2, task2 = await start_worker(regroup, 1)
    await asyncio.sleep(5)
    stop2.set()
    await asyncio.wait_for(task2, 30)
    assert sum(stack.sandbox.counts.values()) == 20
    assert worker2.duplicates_skipped == 41


async def test_two_workers_split_and_one_takes_over(stack: Stack) -> None:
    values = stack.events(1500, seed=5)
    await stack.publish(values)
    config = stack.config()
    first, stop1, task1 = await start_worker(config, 0)
    second, stop2, task2 = await start_worker(config, 1)
    await asyncio.sleep(6)  # both joined and working
    stop1.set()  # a worker leaves mid-run: it drains, commits, its partitions move
    await asyncio.wait_for(task1, 30)
    records = await read_topic(stack.broker.bootstrap, stack.delivery_topic, until=1500)
    stop2.set()
    await asyncio.wait_for(task2, 30)
    grouped = statuses(records)
    assert len(grouped) == 1500
    assert set(distinct_final(grouped).values()) == {1}
    workers = {items[0].worker for items in grouped.values()}
    assert workers == {first.worker_id, second.worker_id}
    received = sum(stack.sandbox.counts.values())
    assert 1500 <= received <= 1500 + stack.max_in_flight


class SlowToGiveUp(RebalanceListener):
    """A group member that, once armed, holds every rebalance for `hold` seconds, or until
    `released` is set."""

    def __init__(self, hold: float) -> None:
        self.hold = hold
        self.armed = False
        self.assignments = 0
        self.holding = asyncio.Event()  # a rebalance is being held
        self.released = asyncio.Event()  # the test has seen what it came for

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        if self.armed:
            self.holding.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.released.wait(), self.hold)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self.assignments += 1


async def _member(stack: Stack, config: Config, name: str, listener: Any) -> Any:
    consumer = make_consumer(
        stack.broker.bootstrap,
        config.kafka.group_id,
        [config.kafka.events_topic],
        client_id=name,
        max_poll_records=1,
        rebalance_listener=listener,
        session_timeout_ms=config.kafka.session_timeout_ms,
        heartbeat_interval_ms=config.kafka.heartbeat_interval_ms,
        rebalance_timeout_ms=120_000,
        security=PLAINTEXT,
    )
    await consumer.start()
    return consumer


async def _wind_down(
    stop: asyncio.Event, task: asyncio.Task[None], joining: asyncio.Task[Any] | None
) -> None:
    """Stop the worker and the member that joined, whatever state the test left them in."""
    stop.set()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(task, 90)
    if joining is not None:
        with contextlib.suppress(Exception):
            await (await asyncio.wait_for(joining, 90)).stop()


@pytest.mark.parametrize("when", ["running", "starting"])
async def test_a_worker_told_to_stop_during_a_rebalance_stops_within_its_grace(
    stack: Stack, caplog: pytest.LogCaptureFixture, when: str
) -> None:
    # Another member of the group takes 20 s to give its partitions up, so a rebalance
    # stays open that long. The worker, waiting for its partitions meanwhile (new ones
    # when running, its first ones when starting), is told to stop: it leaves within its
    # grace period rather than when the rebalance ends (as late as the holder's rebalance
    # timeout: its drain, and its last commit, would wait behind it).
    grace = 2.0
    config = stack.config(grace_period=grace)
    slow = SlowToGiveUp(hold=20.0)
    holder = await _member(stack, config, "slow-holder", slow)
    caplog.set_level(logging.INFO, logger="eobblast")
    joining: asyncio.Task[Any] | None = None
    slow.armed = when == "starting"
    _, stop, task = await start_worker(config)
    try:
        if when == "running":
            async with asyncio.timeout(30):
                while "worker started" not in caplog.text:  # noqa: ASYNC110 - a log line
                    await asyncio.sleep(0.1)
            slow.armed = True
            # A third member joins: a rebalance starts, the holder sits on its partitions.
            joining = asyncio.create_task(_member(stack, config, "joiner", None))
        await asyncio.wait_for(slow.holding.wait(), 30)
        await asyncio.sleep(2.0)  # the worker has given its partitions up and waits
        # The rebalance is still open: the holder has not had its partitions back.
        assert slow.assignments == (1 if when == "starting" else 2)
        stop.set()
        # The grace period, and a few seconds to leave the group and close the clients.
        stopped, _ = await asyncio.wait({task}, timeout=grace + 5.0)
    finally:
        slow.released.set()  # no need to sit out the rest of the hold
        await _wind_down(stop, task, joining)
        await holder.stop()
    assert stopped, "the worker waited for the rebalance to end"
    assert "worker stopped" in caplog.text
    assert ("worker started" in caplog.text) == (when == "running")


async def test_a_worker_whose_join_the_broker_holds_stops_within_its_grace(
    kcat_broker: tuple[EmbeddedBroker, ApiVersionsShim],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Apache Kafka answers a JoinGroup only once every member has joined again (or the
    # rebalance timeout, grace + ~30 s here, has passed). A worker told to stop while its
    # join waits leaves without the answer: closing its consumer would wait for it.
    running, shim = kcat_broker
    grace = 2.0
    async with _stack_on(running, tmp_path) as stack:
        settings = stack.settings(grace_period=grace)
        settings["kafka"]["bootstrap"] = shim.bootstrap
        config = load_config(environ={}, overrides=settings)
        caplog.set_level(logging.INFO, logger="eobblast")
        _, stop, task = await start_worker(config)
        joining: asyncio.Task[Any] | None = None
        try:
            async with asyncio.timeout(30):
                while "worker started" not in caplog.text:  # noqa: ASYNC110 - a log line
                    await asyncio.sleep(0.1)
            shim.holding_joins = True
            # Another member joins; the worker gives its partitions up and joins again.
            joining = asyncio.create_task(_member(stack, config, "joiner", None))
            async with asyncio.timeout(30):
                while shim.held < 2:  # noqa: ASYNC110 - the relay's counter
                    await asyncio.sleep(0.1)
            stop.set()
            stopped, _ = await asyncio.wait({task}, timeout=grace + 5.0)
        finally:
            stop.set()
            shim.release_joins()
            await _wind_down(stop, task, joining)
    assert stopped, "the worker waited for the broker's answer to its join"
    assert "worker stopped" in caplog.text
    late = [r for r in caplog.records if r.getMessage() == "Kafka client not closed in time"]
    assert [getattr(r, "client", None) for r in late] == ["consumer"]


async def test_a_producer_whose_broker_went_away_is_stopped_in_time(
    kcat_broker: tuple[EmbeddedBroker, ApiVersionsShim], caplog: pytest.LogCaptureFixture
) -> None:
    # What `eobblast bounces` does on SIGTERM: a status it had not got acknowledged, the
    # broker gone, kept the producer's stop waiting for its request timeout (40 s).
    running, shim = kcat_broker
    topic = "bounce-statuses"
    await running.create_topics({topic: 1})
    producer = make_producer(shim.bootstrap, client_id="listener", security=PLAINTEXT)
    await producer.start()
    await producer.send_and_wait(topic, b"taken", key=b"k")
    await shim.stop()  # the broker is away: connections dropped, none taken
    pending = await producer.send(topic, b"never taken", key=b"k")
    caplog.set_level(logging.WARNING, logger="eobblast")
    started = time.monotonic()
    await worker_module.stop_in_time("producer", producer.stop)
    assert time.monotonic() - started < worker_module.CLOSE_TIMEOUT + 1
    # The stop was still waiting for that record when it was left to the process's end.
    assert not pending.done()
    late = [r for r in caplog.records if r.getMessage() == "Kafka client not closed in time"]
    assert [getattr(r, "client", None) for r in late] == ["producer"]


async def test_a_bounce_tick_that_does_not_end_does_not_keep_a_stopping_worker(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    # A tick's resend under way, or a status its broker does not take, went on after stop
    # for as long as it lasted: the drain (and its grace period) waited behind it.
    grace = 2.0
    config = stack.config(grace_period=grace)
    caplog.set_level(logging.INFO, logger="eobblast")
    worker, stop, task = await start_worker(config, bounce_store_as=lambda store: store)
    ticking = asyncio.Event()

    async def endless_tick(*args: Any, **kwargs: Any) -> Any:
        ticking.set()
        await asyncio.sleep(3600)

    assert worker._bounces is not None
    worker._bounces.tick = endless_tick  # type: ignore[method-assign]
    try:
        await asyncio.wait_for(ticking.wait(), 30)
        stop.set()
        stopped, _ = await asyncio.wait({task}, timeout=grace + 5.0)
    finally:
        await _wind_down(stop, task, None)
    assert stopped, "the worker waited for its bounce tick"
    assert "worker stopped" in caplog.text


async def test_a_worker_told_to_stop_before_it_reached_the_broker_stops(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    # Nothing listens where the worker looks for its broker: it keeps trying until told to
    # stop, then stops at once (it has taken nothing).
    settings = stack.settings()
    settings["kafka"]["bootstrap"] = f"127.0.0.1:{free_port()}"
    config = load_config(environ={}, overrides=settings)
    caplog.set_level(logging.INFO, logger="eobblast")
    _, stop, task = await start_worker(config)
    await asyncio.sleep(1.5)
    assert not task.done()
    stop.set()
    stopped, _ = await asyncio.wait({task}, timeout=5.0)
    assert stopped, "the worker went on waiting for its broker"
    await task
    assert "worker stopped before the broker was reached" in caplog.text


async def test_broker_down_at_start_then_lost_mid_run(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    # The worker reaches the broker through a relay: stopping the relay cuts the worker off
    # (broker unreachable) while the broker keeps its data, as a real Kafka would.
    domains = accept_domains(21)
    pki = make_test_pki(tmp_path / "pki", [d.name for d in domains])
    prepare(tmp_path)
    broker_port = free_port()
    relay = ApiVersionsShim("127.0.0.1", broker_port)
    await relay.start()
    relay_port = relay.port
    await relay.stop()  # down at start: nothing listens where the worker looks
    own = EmbeddedBroker(port=broker_port, advertised_port=relay_port, log_dir=tmp_path)
    # The logging `eobblast run` sets up: every line it writes, aiokafka's included.
    with service_logging():
        sandbox, both = await _through_two_outages(domains, pki, tmp_path, own, relay, relay_port)
    lines = [orjson.loads(line) for line in capfd.readouterr().err.splitlines()]
    assert len(statuses(both)) == 60
    assert sum(sandbox.counts.values()) == 60
    assert any(
        "unreachable" in line["msg"] for line in lines if line["logger"] == "eobblast.streams.kafka"
    )
    # Once per interval, not once per attempt (aiokafka alone logged ~275 lines a second).
    assert len(lines) < 40, [line["msg"] for line in lines]
    assert any(line["logger"].startswith("aiokafka") for line in lines)


async def _through_two_outages(
    domains: list[Any],
    pki: Any,
    tmp_path: Path,
    own: EmbeddedBroker,
    relay: ApiVersionsShim,
    relay_port: int,
) -> tuple[Sandbox, list[Any]]:
    """Run a worker through a broker down at start, then lost and back: the sandbox, and
    the status records of the 60 events published meanwhile."""
    async with Sandbox(domains, tmp_path / "mail", pki) as sandbox:
        stack = Stack(own, sandbox, pki, tmp_path)
        config = stack.config()
        config = replace(config, kafka=replace(config.kafka, bootstrap=f"127.0.0.1:{relay_port}"))
        _, stop, task = await start_worker(config)
        try:
            await asyncio.sleep(2)
            assert not task.done()
            await own.start()
            await relay.start(relay_port)
            await stack.create_topics()
            await stack.publish(stack.events(30, seed=6))
            first = await read_topic(own.bootstrap, stack.delivery_topic, until=30)
            assert len(statuses(first)) == 30
            await relay.stop()  # lost mid-run
            await asyncio.sleep(4)
            assert not task.done()
            await relay.start(relay_port)  # back
            await stack.publish(stack.events(30, seed=7))
            both = await read_topic(own.bootstrap, stack.delivery_topic, until=60, seconds=90)
        finally:
            stop.set()
            await asyncio.wait_for(task, 60)
            await relay.stop()
            await own.stop()
    return sandbox, both


class FaultyClaims(SendLedger):
    """A send ledger whose first claims raise what a broken step below would let escape."""

    def __init__(self, inner: SendLedger, faults: list[BaseException]) -> None:
        self.inner = inner
        self.faults = faults

    async def claim(self, event_id: str, owner: str, *, retry_deferred: bool = False) -> Claim:
        if self.faults:
            raise self.faults.pop(0)
        return await self.inner.claim(event_id, owner, retry_deferred=retry_deferred)

    async def finish(self, event_id: str, outcome: str, reason: str) -> None:
        await self.inner.finish(event_id, outcome, reason)

    async def mark_published(self, marks: Sequence[tuple[str, int]]) -> None:
        await self.inner.mark_published(marks)

    async def get(self, event_id: str) -> LedgerEntry | None:
        return await self.inner.get(event_id)

    async def renew(self, event_ids: Sequence[str], owner: str) -> None:
        await self.inner.renew(event_ids, owner)

    async def purge(self, before: float, unmarked_before: float, limit: int = PURGE_BATCH) -> int:
        return await self.inner.purge(before, unmarked_before, limit)

    async def close(self) -> None:
        await self.inner.close()


async def one_event_through(
    stack: Stack, seed: int, config: Config | None = None, **worker: Any
) -> tuple[str, list[DeliveryStatus]]:
    """Publish one event, run a worker (`start_worker` options) until its status is out:
    the event id and its statuses."""
    (value,) = stack.events(1, seed=seed)
    event_id = orjson.loads(value)["event_id"]
    await stack.publish([value])
    _, stop, task = await start_worker(config or stack.config(), **worker)
    try:
        records = await read_topic(stack.broker.bootstrap, stack.delivery_topic, until=1)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    return event_id, statuses(records)[event_id]


async def test_a_cancellation_or_timeout_not_meant_for_the_record_is_retried(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    # A future cancelled by someone else (a group commit whose batch task died) or a step's
    # own timeout escaping: the record is tried again, not dropped without a status.
    faults: list[BaseException] = [asyncio.CancelledError(), TimeoutError()]
    caplog.set_level(logging.ERROR, logger="eobblast")
    _, (status,) = await one_event_through(
        stack, 22, ledger_as=lambda ledger: FaultyClaims(ledger, faults)
    )
    assert status.status == "delivered"
    assert not faults and sum(stack.sandbox.counts.values()) == 1
    failures = [r for r in caplog.records if r.getMessage().startswith("record could not be")]
    assert len(failures) == 2


def _fail_statuses_with_a_source_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every status built with a source time fails (as one in microseconds once did), and
    attempts are tried again at once: such a record is given up, its status sent without."""
    status_record = worker_module.status_record

    def failing_with_a_source_time(outcome: Any, *args: Any) -> bytes:
        *_, source_ms = args
        if source_ms is not None:
            raise ValueError("year 58878 is out of range")
        return status_record(outcome, *args)

    monkeypatch.setattr(worker_module, "status_record", failing_with_a_source_time)
    monkeypatch.setattr(worker_module, "backoff_delay", lambda attempt, **_: 0.05)


async def test_records_a_bug_fails_every_time_are_given_up_with_the_status_they_had(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A status that could not be built from the record's metadata (as for a timestamp in
    # microseconds) was tried again for ever: no status, the partition's commits held.
    _fail_statuses_with_a_source_time(monkeypatch)
    caplog.set_level(logging.ERROR, logger="eobblast")
    given_up_before = _sample("eobblast_records_given_up_total")
    (value,) = stack.events(1, seed=24)
    await stack.publish([value, b"not json"], keys=[member_key(value), b"M-unreadable"])
    config = stack.config()
    _, stop, task = await start_worker(config)
    try:
        found = await read_topic(stack.broker.bootstrap, stack.delivery_topic, until=2, seconds=30)
        await asyncio.sleep(1.0)  # time for more statuses, if any came, and for commits
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    grouped = statuses(found)
    assert sorted(items[0].status for items in grouped.values()) == ["delivered", "rejected"]
    assert set(distinct_final(grouped).values()) == {1}
    assert sum(stack.sandbox.counts.values()) == 1
    letters = await read_topic(stack.broker.bootstrap, stack.dlq_topic, until=2, seconds=3)
    assert [DeadLetter.model_validate_json(v).reason for _, v in letters] == ["invalid_json"]
    given_up = [r for r in caplog.records if "given up" in r.getMessage()]
    assert [getattr(r, "error", None) for r in given_up] == ["ValueError", "ValueError"]
    # Counted, whatever status they went out with: what EobblastRecordsGivenUp pages on.
    assert _sample("eobblast_records_given_up_total") == given_up_before + 2
    ends = await _end_offsets(stack.broker.bootstrap, stack.events_topic)
    committed = await _committed_offsets(
        stack.broker.bootstrap, config.kafka.group_id, stack.events_topic, list(ends)
    )
    assert committed == {p: end for p, end in ends.items() if end}


async def test_a_status_a_record_was_given_up_with_is_not_published_again_by_a_copy(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The status a record given up went out with was never marked published in the ledger:
    # a later copy of its event, here or at another worker, published it again.
    _fail_statuses_with_a_source_time(monkeypatch)
    (value,) = stack.events(1, seed=27)
    event_id = orjson.loads(value)["event_id"]
    await stack.publish([value])
    worker, stop, task = await start_worker(stack.config())
    topic = (stack.broker.bootstrap, stack.delivery_topic)

    async def marked() -> bool:
        entry = await worker._ledger.get(event_id)
        return entry is not None and entry.status_published

    async def skipped() -> bool:
        return worker.duplicates_skipped == 1

    try:
        await read_topic(*topic, until=1)
        await until("its status marked published", marked, seconds=10)
        await stack.publish([value])  # its status would fail again, and be given up again
        await until("the copy skipped as a duplicate", skipped, seconds=10)
        found = await read_topic(*topic, until=2, seconds=3)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    assert [s.status for s in statuses(found)[event_id]] == ["delivered"]
    assert sum(stack.sandbox.counts.values()) == 1


class BuggyFinishes(FaultyClaims):
    """A send ledger whose first `bugs` finishes fail with a bug (not a store outage), and
    every one of `refused`'s, if given."""

    def __init__(self, inner: SendLedger, bugs: int, refused: str | None = None) -> None:
        super().__init__(inner, [])
        self.bugs = bugs
        self.refused = refused
        self.running = self.peak = 0  # finishes under way at once, now and at most

    async def finish(self, event_id: str, outcome: str, reason: str) -> None:
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            await asyncio.sleep(0)  # as a store's round trip would, let others start
            if self.bugs > 0 or event_id == self.refused:
                self.bugs -= 1
                raise TypeError("a bug")
            await self.inner.finish(event_id, outcome, reason)
        finally:
            self.running -= 1


async def test_a_send_given_up_before_its_outcome_was_recorded_is_marked_once_it_is(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Sent, then its outcome failed to record with the same bug every time: given up, its
    # status went out and the claim renewer wrote the outcome later, but the status was never
    # marked published (nor could a mark sent before the outcome was written count). A copy
    # of the event arriving before the renewer wrote it recorded the outcome and published
    # the status a second time.
    monkeypatch.setattr(worker_module, "backoff_delay", lambda attempt, **_: 0.05)
    monkeypatch.setattr(worker_module, "CLAIM_RENEW", 8.0)  # the copy comes first
    buggy: list[BuggyFinishes] = []

    def wrap(ledger: SendLedger) -> SendLedger:
        buggy.append(BuggyFinishes(ledger, worker_module.GIVE_UP_AFTER))
        return buggy[-1]

    (value,) = stack.events(1, seed=28)
    event_id = orjson.loads(value)["event_id"]
    await stack.publish([value])
    _, stop, task = await start_worker(stack.config(), ledger_as=wrap)  # commits every 0.2 s

    async def marked() -> bool:
        entry = await buggy[0].inner.get(event_id)
        return entry is not None and entry.status_published

    try:
        await read_topic(stack.broker.bootstrap, stack.delivery_topic, until=1)
        await stack.publish([value])
        await until("its outcome written and its status marked", marked, seconds=15)
        # One key for all statuses: read a while rather than until a count of keys.
        found = await read_topic(stack.broker.bootstrap, stack.delivery_topic, until=2, seconds=2)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    assert buggy[0].bugs == 0
    assert [s.status for s in statuses(found)[event_id]] == ["delivered"]
    assert sum(stack.sandbox.counts.values()) == 1


async def test_an_outcome_the_ledger_refuses_for_good_does_not_hold_back_the_others(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two notices of one member sent, their outcomes unrecorded when their records were
    # given up: the claim renewer writes them later. The first one's the ledger refuses
    # for good; the second's must be written all the same, or its claim is renewed for
    # ever and its copies at other workers wait on it for ever.
    monkeypatch.setattr(worker_module, "backoff_delay", lambda attempt, **_: 0.05)
    first, second = stack.events(2, seed=29)
    refused, kept = (orjson.loads(v)["event_id"] for v in (first, second))
    wrapped: list[BuggyFinishes] = []

    def wrap(ledger: SendLedger) -> SendLedger:
        # Every outcome refused until both records were given up (their attempts use the
        # bugs up), so both wait for the renewer, the refused one first.
        wrapped.append(BuggyFinishes(ledger, 2 * worker_module.GIVE_UP_AFTER, refused))
        return wrapped[-1]

    await stack.publish([first, second], keys=[b"one-member"] * 2)
    _, stop, task = await start_worker(stack.config(), ledger_as=wrap)

    async def written() -> bool:
        entry = await wrapped[0].inner.get(kept)
        return entry is not None and entry.state is LedgerState.FINAL

    try:
        await read_topic(stack.broker.bootstrap, stack.delivery_topic, until=2)
        await until("the second outcome written", written, seconds=20)
        entry = await wrapped[0].inner.get(refused)
        assert entry is not None and entry.state is not LedgerState.FINAL
        # Written together (one transaction, one bounded wait for a store away), not one
        # after the other while the worker's claims run out.
        assert wrapped[0].peak == 2
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    assert sum(stack.sandbox.counts.values()) == 2


async def test_outages_are_waited_out_and_a_bug_before_any_outcome_parks_the_record(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A ledger away is tried again however long it lasts (twice the bound here); a claim
    # that then fails with the same bug every time ends the record: nothing was sent, so
    # it is parked for a replay once the bug is fixed, and reported failed.
    bound = worker_module.GIVE_UP_AFTER
    faults: list[BaseException] = [sqlite3.OperationalError("database is locked")] * (2 * bound)
    faults += [KeyError("a bug")] * bound
    monkeypatch.setattr(worker_module, "backoff_delay", lambda attempt, **_: 0.05)
    failed = _sample("eobblast_events_total", outcome="failed", reason="internal_error")
    event_id, (status,) = await one_event_through(
        stack, 25, ledger_as=lambda ledger: FaultyClaims(ledger, faults)
    )
    assert not faults, "every outage waited out, the bug met as often as the bound"
    assert (status.status, status.reason, status.attempt) == ("failed", "internal_error", 1)
    assert sum(stack.sandbox.counts.values()) == 0
    letters = await read_topic(stack.broker.bootstrap, stack.dlq_topic, until=2, seconds=3)
    (letter,) = [DeadLetter.model_validate_json(v) for _, v in letters]
    assert (letter.reason, letter.event_id) == ("internal_error", event_id)
    assert _sample("eobblast_events_total", outcome="failed", reason="internal_error") == (
        failed + 1
    )


class FlakyBounceStore:
    """A bounce store whose database is away for `failures` transactions, after `after`."""

    def __init__(self, failures: int, *, after: int = 0) -> None:
        self.failures = failures
        self.after = after
        self.inner: BounceStore | None = None

    def wrap(self, store: BounceStore) -> BounceStore:
        self.inner = store
        return cast(BounceStore, self)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def transaction(self, *args: Any, **kwargs: Any) -> Any:
        assert self.inner is not None
        if self.after > 0:
            self.after -= 1
        elif self.failures > 0:
            self.failures -= 1
            raise sqlite3.OperationalError("disk I/O error")
        return self.inner.transaction(*args, **kwargs)


async def test_a_bounce_store_outage_is_waited_out_not_a_failed_notice(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    # The gate decides nothing when its store is away: the event is tried again after a
    # pause, as for a ledger it cannot reach, instead of ending failed/internal_error.
    flaky = FlakyBounceStore(failures=2)
    caplog.set_level(logging.ERROR, logger="eobblast")
    resends = REGISTRY.get_sample_value("eobblast_resends_total") or 0.0
    _, (status,) = await one_event_through(stack, 25, bounce_store_as=flaky.wrap)
    assert status.status == "delivered"
    # Tried again in this worker: not a crash resend.
    assert (REGISTRY.get_sample_value("eobblast_resends_total") or 0.0) == resends
    assert flaky.failures == 0 and sum(stack.sandbox.counts.values()) == 1
    retried = [r for r in caplog.records if r.getMessage().startswith("record could not be")]
    assert len(retried) == 2


async def test_a_delivery_the_bounce_store_missed_at_first_is_recorded_and_reported(
    stack: Stack,
) -> None:
    # The receiver took the notice, then the store was away for a while: told again until
    # it listens, so the notice does not stay "sending" (a second email, or its raw event
    # kept for good).
    config = stack.config()
    flaky = FlakyBounceStore(failures=4, after=1)  # the gate passes, then 4 records fail
    retries = REGISTRY.get_sample_value("eobblast_delivery_record_retries_total") or 0.0
    event_id, (status,) = await one_event_through(stack, 26, config, bounce_store_as=flaky.wrap)
    assert status.status == "delivered" and sum(stack.sandbox.counts.values()) == 1
    assert flaky.failures == 0
    assert REGISTRY.get_sample_value("eobblast_delivery_record_retries_total") == retries + 4
    assert await _bounce_status(config, event_id) is EobStatus.DELIVERED


async def test_a_delivery_record_outlasting_stuck_after_does_not_send_again(
    stack: Stack,
) -> None:
    # The receiver took the notice, then the bounce store was away longer than stuck_after:
    # the attempt was given up and run again, the gate found the notice still "sending" and
    # permitted it, and the member got a second copy.
    config = stack.config(stuck_after=1.0)
    flaky = FlakyBounceStore(failures=6, after=1)  # the gate passes, then the store is away
    event_id, found = await one_event_through(stack, 26, config, bounce_store_as=flaky.wrap)
    # An attempt given up while its status was being published may have got it out: the
    # next one publishes it again, the same status (one status_id), as after a crash.
    assert len({status.status_id for status in found}) == 1
    status = found[0]
    assert status.status == "delivered" and flaky.failures == 0
    assert sum(stack.sandbox.counts.values()) == 1
    assert await _bounce_status(config, event_id) is EobStatus.DELIVERED


async def test_a_hard_bounce_the_bounce_store_hears_late_is_held_not_failed(
    stack: Stack,
) -> None:
    # The receiver refused the address while the bounce store was away: the notice ended
    # failed/internal_error, stayed "sending" in the store for good (its raw event kept),
    # and the address was neither suppressed nor its member asked to verify it.
    (value,) = stack.events(1, seed=55)
    doc = orjson.loads(value)
    domain = doc["member"]["email"].rpartition("@")[2]
    doc["member"]["email"] = f"{HARD_REJECT}1@{domain}"
    doc["member"]["consent"]["electronic_delivery"] = True
    config = stack.config()
    status = await _through_a_store_away(stack, config, doc, failures=3)
    assert (status.status, status.reason) == ("held", "awaiting_verification")
    assert sum(stack.sandbox.counts.values()) == 0
    assert await _bounce_status(config, doc["event_id"]) is EobStatus.HELD_FOR_VERIFICATION


async def test_a_first_send_that_fails_before_anything_goes_out_leaves_no_notice_behind(
    stack: Stack,
) -> None:
    # A notice that had to go to the portal, with no portal configured, ended failed; in
    # the bounce store it stayed "sending" for good, its raw event (PHI) with it.
    settings = stack.settings()
    settings["protection"] = {"tls_policy_domains": []}  # unknown receivers: portal notices
    config = load_config(environ={}, overrides=settings)
    event_id, (status,) = await one_event_through(
        stack, 56, config, bounce_store_as=lambda store: store
    )
    assert (status.status, status.reason) == ("failed", "portal_unavailable")
    assert sum(stack.sandbox.counts.values()) == 0
    assert await _bounce_status(config, event_id) is None
    store = await open_bounce_store(config.bounces.store_url)
    try:
        assert event_id not in await store.payload_ids()
    finally:
        await store.close()


async def _through_a_store_away(
    stack: Stack, config: Config, doc: dict[str, Any], *, failures: int
) -> DeliveryStatus:
    """One event through a worker whose bounce store lets the gate pass, then is away for
    `failures` transactions: its status (after the store took everything)."""
    flaky = FlakyBounceStore(failures=failures, after=1)
    await stack.publish([orjson.dumps(doc)])
    _, stop, task = await start_worker(config, bounce_store_as=flaky.wrap)
    try:
        records = await read_topic(stack.broker.bootstrap, stack.delivery_topic, until=1)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    assert flaky.failures == 0
    ((status,),) = statuses(records).values()
    return status


class NoPublisher:
    async def publish(self, topic: str, key: bytes, value: bytes) -> None:
        """Records of the set-up's own bounce service go nowhere."""


async def test_a_redirected_delivery_outlasting_stuck_after_is_recorded_where_it_went(
    stack: Stack,
) -> None:
    # The member's address A bounced and C was verified since: the gate sends the next
    # notice, which still names A, to C. When recording that delivery outlasted stuck_after,
    # the attempt run again recorded it at A; the store did not match it, and the notice
    # stayed "sending" for good with its raw event.
    config = stack.config(stuck_after=1.0)
    first, second = stack.events(2, seed=57)
    doc, doc2 = orjson.loads(first), orjson.loads(second)
    member, domain = doc["member"]["id"], doc["member"]["email"].rpartition("@")[2]
    old, verified = f"{HARD_REJECT}old@{domain}", f"verified@{domain}"
    doc2["member"].update(id=member, email=old)
    doc2["member"]["consent"]["electronic_delivery"] = True
    async with _hard_bounced(config, doc["event_id"], member, old, first) as service:
        answer = AddressVerified.model_validate(
            {
                "member_id": member,
                "address": verified,
                "channel": VerificationChannel.PHONE,
                "verified_by": "csr-1",
                "at": dt.datetime.now(dt.UTC),
            },
            context={"allow_test_domains": True},
        )
        (released,) = (await service.on_verification_result(answer)).resends
        await service.on_delivered(released.event_id, verified)  # sent meanwhile
    status = await _through_a_store_away(stack, config, doc2, failures=6)
    assert status.status == "delivered"
    assert [r.rcpt_tos for r in stack.sandbox.received] == [(verified,)]
    assert await _bounce_status(config, doc2["event_id"]) is EobStatus.DELIVERED


@contextlib.asynccontextmanager
async def _hard_bounced(
    config: Config, event_id: str, member: str, address: str, raw: bytes
) -> AsyncIterator[BounceService]:
    """A bounce service (its own store, closed after) on which the notice `raw` was sent to
    `address` and refused for good: held, its member asked to verify the address."""
    service = await open_bounces(
        config, ProtectionServices.policy_only(config), NoPublisher(), actor="set-up"
    )
    try:
        await service.gate(event_id, member, address, raw)
        await service.on_delivery_failure(
            event_id, member, address, raw, 550, "5.1.1", "550 5.1.1 User unknown"
        )
        yield service
    finally:
        await service.store.close()


async def _bounce_status(config: Config, event_id: str) -> EobStatus | None:
    """The notice's status in the bounce store, as it stands now."""
    store = await open_bounce_store(config.bounces.store_url)
    try:
        kept = await store.eob(event_id)
    finally:
        await store.close()
    return None if kept is None else kept[0].status


class VerificationsFailingOnce:
    """The bounce service's side of verification results, its store busy once: at the
    second result of the first batch."""

    def __init__(self) -> None:
        self.applied: list[str] = []
        self.failed = False

    async def on_verification_result(self, result: Any) -> Any:
        if len(self.applied) == 1 and not self.failed:
            self.failed = True
            raise StoreBusy
        self.applied.append(result.member_id)
        return SimpleNamespace(resends=(), outcomes=())


async def _verification_failures(
    stack: Stack, members: Sequence[str], *, unreadable_at: int | None = None
) -> tuple[Config, Any]:
    """Publish a failed verification for each member (and a record that is not JSON at
    `unreadable_at`, if given); a started consumer of the results."""
    config = stack.config()
    topic = config.bounces.results_topic
    await stack.broker.create_topics({topic: 1})
    producer = make_producer(stack.broker.bootstrap, client_id="verifier", security=PLAINTEXT)
    await producer.start()
    try:
        for index, member in enumerate(members):
            if index == unreadable_at:
                await producer.send_and_wait(topic, b"not json", key=b"M-x")
            failed = AddressVerificationFailed(
                member_id=member, reason=FailureReason.NO_ANSWER, at=dt.datetime.now(dt.UTC)
            )
            await producer.send_and_wait(topic, dump(failed), key=member.encode())
    finally:
        await producer.stop()
    return config, await _results_consumer(stack, config)


async def _results_consumer(stack: Stack, config: Config) -> Any:
    """A started consumer of the verification results, in the workers' group."""
    consumer = make_consumer(
        stack.broker.bootstrap,
        config.bounces.results_group_id,
        [config.bounces.results_topic],
        client_id="verification-test",
        max_poll_records=100,
        session_timeout_ms=3000,
        heartbeat_interval_ms=500,
        security=PLAINTEXT,
    )
    await consumer.start()
    return consumer


def _verification_worker(config: Config, service: Any) -> Worker:
    return Worker(
        config,
        cast(Pipeline, None),  # no resends: the pipeline is not reached
        cast(SendLedger, None),
        worker_id=new_worker_id(0),
        bounces=cast(BounceService, service),
    )


async def test_verification_results_after_a_failure_mid_batch_are_not_passed_over(
    stack: Stack,
) -> None:
    # The consumer's position was past the whole batch when one result failed: the next
    # batch's commit passed over the results not applied, until their deadline sent the
    # member's notices to paper.
    members = [f"M-{n}" for n in range(3)]
    config, consumer = await _verification_failures(stack, members)
    service = VerificationsFailingOnce()
    worker = _verification_worker(config, service)
    holes = ReadAgain()
    try:
        deadline = time.monotonic() + 30
        while set(service.applied) != set(members):
            assert time.monotonic() < deadline, f"applied only {service.applied}"
            with contextlib.suppress(StoreBusy):
                await worker._verification_batch(consumer, holes, asyncio.Event())
        assert service.failed
        # Applied twice changes nothing; the commit is past the last one only now.
        topic = config.bounces.results_topic
        assert await consumer.committed(TopicPartition(topic, 0)) == 3
    finally:
        await consumer.stop()


async def test_a_parked_result_is_not_parked_again_when_its_batch_fails_later(
    stack: Stack,
) -> None:
    # The batch's offsets were committed only at its end: a failure after the parked
    # record sent the batch back to its start, and the record was parked and counted again.
    members = [f"M-{n}" for n in range(3)]
    config, consumer = await _verification_failures(stack, members, unreadable_at=1)
    service = VerificationsFailingOnce()  # fails at M-1, after the unreadable record
    worker = _verification_worker(config, service)
    worker._producer = make_producer(
        stack.broker.bootstrap, client_id="verification-test", security=PLAINTEXT
    )
    await worker._producer.start()
    refused = "eobblast_verification_results_refused_total"
    before = _sample(refused, reason="invalid_json")
    try:
        deadline = time.monotonic() + 30
        while set(service.applied) != set(members):
            assert time.monotonic() < deadline, f"applied only {service.applied}"
            with contextlib.suppress(StoreBusy):
                await worker._verification_batch(consumer, ReadAgain(), asyncio.Event())
        assert service.failed and service.applied == members  # M-0 not applied twice
        assert await consumer.committed(TopicPartition(config.bounces.results_topic, 0)) == 4
    finally:
        await consumer.stop()
        await worker._producer.stop()
    letters = await _values(stack, stack.dlq_topic, 1)
    assert len(letters) == 1 and _sample(refused, reason="invalid_json") == before + 1


class VerificationsUntilStopped:
    """The bounce service's side of verification results; the worker is told to stop
    while the first one is applied."""

    def __init__(self) -> None:
        self.applied: list[str] = []
        self.stop = asyncio.Event()

    async def on_verification_result(self, result: Any) -> Any:
        self.applied.append(result.member_id)
        self.stop.set()
        return SimpleNamespace(resends=(), outcomes=())


async def test_a_stopping_worker_leaves_the_rest_of_a_verification_batch_uncommitted(
    stack: Stack,
) -> None:
    # Each verification result can release resends, which a stopping worker no longer
    # sends: what is left of the batch stays uncommitted for the next reader.
    members = [f"M-{n}" for n in range(3)]
    config, consumer = await _verification_failures(stack, members)
    service = VerificationsUntilStopped()
    worker = _verification_worker(config, service)
    try:
        async with asyncio.timeout(30):
            while not service.applied:
                await worker._verification_batch(consumer, ReadAgain(), service.stop)
        assert service.applied == ["M-0"]
        topic = config.bounces.results_topic
        assert await consumer.committed(TopicPartition(topic, 0)) is None
    finally:
        await consumer.stop()


async def test_a_verification_result_that_cannot_be_read_is_parked_and_the_next_applied(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    # A result the worker could not read was logged and its offset committed: no dead
    # letter, no metric, no alert. The member's held notices went to paper at their
    # deadline, and nobody learned that the answer had come, unreadable.
    config = stack.config()
    results = config.bounces.results_topic
    await stack.broker.create_topics({results: 1})
    (value,) = stack.events(1, seed=59)
    doc = orjson.loads(value)
    member, domain = doc["member"]["id"], doc["member"]["email"].rpartition("@")[2]
    old, verified = f"{HARD_REJECT}old@{domain}", f"verified@{domain}"
    doc["member"]["email"] = old
    doc["member"]["consent"]["electronic_delivery"] = True
    raw = orjson.dumps(doc)
    async with _hard_bounced(config, doc["event_id"], member, old, raw):
        pass
    assert await _bounce_status(config, doc["event_id"]) is EobStatus.HELD_FOR_VERIFICATION

    answer = {
        "member_id": member,
        "address": verified,
        "channel": "phone",
        "verified_by": "csr-1",
        "at": dt.datetime.now(dt.UTC).isoformat(),
    }
    not_json = b"member " + member.encode() + b" verified " + verified.encode()
    unknown_schema = orjson.dumps(answer | {"schema": "eob.address-verified/v2"})
    good = orjson.dumps(answer | {"schema": "eob.address-verified/v1"})
    refused = "eobblast_verification_results_refused_total"
    before = {
        reason: _sample(refused, reason=reason) for reason in ("invalid_json", "unsupported_schema")
    }
    producer = make_producer(stack.broker.bootstrap, client_id="verifier", security=PLAINTEXT)
    await producer.start()
    try:
        # (a tombstone among them: a compacted topic's deletion marker, skipped)
        for record in (not_json, None, unknown_schema, good):
            await producer.send_and_wait(results, record, key=member.encode())
    finally:
        await producer.stop()

    caplog.set_level(logging.DEBUG, logger="eobblast")
    _, stop, task = await start_worker(config, bounce_store_as=lambda store: store)
    try:
        letters = await until("both parked", lambda: _values(stack, stack.dlq_topic, 2))
        # The answer after them was applied: the held notice went to the verified address.
        await until("the notice released", lambda: _received_by(stack, verified))
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    parked = [DeadLetter.model_validate_json(letter) for letter in letters]
    assert [(str(p.reason), p.field) for p in parked] == [
        ("invalid_json", None),
        ("unsupported_schema", "schema"),
    ]
    assert [(p.source.topic, p.source.partition, p.source.offset) for p in parked] == [
        (results, 0, 0),
        (results, 0, 2),
    ]
    # Logged by reason and field: never the member id or the address the value carried.
    logged = [str(vars(r)) for r in caplog.records if r.name.startswith("eobblast")]
    assert any("verification result refused" in line for line in logged)
    assert not [line for line in logged if member in line or verified in line]
    assert [base64.b64decode(p.original_base64) for p in parked] == [not_json, unknown_schema]
    assert all(base64.b64decode(p.key_base64 or "") == member.encode() for p in parked)
    for reason, count in before.items():
        assert _sample(refused, reason=reason) == count + 1
    assert await _bounce_status(config, doc["event_id"]) is not EobStatus.HELD_FOR_VERIFICATION
    consumer = await _results_consumer(stack, config)
    try:
        # Committed past all four: the two refused ones only once they were parked.
        assert await consumer.committed(TopicPartition(results, 0)) == 4
    finally:
        await consumer.stop()


async def _values(stack: Stack, topic: str, count: int) -> list[bytes]:
    """The values on `topic`, once it holds `count` records (else none)."""
    found = [
        record.value or b""
        async for record in read_to_end(
            stack.broker.bootstrap, topic, client_id="test", security=PLAINTEXT
        )
    ]
    return found if len(found) >= count else []


async def _received_by(stack: Stack, address: str) -> bool:
    return any(address in received.rcpt_tos for received in stack.sandbox.received)


async def test_bounce_records_name_the_topic_when_the_trouble_is_the_topic(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The bounce service holds back only a refused topic's records (TopicRefused); any
    # other failure (the broker away) holds back every topic's.
    monkeypatch.setattr(worker_module, "PUBLISH_TIMEOUT", 2.0)
    monkeypatch.setattr(worker_module, "METADATA_TIMEOUT", 1.0)
    publish = worker_module.publish_acknowledged
    async with EmbeddedBroker(log_dir=tmp_path / "tansu") as own:
        await own.create_topics({"eob.paper-fallback": 1})
        for name in ("elsewhere", "bounces"):
            producer = make_producer(own.bootstrap, client_id=name, security=PLAINTEXT)
            await producer.start()
            try:
                if name == "elsewhere":
                    # Not a topic name Kafka allows: its partitions never become known. (Its
                    # own producer: asking for it drops what the producer knew of others.)
                    publisher = worker_module.ProducerPublisher(producer)
                    with pytest.raises(TopicRefused, match="not known"):
                        await publisher.publish("no topic!", b"M", b"{}")
                    # Refused again at once for a while, not after another wait.
                    with pytest.raises(TopicRefused, match="a moment ago"):
                        await publisher.publish("no topic!", b"M", b"{}")
                    continue
                publisher = worker_module.ProducerPublisher(producer)
                await publisher.publish("eob.paper-fallback", b"M", b"{}")
                with pytest.raises(TopicRefused, match="MessageSizeTooLargeError"):
                    await publisher.publish("eob.paper-fallback", b"M", b"x" * (17 << 20))
                # That record's trouble, not its topic's: the next record goes.
                await publisher.publish("eob.paper-fallback", b"M", b"{}")
                await own.stop()
                with pytest.raises(TimeoutError):
                    await publish(producer, "eob.paper-fallback", b"M", b"{}")
                # A topic this producer has not met: no broker answers, so not its fault.
                with pytest.raises(TimeoutError):
                    await publish(producer, "eob.address-verification", b"M", b"{}")
            finally:
                # Bounded: a record the broker never took keeps a producer's stop waiting.
                await worker_module.stop_in_time("producer", producer.stop)


async def test_records_of_one_member_wait_for_each_other_records_without_one_do_not(
    stack: Stack,
) -> None:
    # Same key (member id): one after the other, in order. No key: refused (missing_key)
    # with nothing to keep in order, so poison across partitions is not handled in single
    # file.
    worker = _verification_worker(stack.config(), None)
    waited: dict[int, asyncio.Task[Any] | None] = {}

    async def attempts(tp: Any, record: Any, info: Any, previous: Any) -> bool:
        waited[record.offset] = previous
        await asyncio.sleep(0.05)
        return False  # nothing published: the offset tracker is left alone

    worker._attempts = attempts  # type: ignore[method-assign]
    tp = TopicPartition("events", 0)
    records = [(None, 1), (b"", 2), (None, 3), (b"M-1", 4), (b"M-1", 5)]
    tasks = [
        asyncio.create_task(
            worker._handle(tp, SimpleNamespace(key=key, offset=offset), cast(Any, None))
        )
        for key, offset in records
    ]
    await asyncio.gather(*tasks)
    assert waited == {1: None, 2: None, 3: None, 4: None, 5: tasks[3]}
    assert worker._by_key == {}


class FlakyEscrow:
    """An escrow store whose database is away for its first `failures` writes."""

    def __init__(self, inner: EscrowStore, failures: int) -> None:
        self.inner = inner
        self.failures = failures

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def _put(self, *args: Any, **kwargs: Any) -> Any:
        if self.failures > 0:
            self.failures -= 1
            raise sqlite3.OperationalError("database is locked")
        return await self.inner._put(*args, **kwargs)


async def test_an_escrow_outage_delays_a_portal_notice_it_does_not_fail_it(
    stack: Stack, tmp_path: Path
) -> None:
    # The portal path escrows after the bounce gate leased the send: the next try reports
    # the notice deferred (in flight), and the lease's end sends it, once.
    (value,) = stack.events(1, seed=27)
    event_id = orjson.loads(value)["event_id"]
    await stack.publish([value])
    settings = stack.settings()
    settings["protection"] = {"portal_domains": stack.domains, "tls_policy_domains": []}
    settings["bounces"] |= {"send_lease_seconds": 1.0, "tick_interval": 0.2}
    config = load_config(environ={}, overrides=settings)
    services = await ProtectionServices.open(config)
    assert services.escrow is not None
    flaky = FlakyEscrow(services.escrow, failures=1)
    services = replace(services, escrow=cast(EscrowStore, flaky))
    _, stop, task = await start_worker(config, protection=services, bounce_store_as=lambda s: s)
    try:
        seen: list[str] = []
        deadline = time.monotonic() + 30
        while "delivered" not in seen and time.monotonic() < deadline:
            records = await read_topic(stack.broker.bootstrap, stack.delivery_topic, until=1)
            seen = [status.status for status in statuses(records).get(event_id, [])]
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await services.close()
    assert flaky.failures == 0
    assert seen[-1] == "delivered" and "failed" not in seen
    assert sum(stack.sandbox.counts.values()) == 1  # one notice, with its pickup link


async def test_a_member_id_with_too_few_digits_gets_no_portal_notice(
    stack: Stack, tmp_path: Path
) -> None:
    # The pickup page asks for the id's last 4 digits: an id with two of them left a
    # notice whose check was the date of birth and two digits, or none it could pass.
    (value,) = stack.events(1, seed=28)
    doc = orjson.loads(value)
    doc["member"]["id"] = "MEMBER-AB-42"
    doc["member"]["consent"]["electronic_delivery"] = True
    await stack.publish([orjson.dumps(doc)], keys=[b"MEMBER-AB-42"])
    settings = stack.settings()
    settings["protection"] = {"portal_domains": stack.domains, "tls_policy_domains": []}
    config = load_config(environ={}, overrides=settings)
    services = await ProtectionServices.open(config)
    _, stop, task = await start_worker(config, protection=services)
    try:
        records = await read_topic(stack.broker.bootstrap, stack.delivery_topic, until=1)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await services.close()
    [status] = statuses(records)[doc["event_id"]]
    assert (status.status, status.reason, status.protection) == (
        "failed",
        "no_portal_identity",
        "portal",
    )
    assert sum(stack.sandbox.counts.values()) == 0  # no notice nobody could open


async def test_a_member_who_asked_for_the_portal_gets_a_portal_notice_whatever_else_is_known(
    stack: Stack, tmp_path: Path
) -> None:
    # A member's request for the portal (a HIPAA confidential-communications request) comes
    # first, above a certificate on file and a TLS-required domain; a member who asked
    # nothing still gets the EOB encrypted to their certificate.
    certificates = MemberCertificates(tmp_path / "smime")
    docs = [orjson.loads(value) for value in stack.events(2, seed=29)]
    for doc in docs:
        doc["member"]["smime_certificate"] = certificates(doc["member"]["email"])
    asked, silent = docs
    asked["member"]["preference"] = "portal"
    assert "preference" not in silent["member"]
    await stack.publish([orjson.dumps(doc) for doc in docs])
    config = stack.config()  # the sandbox's domains are on the TLS policy list
    services = await ProtectionServices.open(config)
    _, stop, task = await start_worker(config, protection=services)
    try:
        records = await read_topic(stack.broker.bootstrap, stack.delivery_topic, until=2)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await services.close()
    found = statuses(records)
    [portal] = found[asked["event_id"]]
    [smime] = found[silent["event_id"]]
    assert (portal.status, portal.protection, portal.protection_reason) == (
        "delivered",
        "portal",
        "member_prefers_portal",
    )
    assert (smime.status, smime.protection, smime.protection_reason) == (
        "delivered",
        "smime",
        "recipient_certificate",
    )
    [notice] = [r for r in stack.sandbox.received if asked["member"]["email"] in r.rcpt_tos]
    message = email.message_from_bytes(notice.path.read_bytes(), policy=email.policy.default)
    assert message.get_content_type() != "application/pkcs7-mime"
    text = str(message["Subject"]) + "".join(
        part.get_content() for part in message.walk() if part.get_content_maintype() == "text"
    )
    assert "/p/" in text  # the pickup link
    claim = asked["claim"]
    phi = [asked["member"]["name"], asked["member"]["id"], claim["id"], claim["provider"]["name"]]
    phi += [line["billed"] for line in claim["lines"]]
    assert [value for value in phi if value in text] == []


class BrokenAuditTrail:
    """An audit trail whose database is gone: every append fails."""

    def __init__(self) -> None:
        self.appends = 0

    async def append(self, record: AuditRecord) -> None:
        self.appends += 1
        raise AuditError("audit database unavailable")


async def test_an_audit_write_failing_after_delivery_leaves_the_notice_delivered(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    # The receiver accepted the notice; only the SENT record could not be written. A failed
    # status would make the claims system send it again (perhaps on paper).
    config = stack.config()
    audit = BrokenAuditTrail()
    services = replace(ProtectionServices.policy_only(config), audit=cast(AuditTrail, audit))
    caplog.set_level(logging.ERROR, logger="eobblast")
    event_id, (status,) = await one_event_through(stack, 24, config, protection=services)
    assert status.status == "delivered"
    assert audit.appends == 1 and sum(stack.sandbox.counts.values()) == 1
    gaps = [r for r in caplog.records if r.getMessage() == "audit record not written: AuditError"]
    assert [getattr(r, "event_id", None) for r in gaps] == [event_id]


class Relay:
    """A TCP relay to a sandbox receiver; subclasses decide how each connection begins."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._relay(reader, writer)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await splice(reader, writer, *await asyncio.open_connection(*self.target))

    def close(self) -> None:
        if self._server is not None:
            self._server.close()


class StallFirst(Relay):
    """A relay whose first connection hangs: accepted, never a word back (as a tarpit, or
    a receiver that froze)."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(host, port)
        self.connections = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.connections == 1:
            await reader.read()  # until the worker gives up and hangs up
            writer.close()
            return
        await self._relay(reader, writer)


class SlowGreeting(Relay):
    """A relay that greets each connection only after `hold` seconds (a receiver under
    load, or one that tarpits): every send takes that long."""

    def __init__(self, host: str, port: int, hold: float) -> None:
        super().__init__(host, port)
        self.hold = hold

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(self.hold)
        await self._relay(reader, writer)


async def test_a_worker_full_of_slow_sends_stays_in_its_group(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    # Every slot holds a send far longer than max_poll_interval_ms. The worker still polls
    # (its partitions paused, nothing fetched), so the group keeps it: no rebalance, and
    # every event is delivered once.
    values = stack.events(4, seed=28)
    relays = {
        name: SlowGreeting(*address, hold=5.0) for name, address in stack.sandbox.routes.items()
    }
    ports = {name: await relay.start() for name, relay in relays.items()}
    await stack.publish(values)
    settings = stack.settings()
    settings["pipeline"]["max_in_flight"] = 2
    settings["kafka"]["max_poll_interval_ms"] = 2000
    settings["transport"] |= {
        "connect_timeout": 120.0,
        "routes": {name: f"127.0.0.1:{port}" for name, port in ports.items()},
    }
    config = load_config(environ={}, overrides=settings)
    caplog.set_level(logging.INFO, logger="eobblast")
    _, stop, task = await start_worker(config)
    try:
        records = await read_topic(
            stack.broker.bootstrap, stack.delivery_topic, until=len(values), seconds=90
        )
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        for relay in relays.values():
            relay.close()
    grouped = statuses(records)
    assert len(grouped) == len(values) and set(distinct_final(grouped).values()) == {1}
    assert {s.status for items in grouped.values() for s in items} == {"delivered"}
    assert sum(stack.sandbox.counts.values()) == len(values)
    # Assigned once, at the start: an eviction would have moved them away and back.
    assert [r.getMessage() for r in caplog.records].count("partitions assigned") == 1


async def test_a_hung_attempt_is_reported_with_its_stage_and_run_again(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    # The receiver's first connection hangs and the SMTP timeouts are long: the attempt
    # outlives stuck_after, is reported with the stage it hung in (no PHI: partition,
    # offset, event id, stage) and run again, and the event is delivered once.
    (value,) = stack.events(1, seed=21)
    event_id = orjson.loads(value)["event_id"]
    relays = {name: StallFirst(*address) for name, address in stack.sandbox.routes.items()}
    ports = {name: await relay.start() for name, relay in relays.items()}
    await stack.publish([value])
    base = stack.config(stuck_after=1.0, grace_period=1.0)
    config = replace(
        base,
        transport=replace(
            base.transport,
            connect_timeout=120.0,
            routes={name: f"127.0.0.1:{port}" for name, port in ports.items()},
        ),
    )
    stuck_before = REGISTRY.get_sample_value("eobblast_events_stuck_total", {"stage": "deliver"})
    caplog.set_level(logging.WARNING, logger="eobblast")
    _, stop, task = await start_worker(config)
    try:
        records = await read_topic(stack.broker.bootstrap, stack.delivery_topic, until=1)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        for relay in relays.values():
            relay.close()
    (status,) = statuses(records)[event_id]
    assert status.status == "delivered"
    assert sum(stack.sandbox.counts.values()) == 1
    reports = [r for r in caplog.records if r.getMessage().startswith("event in flight too long")]
    (report,) = reports
    assert report.stage == "deliver"  # type: ignore[attr-defined]
    assert report.event_id == event_id  # type: ignore[attr-defined]
    assert report.offset == 0 and report.seconds >= 1.0  # type: ignore[attr-defined]
    after = REGISTRY.get_sample_value("eobblast_events_stuck_total", {"stage": "deliver"})
    assert (after or 0) == (stuck_before or 0) + 1


def smaller_dkim_keys(directory: Path) -> None:
    """Replace the stack's payers' RSA-2048 DKIM keys with 1,024-bit ones (and their DNS
    records)."""
    keys, selector = directory / "keys", "eob1"
    for _, _, domain in PAYERS:
        path = dkim._rsa_path(keys, domain, selector)
        path.unlink()
        dkim._publish_key(path, rsa.generate_private_key(public_exponent=65537, key_size=1024))
    prepare_keys(keys, directory / "dns", selector, ed25519=False)


async def test_killed_worker_is_restarted_and_nothing_is_lost(
    own_stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    stack = own_stack
    total = 20_000
    stack.max_in_flight = 64
    # What is tested here is the accounting, not the signatures (tested with 2,048-bit keys
    # elsewhere): RSA-1024 (the smallest a verifier accepts) signs several times faster and
    # leaves the machine's two cores to the workers' other work and the receivers.
    smaller_dkim_keys(stack.directory)
    published = stack.events(total, seed=8)
    await stack.publish(published)
    # A stall would show in the workers' log with the stage it happened in.
    config = stack.config(count=2, stuck_after=30.0)
    restarts: list[int] = []
    supervisor = Supervisor(
        config, workers=2, log_level="WARNING", on_restart=lambda i, c: restarts.append(i)
    )
    stop = asyncio.Event()
    supervising = asyncio.create_task(supervisor.run(stop))
    started = time.monotonic()
    while sum(stack.sandbox.counts.values()) < total // 4 and time.monotonic() - started < 120:  # noqa: ASYNC110 - polling a counter in another thread
        await asyncio.sleep(0.2)
    victim = supervisor.pids[0]
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    records = await read_topic(
        stack.broker.bootstrap, stack.delivery_topic, until=total, seconds=300
    )
    stop.set()
    await supervising
    grouped = statuses(records)
    if len(grouped) != total:
        # Lost by the broker after its acknowledgement, or not read back: the topic's end
        # offsets against the records read tell which.
        ends = await _end_offsets(stack.broker.bootstrap, stack.delivery_topic)
        pytest.fail(
            f"every event has a final status; {_ledger_of_missing(stack, published, grouped)};"
            f" {len(records)} records read, {sum(ends.values())} on the topic ({ends})"
        )
    assert set(distinct_final(grouped).values()) == {1}, "and only one"
    assert restarts == [0]
    received = sum(stack.sandbox.counts.values())
    duplicates = received - total
    with capsys.disabled():
        print(
            f"\ncrash test: {total} events, {duplicates} duplicate SMTP deliveries "
            f"(bound {stack.max_in_flight} in flight), "
            f"{sum(len(v) for v in grouped.values()) - total} republished statuses"
        )
    assert 0 <= duplicates <= stack.max_in_flight


async def _end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    """Each partition's end offset (records start at 0: nothing is deleted in a test)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        ends = await consumer.end_offsets(partitions)
    finally:
        await consumer.stop()
    return {tp.partition: int(offset) for tp, offset in ends.items()}


async def _committed_offsets(
    bootstrap: str, group_id: str, topic: str, partitions: Sequence[int]
) -> dict[int, int]:
    """The group's committed offset of each of these partitions of `topic` that has one."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group_id, enable_auto_commit=False
    )
    await consumer.start()
    try:
        committed = {}
        for partition in partitions:
            offset = await consumer.committed(TopicPartition(topic, partition))
            if offset is not None:
                committed[partition] = offset
    finally:
        await consumer.stop()
    return committed


def _ledger_of_missing(stack: Stack, published: list[bytes], grouped: dict[str, Any]) -> str:
    """What the send ledger says of the events without a status (to tell lost from stuck)."""
    missing = [e for e in (orjson.loads(v)["event_id"] for v in published) if e not in grouped]
    db = sqlite3.connect(stack.directory / "ledger.db")
    try:
        rows = [
            db.execute(
                "SELECT state, owner, outcome, attempts, status_published FROM send_ledger"
                " WHERE event_id = ?",
                (event_id,),
            ).fetchone()
            for event_id in missing[:10]
        ]
    finally:
        db.close()
    return f"{len(missing)} missing; ledger rows of the first: {rows}"


@pytest.mark.skipif(shutil.which("kcat") is None, reason="kcat not installed (Debian kcat)")
async def test_events_published_with_kcat_are_delivered(
    kcat_broker: tuple[EmbeddedBroker, ApiVersionsShim], tmp_path: Path
) -> None:
    # A client no one here wrote plays the claims system: kcat -P -K: (key:value lines).
    running, shim = kcat_broker
    async with sandbox_stack(running, tmp_path, accept_domains(22)) as stack:
        values = stack.events(25, seed=12)
        lines = b"".join(member_key(v) + b"|" + v + b"\n" for v in values)
        kcat = await asyncio.create_subprocess_exec(
            "kcat",
            "-P",
            "-b",
            shim.bootstrap,
            "-t",
            stack.events_topic,
            "-K|",
            stdin=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(kcat.communicate(lines), 60)
        assert kcat.returncode == 0, err.decode()[-500:]
        config = stack.config()
        config = replace(config, kafka=replace(config.kafka, bootstrap=shim.bootstrap))
        _, stop, task = await start_worker(config)
        records = await read_topic(shim.bootstrap, stack.delivery_topic, until=25)
        stop.set()
        await asyncio.wait_for(task, 30)
    grouped = statuses(records)
    assert len(grouped) == 25
    assert {items[0].status for items in grouped.values()} == {"delivered"}
    assert sum(stack.sandbox.counts.values()) == 25


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as handle:
        return [int(child) for child in handle.read().split()]


def _running(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def _is_worker(pid: int) -> bool:
    with open(f"/proc/{pid}/cmdline", "rb") as handle:
        return b"spawn_main" in handle.read()


async def _exposition(port: int) -> str:
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    response.raise_for_status()
    return response.text


async def _health(port: int) -> tuple[int, dict[str, Any]]:
    async with httpx.AsyncClient() as client:
        reply = await client.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
    return reply.status_code, orjson.loads(reply.content)


async def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(await _exposition(port))
        for sample in family.samples
    }


def _promtool_problems(exposition: str) -> str | None:
    """What Prometheus's own linter says of a scrape (None: no promtool here)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        return None
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=exposition, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    return checked.stdout + checked.stderr if checked.returncode else ""


async def test_eobblast_run_serves_every_workers_metrics_and_counts_restarts(
    stack: Stack, tmp_path: Path
) -> None:
    # The command an operator runs: two worker processes, one metrics endpoint for both,
    # and /healthz beside it for the orchestrator.
    total = 200
    await stack.publish(stack.events(total, seed=12))
    port = free_port()
    settings = stack.settings(count=2, restart_delay=3.0)
    settings["metrics"] = {"port": port, "address": "127.0.0.1"}
    process = await start_eobblast_run(settings, tmp_path / "eobblast.toml")
    delivered = ("eobblast_events_total", (("outcome", "delivered"), ("reason", "delivered")))
    restarts = ("eobblast_worker_restarts_total", ())
    try:
        records = await read_topic(stack.broker.bootstrap, stack.delivery_topic, until=total)
        assert len(statuses(records)) == total
        scraped = await _scrape(port)
        assert scraped[delivered] == total  # both workers' counts, summed
        assert scraped.get(restarts, 0) == 0
        # One producer wrote the events: no hole in their offsets, none read again.
        assert scraped.get(("eobblast_offset_rereads_total", ()), 0) == 0
        # The endpoint Prometheus scrapes, as Prometheus's own linter reads it (Debian
        # prometheus; make system-deps installs it).
        assert _promtool_problems(await _exposition(port)) in ("", None)
        workers = [pid for pid in _children(process.pid) if _is_worker(pid)]
        assert len(workers) == 2
        code, health = await _health(port)
        assert (code, health["status"], health["alive"]) == (200, "ok", 2)
        os.kill(workers[0], signal.SIGKILL)
        deadline = time.monotonic() + 30
        seen = []  # /healthz while the worker is down, then back
        while (await _scrape(port)).get(restarts, 0) < 1 and time.monotonic() < deadline:
            seen.append(await _health(port))
            await asyncio.sleep(0.2)
        scraped = await _scrape(port)
        assert scraped[restarts] == 1
        assert scraped[delivered] == total  # a dead worker's counts are kept
        down = [health for code, health in seen if code == 503]
        assert any(health["alive"] == 1 and len(health["restarting"]) == 1 for health in down)
        # Back to 200 once the new worker runs (if the dead one had lived under 10 s, once
        # the new one has lived that long: a crash loop is not health).
        while (await _health(port))[0] != 200 and time.monotonic() < deadline + 15:  # noqa: ASYNC110 - polling another process
            await asyncio.sleep(0.2)
        code, health = await _health(port)
        assert (code, health["alive"], health["restarts"]) == (200, 2, 1)
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 60) == 0


async def test_workers_stop_when_their_supervisor_is_killed(stack: Stack, tmp_path: Path) -> None:
    # SIGKILL (or the OOM killer) takes the supervisor: its workers must not run on as
    # orphans nobody restarts or stops.
    process = await start_eobblast_run(stack.settings(count=1), tmp_path / "eobblast.toml")
    deadline = time.monotonic() + 60
    workers: list[int] = []
    while not workers and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        workers = [pid for pid in _children(process.pid) if _is_worker(pid)]
    assert workers, "no worker started"
    process.kill()
    await process.wait()
    deadline = time.monotonic() + 60
    while _running(workers[0]) and time.monotonic() < deadline:  # noqa: ASYNC110 - polling another process
        await asyncio.sleep(0.2)
    alive = _running(workers[0])
    if alive:
        os.kill(workers[0], signal.SIGKILL)
    assert not alive, "the worker outlived its supervisor"


async def test_eobblast_bounces_serves_the_listeners_metrics(stack: Stack, tmp_path: Path) -> None:
    listen, metrics_port = free_port(), free_port()
    settings = stack.settings()
    settings["bounces"] |= {"listen_port": listen, "metrics_port": metrics_port}
    config_file = tmp_path / "eobblast.toml"
    config_file.write_text(tomli_w.dumps(settings))
    # The listener reads the workers' keys, never makes its own: create them as a deploy does.
    secrets = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "eobblast", "keys", "secrets", "--config", str(config_file),
        stdout=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert await asyncio.wait_for(secrets.wait(), 60) == 0
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "eobblast", "bounces", "--config", str(config_file),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    reviewed = ("eobblast_bounce_messages_total", (("result", "review"),))
    # Shaped like a return path, readable by no one: kept for review.
    rcpt = "bounces+" + "a" * 30 + "@" + load_config(config_file).bounces.bounce_domain
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and process.returncode is None:
            with contextlib.suppress(OSError):
                async with aiosmtplib.SMTP(hostname="127.0.0.1", port=listen, timeout=5) as smtp:
                    # Shaped like a return path, readable by no one: kept for review.
                    rcpt = (
                        "bounces+" + "a" * 30 + "@" + load_config(config_file).bounces.bounce_domain
                    )
                    await smtp.sendmail("", [rcpt], b"Subject: hi\r\n\r\nnot a bounce\r\n")
                    break
            await asyncio.sleep(0.2)
        scraped = await _scrape(metrics_port)
        assert scraped[reviewed] == 1
        # Results not met yet are exported at 0: an alert on the first handler error
        # needs a sample before it.
        assert scraped[("eobblast_bounce_messages_total", (("result", "handler_error"),))] == 0
    finally:
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_what_shaping_holds_back_is_postponed_not_bounced(
    stack: Stack, tmp_path: Path
) -> None:
    # One IP on warm-up day 0 sends 5 an hour to the sandbox's provider ("other"); with no
    # wait allowed, the rest are held back by eobblast itself. They used to go through
    # the soft-bounce path: a bounce audit record and count, the soft-bounce schedule,
    # and paper after 72 h of one's own throttling.
    today = dt.datetime.now(dt.UTC).date().isoformat()
    pools = tmp_path / "pools.toml"
    pools.write_text(
        'default_pool = "cold"\n[classes]\neob = "cold"\n[[pools.cold.ips]]\n'
        f'address = "127.0.0.1"\nehlo = "mta1.payer.test"\nwarmup_start = {today}\n'
    )
    settings = stack.settings()
    settings["shaping"] = {
        "pools_file": str(pools),
        "budgets_url": f"sqlite:///{tmp_path / 'budgets.db'}",
        "max_wait_seconds": 0,
    }
    config = load_config(environ={}, overrides=settings)
    soft_before = sum(
        _sample("eobblast_bounces_total", category="soft", provider="other", source=source)
        for source in ("sync", "dsn")
    )
    postponed_before = _sample("eobblast_bounce_postponed_total")
    values = stack.events(12, seed=31)
    await stack.publish(values)
    services = await ProtectionServices.open(config)
    _, stop, task = await start_worker(config, protection=services, bounce_store_as=lambda s: s)
    try:
        records = await read_topic(stack.broker.bootstrap, stack.delivery_topic, until=12)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await services.close()
    final = {key: items[-1] for key, items in statuses(records).items()}
    held = {key: s for key, s in final.items() if s.status == "deferred"}
    delivered = [key for key, s in final.items() if s.status == "delivered"]
    # 5 an hour (10 if the test straddles an hour): the rest wait, none is lost.
    assert len(held) + len(delivered) == 12 and 2 <= len(held) <= 7
    assert sum(stack.sandbox.counts.values()) == len(delivered)
    for status in held.values():
        # eobblast sends it again itself: scheduled, and no bounce.
        assert status.reason == "retry_scheduled" and status.bounce_category is None
        # When the budget's next hour starts, not on the soft-bounce schedule.
        assert status.retry_at is not None and status.retry_at.timestamp() % 3600 == 0
    assert _sample("eobblast_bounce_postponed_total") - postponed_before == len(held)
    soft_after = sum(
        _sample("eobblast_bounces_total", category="soft", provider="other", source=source)
        for source in ("sync", "dsn")
    )
    assert soft_after == soft_before
    store = await open_bounce_store(config.bounces.store_url)
    audit = await open_audit(config.portal.audit_url)
    try:
        counts = await store.status_counts()
        assert counts.get(EobStatus.RETRY_SCHEDULED, 0) == len(held)
        for event_id in held:
            actions = {r.action for r in await audit.records(event_id)}
            assert AuditAction.BOUNCE not in actions and AuditAction.SENT not in actions
    finally:
        await store.close()
        await audit.close()


class FlakyLedger(FaultyClaims):
    """A send ledger whose store is away for its first `finishes` finishes and `marks`
    status marks."""

    def __init__(self, inner: SendLedger, *, finishes: int = 0, marks: int = 0) -> None:
        super().__init__(inner, [])
        self.finishes = finishes
        self.marks = marks

    async def finish(self, event_id: str, outcome: str, reason: str) -> None:
        if self.finishes > 0:
            self.finishes -= 1
            raise sqlite3.OperationalError("database is locked")
        await self.inner.finish(event_id, outcome, reason)

    async def mark_published(self, marks: Sequence[tuple[str, int]]) -> None:
        if self.marks > 0:
            self.marks -= 1
            raise sqlite3.OperationalError("database is locked")
        await self.inner.mark_published(marks)


async def test_a_ledger_away_after_the_send_never_means_a_second_email(stack: Stack) -> None:
    # The receiver took the notice, then the ledger could not record it: running the
    # record again found its own claim and sent a second copy.
    retries = _sample("eobblast_ledger_finish_retries_total")
    flaky: list[FlakyLedger] = []

    def wrap(ledger: SendLedger) -> SendLedger:
        flaky.append(FlakyLedger(ledger, finishes=3))
        return flaky[-1]

    event_id, (status,) = await one_event_through(stack, 41, ledger_as=wrap)
    assert status.status == "delivered" and sum(stack.sandbox.counts.values()) == 1
    assert flaky[0].finishes == 0
    assert _sample("eobblast_ledger_finish_retries_total") - retries == 3
    entry = await _ledger_entry(stack, event_id)
    assert entry is not None and entry.outcome == "delivered"


async def test_status_marks_the_ledger_cannot_write_do_not_stop_the_worker(stack: Stack) -> None:
    # mark_published raising ended the worker's loop: a restart, and in-flight sends cut.
    flaky: list[FlakyLedger] = []

    def wrap(ledger: SendLedger) -> SendLedger:
        flaky.append(FlakyLedger(ledger, marks=1000))
        return flaky[-1]

    values = stack.events(20, seed=42)
    await stack.publish(values)
    _, stop, task = await start_worker(stack.config(), ledger_as=wrap)  # commits every 0.2 s
    try:
        records = await read_topic(stack.broker.bootstrap, stack.delivery_topic, until=20)
        await asyncio.sleep(1.0)  # several commits, each failing to mark
        assert not task.done()
        flaky[0].marks = 0  # back: the marks kept meanwhile are written
        await asyncio.sleep(1.0)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    assert len(statuses(records)) == 20 and sum(stack.sandbox.counts.values()) == 20
    ledger = await open_ledger(stack.config().ledger.url)
    try:
        entries = [await ledger.get(orjson.loads(v)["event_id"]) for v in values]
    finally:
        await ledger.close()
    assert all(e is not None and e.status_published for e in entries)


async def test_a_deferred_event_published_again_is_sent_when_no_bounce_service_resends_it(
    stack: Stack,
) -> None:
    # Without [bounces], a deferred notice's status tells the claims system to publish it
    # again. Its copy used to find the ledger's final row and end as a skipped duplicate.
    async def deferred_earlier(ledger: SendLedger, event_id: str) -> None:
        await ledger.claim(event_id, "an-earlier-worker")
        await ledger.finish(event_id, "deferred", "temporary_failure")
        await ledger.mark_published([(event_id, 1)])

    status = await _after_a_ledger_row(stack, 43, deferred_earlier)
    assert (status.status, status.attempt) == ("delivered", 2)
    assert sum(stack.sandbox.counts.values()) == 1
    # The second attempt's status mark is written: its row can be forgotten in time.
    assert status.event_id is not None
    entry = await _ledger_entry(stack, status.event_id)
    assert entry is not None and entry.attempts == 2 and entry.status_published


async def test_a_status_this_worker_published_for_an_earlier_attempt_is_not_the_later_ones(
    stack: Stack,
) -> None:
    # This worker sent attempt 1 and published its status; its lease had run out, another
    # worker took the event over (attempt 2) and died before publishing anything, and this
    # worker then recorded its outcome over attempt 2. The taken-over record, redelivered
    # here before the mark of attempt 1 was written, was skipped as a duplicate: attempt
    # 2's status never went out and its row stayed unmarked.
    (value,) = stack.events(1, seed=53)
    event_id = orjson.loads(value)["event_id"]
    ledger = await open_ledger(stack.config().ledger.url)
    try:
        await ledger.claim(event_id, "this-worker")
        await _age_ledger_rows(stack, [event_id], 60)
        assert (await ledger.claim(event_id, "a-worker-that-died")).kind is ClaimKind.RETRY
        await ledger.finish(event_id, "delivered", "delivered")
    finally:
        await ledger.close()
    flaky: list[FlakyLedger] = []

    def wrap(inner: SendLedger) -> SendLedger:
        flaky.append(FlakyLedger(inner, marks=1_000_000))  # attempt 1's mark stays pending
        return flaky[-1]

    worker, stop, task = await start_worker(stack.config(), ledger_as=wrap)
    try:
        worker._unmarked[event_id] = 1  # as _record_sent leaves it
        await stack.publish([value])
        records = await read_topic(stack.broker.bootstrap, stack.delivery_topic, until=1)
        flaky[0].marks = 0
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    ((status,),) = statuses(records).values()
    assert (status.event_id, status.status, status.attempt) == (event_id, "delivered", 2)
    assert sum(stack.sandbox.counts.values()) == 0  # a status published again, no email
    entry = await _ledger_entry(stack, event_id)
    assert entry is not None and entry.attempts == 2 and entry.status_published


async def _ledger_entry(stack: Stack, event_id: str) -> LedgerEntry | None:
    """The event's row in the stack's ledger, as it stands now."""
    ledger = await open_ledger(stack.config().ledger.url)
    try:
        return await ledger.get(event_id)
    finally:
        await ledger.close()


async def _age_ledger_rows(stack: Stack, event_ids: Sequence[str], seconds: float) -> None:
    """Time passes for these rows of the stack's SQLite ledger."""
    path = stack.config().ledger.url.removeprefix("sqlite:///")
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.executemany(
            "UPDATE send_ledger SET updated_at = updated_at - ? WHERE event_id = ?",
            [(seconds, event_id) for event_id in event_ids],
        )


async def test_a_worker_forgets_events_settled_longer_ago_than_the_retention(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker_module, "LEDGER_PURGE_EVERY", 0.2)
    base = stack.config()
    config = replace(base, ledger=replace(base.ledger, retention_days=5 / 86400))  # 5 s
    values = stack.events(3, seed=52)
    event_ids = [orjson.loads(value)["event_id"] for value in values]
    purged = REGISTRY.get_sample_value("eobblast_ledger_purged_total") or 0.0
    await stack.publish(values)
    _, stop, task = await start_worker(config)
    ledger = await open_ledger(config.ledger.url)
    try:
        await read_topic(stack.broker.bootstrap, stack.delivery_topic, until=3)
        deadline = time.monotonic() + 30
        while [event_id for event_id in event_ids if await ledger.get(event_id)]:
            assert time.monotonic() < deadline, "settled events outlived the retention"
            await asyncio.sleep(0.2)
    finally:
        await ledger.close()
        stop.set()
        await asyncio.wait_for(task, 30)
    # Recorded, then forgotten (not never recorded): the purge counted exactly these.
    assert (REGISTRY.get_sample_value("eobblast_ledger_purged_total") or 0.0) - purged == 3


async def test_a_worker_whose_clock_is_off_the_ledger_servers_says_so(
    stack: Stack,
    pg_ledger_url: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The bounce store's retry times and the shaping budgets read the workers' clocks: a
    # machine whose clock drifted must show in the metrics and the log.
    stack.ledger_url = pg_ledger_url
    real = time.time
    monkeypatch.setattr(ledger_module, "time", SimpleNamespace(time=lambda: real() + 90))
    metrics.CLOCK_SKEW.set(0)
    caplog.set_level(logging.WARNING, logger="eobblast.worker")
    _, stop, task = await start_worker(stack.config())
    try:
        deadline = time.monotonic() + 30
        while _sample("eobblast_clock_skew_seconds") == 0:
            assert time.monotonic() < deadline, "the worker never compared clocks"
            await asyncio.sleep(0.1)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    assert _sample("eobblast_clock_skew_seconds") == pytest.approx(90, abs=1)
    (warning,) = [r for r in caplog.records if "clock" in r.getMessage()]
    assert warning.server_minus_local_seconds == pytest.approx(-90, abs=1)  # type: ignore[attr-defined]


class UnreadableClock(FlakyLedger):
    """A ledger whose clock cannot be read (a driver fault, not a store outage)."""

    async def clock_offset(self) -> float | None:
        raise ValueError("no clock")


async def test_a_clock_that_cannot_be_compared_does_not_stop_the_worker(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="eobblast.worker")
    _, (status,) = await one_event_through(stack, 54, ledger_as=UnreadableClock)
    assert status.status == "delivered"
    assert sum(stack.sandbox.counts.values()) == 1
    (warning,) = [r for r in caplog.records if "clock" in r.getMessage()]
    assert warning.getMessage() == "clock not compared with the ledger: ValueError"


class RenewFailsOnce(FlakyLedger):
    """A ledger whose first renewal fails with an error that is not a store outage."""

    def __init__(self, inner: SendLedger) -> None:
        super().__init__(inner)
        self.renewals = 0

    async def renew(self, event_ids: Sequence[str], owner: str) -> None:
        self.renewals += 1
        if self.renewals == 1:
            raise ValueError("not a store error")
        await self.inner.renew(event_ids, owner)


async def test_claims_are_still_renewed_after_a_renewal_fails_oddly(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The renewer caught only store errors: any other one ended it for good, and every
    # claim of the worker then ran out while it was still sending (a second email each).
    monkeypatch.setattr(worker_module, "CLAIM_RENEW", 0.1)
    ledgers: list[RenewFailsOnce] = []

    def wrap(inner: SendLedger) -> SendLedger:
        ledgers.append(RenewFailsOnce(inner))
        return ledgers[-1]

    worker, stop, task = await start_worker(stack.config(), ledger_as=wrap)
    try:
        deadline = time.monotonic() + 20
        while ledgers[0].renewals < 3:
            assert time.monotonic() < deadline, "the renewer stopped after its failure"
            await asyncio.sleep(0.05)
        assert worker._consumer is not None
        # The group waits for a revocation as long as the worker may take to finish it.
        grace = stack.config().workers.grace_period
        expected = worker_module.revocation_timeout_ms(grace)
        assert worker._consumer._coordinator._rebalance_timeout_ms == expected
        # and a JoinGroup request waits that long without timing out first
        assert worker._consumer._client._request_timeout_ms >= expected + 5_000
        assert expected >= (grace + 2 * worker_module.COMMIT_TIMEOUT) * 1000
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def _after_a_ledger_row(
    stack: Stack, seed: int, prepare: Callable[[SendLedger, str], Awaitable[None]]
) -> DeliveryStatus:
    """One event through a worker after `prepare(ledger, event_id)` wrote its ledger row as
    another worker would have: its status."""
    (value,) = stack.events(1, seed=seed)
    event_id = orjson.loads(value)["event_id"]
    ledger = await open_ledger(stack.config().ledger.url)
    try:
        await prepare(ledger, event_id)
    finally:
        await ledger.close()
    await stack.publish([value])
    _, stop, task = await start_worker(stack.config())
    try:
        records = await read_topic(stack.broker.bootstrap, stack.delivery_topic, until=1)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    (status,) = statuses(records)[event_id]
    return status


async def test_an_event_a_live_worker_is_sending_is_waited_for_not_sent_again(
    stack: Stack,
) -> None:
    # Another worker, alive, holds the claim (it lost the partition while sending, or the
    # claims system published a copy under another key): this worker waits for its outcome.
    (value,) = stack.events(1, seed=44)
    event_id = orjson.loads(value)["event_id"]
    ledger = await open_ledger(stack.config().ledger.url)
    waits = _sample("eobblast_ledger_claim_waits_total")
    try:
        await ledger.claim(event_id, "another-worker")  # a lease of CLAIM_LEASE s
        await stack.publish([value])
        _, stop, task = await start_worker(stack.config())
        try:
            deadline = time.monotonic() + 20
            while _sample("eobblast_ledger_claim_waits_total") < waits + 2:
                assert time.monotonic() < deadline, "the worker never found the claim"
                await asyncio.sleep(0.1)
            assert sum(stack.sandbox.counts.values()) == 0
            await ledger.finish(event_id, "delivered", "delivered")  # the other one is done
            records = await read_topic(stack.broker.bootstrap, stack.delivery_topic, until=1)
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
    finally:
        await ledger.close()
    (status,) = statuses(records)[event_id]
    assert status.status == "delivered" and sum(stack.sandbox.counts.values()) == 0


async def test_a_claim_nobody_renews_is_taken_over_once_its_lease_runs_out(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A worker that gave the record up (revoked, stopping) or died holds a claim nobody
    # renews: another worker waits for the lease, then sends it (not never).
    monkeypatch.setattr(ledger_module, "CLAIM_LEASE", 2.0)

    async def given_up(ledger: SendLedger, event_id: str) -> None:
        await ledger.claim(event_id, "a-worker-that-gave-it-up")

    status = await _after_a_ledger_row(stack, 45, given_up)
    assert (status.status, status.attempt) == ("delivered", 2)
    assert sum(stack.sandbox.counts.values()) == 1


async def test_a_record_given_up_as_stuck_after_its_send_records_it_and_sends_nothing(
    stack: Stack,
) -> None:
    # The ledger is away long enough for the attempt to be given up (stuck_after): the
    # record runs again and records what was sent, instead of claiming and sending again.
    flaky: list[FlakyLedger] = []

    def wrap(ledger: SendLedger) -> SendLedger:
        flaky.append(FlakyLedger(ledger, finishes=6))
        return flaky[-1]

    config = stack.config(stuck_after=1.0)
    _, (status,) = await one_event_through(stack, 46, config, ledger_as=wrap)
    assert status.status == "delivered" and sum(stack.sandbox.counts.values()) == 1
    assert flaky[0].finishes == 0


class DownLedger(FlakyLedger):
    """A send ledger whose finishes fail while `down` is set."""

    def __init__(self, inner: SendLedger) -> None:
        super().__init__(inner)
        self.down = True

    async def finish(self, event_id: str, outcome: str, reason: str) -> None:
        if self.down:
            raise sqlite3.OperationalError("database is locked")
        await self.inner.finish(event_id, outcome, reason)


async def test_an_outcome_given_up_with_its_partition_is_written_when_the_ledger_returns(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Sent, the ledger away, then the partition revoked past the grace period: the record
    # is given up. Its outcome, kept in memory, must reach the ledger when it returns, or
    # the next owner would take the claim over and send a second email.
    monkeypatch.setattr(worker_module, "CLAIM_RENEW", 0.2)
    down: list[DownLedger] = []

    def wrap(ledger: SendLedger) -> SendLedger:
        down.append(DownLedger(ledger))
        return down[-1]

    (value,) = stack.events(1, seed=47)
    event_id = orjson.loads(value)["event_id"]
    await stack.publish([value])
    worker, stop, task = await start_worker(stack.config(grace_period=0.5), ledger_as=wrap)
    try:
        deadline = time.monotonic() + 30
        while sum(stack.sandbox.counts.values()) < 1:  # sent; its finish keeps failing
            assert time.monotonic() < deadline, "never sent"
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        await worker.partitions_revoked(set(worker._tasks))  # given up after 0.5 s
        assert event_id in worker._unrecorded
        down[0].down = False
        while event_id in worker._unrecorded:
            assert time.monotonic() < deadline, "the outcome was never written"
            await asyncio.sleep(0.05)
        entry = await down[0].inner.get(event_id)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    assert entry is not None and entry.state is LedgerState.FINAL
    assert entry.outcome == "delivered" and sum(stack.sandbox.counts.values()) == 1


class GatedClaims(FaultyClaims):
    """A send ledger whose claims wait until the gate opens: events stay in flight."""

    def __init__(self, inner: SendLedger, gate: asyncio.Event) -> None:
        super().__init__(inner, [])
        self.gate = gate

    async def claim(self, event_id: str, owner: str, *, retry_deferred: bool = False) -> Claim:
        await self.gate.wait()
        return await self.inner.claim(event_id, owner, retry_deferred=retry_deferred)


async def test_the_backlog_gauge_counts_what_is_not_accounted_for(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Claims held: the worker takes max_in_flight events and waits. The gauge counts those
    # and every one still on the broker, also those published while the worker is full
    # (it fetches nothing then), then falls to zero once all are delivered.
    monkeypatch.setattr(worker_module, "END_OFFSETS_EVERY", 0.5)
    count, later = 150, 100
    await stack.publish(stack.events(count, seed=57))
    gate = asyncio.Event()
    _, stop, task = await start_worker(
        stack.config(), ledger_as=lambda ledger: GatedClaims(ledger, gate)
    )
    try:
        await until(
            "every event counted as backlog",
            lambda: _ready(_sample("eobblast_backlog_events") == count),
        )
        assert _sample("eobblast_events_in_flight") == stack.max_in_flight < count
        # One record per batch: Tansu's end offset is one past the first record of a
        # partition's last batch (Kafka's is past its last record).
        producer = make_producer(
            stack.broker.bootstrap, client_id="test-claims", security=PLAINTEXT
        )
        await producer.start()
        try:
            for value in stack.events(later, seed=58):
                await producer.send_and_wait(stack.events_topic, value, key=member_key(value))
        finally:
            await producer.stop()
        await until(
            "the events published meanwhile counted",
            lambda: _ready(_sample("eobblast_backlog_events") == count + later),
        )
        gate.set()
        await until(
            "every event delivered",
            lambda: _ready(sum(stack.sandbox.counts.values()) == count + later),
        )
        await until("no backlog", lambda: _ready(_sample("eobblast_backlog_events") == 0))
    finally:
        gate.set()
        stop.set()
        await asyncio.wait_for(task, 30)


async def _ready(value: bool) -> bool:
    return value


async def test_a_worker_without_partitions_asks_one_end_offset_not_every_topic(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One partition, two workers: one of them idle. It still hears from the brokers, with
    # one end offset each time; the cluster's metadata (every topic) is for a broker that
    # does not answer that.
    monkeypatch.setattr(worker_module, "END_OFFSETS_EVERY", 0.2)
    monkeypatch.setattr(worker_module, "END_OFFSETS_TIMEOUT", 10.0)  # a busy machine's answers
    asked: dict[int, list[tuple[str, tuple[Any, ...]]]] = {}
    answered: dict[int, int] = {}

    def counted(name: str) -> Callable[..., Awaitable[Any]]:
        method = getattr(AIOKafkaConsumer, name)

        async def call(self: AIOKafkaConsumer, *args: Any) -> Any:
            asked.setdefault(id(self), []).append((name, args))
            result = await method(self, *args)
            answered[id(self)] = answered.get(id(self), 0) + 1
            return result

        return call

    for name in ("topics", "end_offsets"):
        monkeypatch.setattr(AIOKafkaConsumer, name, counted(name))
    topic = f"{stack.prefix}.one"
    settings = stack.settings()
    settings["kafka"]["events_topic"] = topic
    await stack.broker.create_topics({topic: 1})
    config = load_config(environ={}, overrides=settings)
    workers = [await start_worker(config, index) for index in range(2)]
    try:

        async def one_idle() -> Any:
            held = [bool(w._consumer and w._consumer.assignment()) for w, _, _ in workers]
            joined = all(w._consumer is not None for w, _, _ in workers)
            return joined and sorted(held) == [False, True] and workers[held.index(False)][0]

        async def settled() -> Any:
            # Both members joined (each a generation of its own), the same worker idle
            # through one second.
            idle = await one_idle()
            # (aiokafka's own record of the member's group generation: -1 before a join)
            coordinators = [getattr(w._consumer, "_coordinator", None) for w, _, _ in workers]
            generations = [getattr(c, "generation", -1) for c in coordinators]
            if not idle or -1 in generations:
                return None
            await asyncio.sleep(1)
            return idle if (await one_idle()) is idle else None

        idle = await until("one worker holds the partition", settled, seconds=60)
        consumer = idle._consumer
        assert consumer is not None
        before, heard = len(asked.get(id(consumer), [])), answered.get(id(consumer), 0)
        await asyncio.sleep(2)  # about ten rounds
        assert (await one_idle()) is idle
        rounds = asked[id(consumer)][before:]
        assert rounds and rounds == [("end_offsets", ([TopicPartition(topic, 0)],))] * len(rounds)
        assert answered[id(consumer)] > heard  # and the brokers answered it
    finally:
        for _, stop, _ in workers:
            stop.set()
        for _, _, task in workers:
            await asyncio.wait_for(task, 30)

"""eobblast.streams against a real Kafka-compatible broker (Tansu) and a foreign client (kcat)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from eobblast._holes import HOLE_SETTLE
from eobblast.observe import metrics
from eobblast.streams import (
    BrokerUnavailable,
    EmbeddedBroker,
    OffsetTracker,
    RebalanceListener,
    TopicPartition,
    backoff_delay,
    make_consumer,
    make_producer,
    wait_for_broker,
)
from eobblast.streams import kafka as kafka_module
from eobblast.streams.kafka import (
    MAX_REQUEST_SIZE,
    PLAINTEXT,
    AIOKafkaConsumer,
    MessageSizeTooLargeError,
    ReadAgain,
    ReadAgainListener,
    read_to_end,
)
from tests.kafka_fixtures import (
    FAST_GROUP,
    ApiVersionsShim,
    TopicFactory,
    unique_group,
)

Record = tuple[TopicPartition, int, bytes | None, bytes]
Client = TypeVar("Client", bound=Any)


@contextlib.asynccontextmanager
async def running_client(client: Client, *, seconds: float = 20) -> AsyncIterator[Client]:
    """An aiokafka consumer or producer, started and always stopped, each within `seconds`."""
    try:
        async with asyncio.timeout(seconds):
            await client.start()
        yield client
    finally:
        async with asyncio.timeout(seconds):
            await client.stop()


async def produce(bootstrap: str, topic: str, items: list[tuple[bytes, bytes]]) -> None:
    """Send (key, value) pairs and wait until the broker has them all."""
    async with running_client(
        make_producer(bootstrap, client_id="test-producer", security=PLAINTEXT)
    ) as producer:
        async with asyncio.timeout(20):
            for key, value in items:
                await producer.send_and_wait(topic, value, key=key)


async def take(consumer: AIOKafkaConsumer, count: int, *, seconds: float = 20) -> list[Record]:
    """The next `count` records from a started consumer."""
    records: list[Record] = []
    async with asyncio.timeout(seconds):
        while len(records) < count:
            batches = await consumer.getmany(timeout_ms=200)
            for tp, batch in batches.items():
                records += [(tp, r.offset, r.key, r.value) for r in batch]
    return records


async def until(check: Callable[[], bool], changed: asyncio.Event, *, seconds: float = 20) -> float:
    """Wait until `check()` holds, re-checking whenever `changed` is set; return the seconds."""
    started = time.monotonic()
    async with asyncio.timeout(seconds):
        while True:
            changed.clear()
            if check():
                return time.monotonic() - started
            await changed.wait()


async def test_group_consumer_commits_explicit_offsets(
    broker: EmbeddedBroker, topic_factory: TopicFactory
) -> None:
    topic = await topic_factory(partitions=2)
    await produce(broker.bootstrap, topic, [(f"k{i}".encode(), b"v%d" % i) for i in range(20)])
    tracker: OffsetTracker[TopicPartition] = OffsetTracker()
    consumer = make_consumer(
        broker.bootstrap,
        unique_group(),
        [topic],
        client_id="t",
        max_poll_records=7,
        security=PLAINTEXT,
        **FAST_GROUP,
    )
    async with running_client(consumer):
        records = await take(consumer, 20)
        for tp, offset, _, _ in records:
            tracker.handed_out(tp, offset)
        for tp, offset, _, _ in records:
            tracker.mark_done(tp, offset)
        offsets = tracker.committable()
        async with asyncio.timeout(10):
            await consumer.commit(offsets)
            tracker.mark_committed(offsets)
            committed = {tp: await consumer.committed(tp) for tp in offsets}
    ends = {tp: max(o for p, o, _, _ in records if p == tp) + 1 for tp, _, _, _ in records}
    assert committed == ends == offsets
    assert sum(ends.values()) == 20
    assert tracker.committable() == {}


async def test_new_member_resumes_after_the_committed_offset(
    broker: EmbeddedBroker, topic_factory: TopicFactory
) -> None:
    topic = await topic_factory(partitions=1)
    await produce(broker.bootstrap, topic, [(b"k", b"v%d" % i) for i in range(10)])
    group = unique_group()
    tracker: OffsetTracker[TopicPartition] = OffsetTracker()
    first = make_consumer(
        broker.bootstrap,
        group,
        [topic],
        client_id="a",
        max_poll_records=10,
        security=PLAINTEXT,
        **FAST_GROUP,
    )
    async with running_client(first):
        records = await take(first, 10)
        for tp, offset, _, _ in records:
            tracker.handed_out(tp, offset)
        # Offset 6 is still in flight when the member stops: 7 is done but not committable.
        for tp, offset, _, _ in records:
            if offset != 6:
                tracker.mark_done(tp, offset)
        offsets = tracker.committable()
        assert offsets == {TopicPartition(topic, 0): 6}
        async with asyncio.timeout(10):
            await first.commit(offsets)

    second = make_consumer(
        broker.bootstrap,
        group,
        [topic],
        client_id="b",
        max_poll_records=10,
        security=PLAINTEXT,
        **FAST_GROUP,
    )
    async with running_client(second):
        again = await take(second, 4)
    assert [offset for _, offset, _, _ in again] == [6, 7, 8, 9]
    assert [value for _, _, _, value in again] == [b"v6", b"v7", b"v8", b"v9"]


class RecordingListener(RebalanceListener):
    """Remembers what was revoked and assigned, and when; sets `changed` after each."""

    def __init__(self, changed: asyncio.Event) -> None:
        self.events: list[tuple[float, str, frozenset[int]]] = []
        self._changed = changed

    def _record(self, kind: str, partitions: set[TopicPartition]) -> None:
        self.events.append((time.monotonic(), kind, frozenset(p.partition for p in partitions)))
        self._changed.set()

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self._record("revoked", revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._record("assigned", assigned)


async def keep_polling(consumer: AIOKafkaConsumer, stop: asyncio.Event) -> None:
    """What a worker does between batches: poll, so the member stays in the group."""
    while not stop.is_set():
        await consumer.getmany(timeout_ms=100)


async def test_two_members_split_partitions_and_one_takes_over(
    broker: EmbeddedBroker, topic_factory: TopicFactory, record_property: Callable[..., None]
) -> None:
    topic = await topic_factory(partitions=4)
    group = unique_group()
    changed = asyncio.Event()
    listener_one, listener_two = RecordingListener(changed), RecordingListener(changed)
    one = make_consumer(
        broker.bootstrap,
        group,
        [topic],
        client_id="one",
        max_poll_records=10,
        rebalance_listener=listener_one,
        security=PLAINTEXT,
        **FAST_GROUP,
    )
    two = make_consumer(
        broker.bootstrap,
        group,
        [topic],
        client_id="two",
        max_poll_records=10,
        rebalance_listener=listener_two,
        security=PLAINTEXT,
        **FAST_GROUP,
    )
    stop_one, stop_two = asyncio.Event(), asyncio.Event()
    try:
        started = time.monotonic()
        async with asyncio.timeout(20):
            await one.start()
        first_join = time.monotonic() - started
        assert {tp.partition for tp in one.assignment()} == {0, 1, 2, 3}
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(keep_polling(one, stop_one))

            started = time.monotonic()
            async with asyncio.timeout(20):
                await two.start()
            poll_two = tasks.create_task(keep_polling(two, stop_two))
            await until(lambda: len(one.assignment()) == len(two.assignment()) == 2, changed)
            split = time.monotonic() - started
            assert one.assignment() | two.assignment() == {
                TopicPartition(topic, p) for p in range(4)
            }

            started = time.monotonic()
            stop_two.set()
            await poll_two
            async with asyncio.timeout(20):
                await two.stop()
            await until(lambda: len(one.assignment()) == 4, changed)
            takeover = time.monotonic() - started
            stop_one.set()
    finally:
        stop_one.set()
        stop_two.set()
        async with asyncio.timeout(20):
            await two.stop()
            await one.stop()

    kinds_one = [kind for _, kind, _ in listener_one.events]
    assert kinds_one[-2:] == ["revoked", "assigned"]
    assert listener_one.events[-1][2] == frozenset({0, 1, 2, 3})
    assert ("assigned", 2) in [(kind, len(parts)) for _, kind, parts in listener_two.events]
    # Measured, not asserted: Tansu's group timing (see DEFAULT_SESSION_TIMEOUT_MS in kafka.py).
    timings = {"first_join_s": first_join, "join_split_s": split, "leave_takeover_s": takeover}
    for name, value in timings.items():
        record_property(name, round(value, 2))
    print(f"\nTansu group timings (session {FAST_GROUP['session_timeout_ms']} ms): {timings}")


@pytest.mark.skipif(shutil.which("kcat") is None, reason="kcat not installed (Debian kcat)")
async def test_kcat_publishes_and_aiokafka_reads_the_key(
    kcat_broker: tuple[EmbeddedBroker, ApiVersionsShim],
) -> None:
    running, shim = kcat_broker
    topic = "kcat-interop"
    await running.create_topics({topic: 1})
    process = await asyncio.create_subprocess_exec(
        "kcat",
        "-P",
        "-b",
        shim.bootstrap,
        "-t",
        topic,
        "-K:",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(20):
            _, stderr = await process.communicate(b"member-42:notice body with: a colon\n")
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, stderr.decode(errors="replace")
    assert shim.rewritten >= 1

    consumer = AIOKafkaConsumer(bootstrap_servers=shim.bootstrap, enable_auto_commit=False)
    async with running_client(consumer):
        consumer.assign([TopicPartition(topic, 0)])
        await consumer.seek_to_beginning()
        [(_, offset, key, value)] = await take(consumer, 1)
    assert (offset, key, value) == (0, b"member-42", b"notice body with: a colon")


@pytest.mark.skipif(shutil.which("kcat") is None, reason="kcat not installed (Debian kcat)")
async def test_kcat_cannot_talk_to_tansu_directly(broker: EmbeddedBroker) -> None:
    """Pins the reason for ApiVersionsShim: when this fails, kcat or Tansu was fixed."""
    process = await asyncio.create_subprocess_exec(
        "kcat",
        "-L",
        "-m",
        "2",
        "-b",
        broker.bootstrap,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(20):
            _, stderr = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode != 0
    assert b"ApiVersionRequest failed" in stderr


async def test_broker_lost_and_back_on_the_same_port(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with EmbeddedBroker(log_dir=tmp_path) as lost:
        port = lost.port
        assert await wait_for_broker(lost.bootstrap, security=PLAINTEXT) == 1
        await lost.stop()
        retries: list[tuple[int, str, float]] = []

        async def come_back() -> None:
            await asyncio.sleep(0.6)
            await lost.start()

        loop = asyncio.get_running_loop()
        with caplog.at_level(logging.WARNING, logger="eobblast.streams.kafka"):
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(come_back())
                attempts = await wait_for_broker(
                    lost.bootstrap,
                    deadline=loop.time() + 15,
                    on_retry=lambda n, error, delay: retries.append(
                        (n, type(error).__name__, delay)
                    ),
                    security=PLAINTEXT,
                )
        assert lost.port == port
        assert attempts == len(retries) + 1 >= 2
        assert {name for _, name, _ in retries} == {"ConnectionRefusedError"}
        assert all(0 < delay <= 5.0 for _, _, delay in retries)
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1  # once per 30 s, not once per attempt
        assert warnings[0].__dict__["bootstrap"] == lost.bootstrap


async def test_wait_for_broker_gives_up_at_the_deadline() -> None:
    loop = asyncio.get_running_loop()
    with pytest.raises(BrokerUnavailable, match=r"unreachable after .* ConnectionRefused"):
        await wait_for_broker("127.0.0.1:1", deadline=loop.time() + 0.5, security=PLAINTEXT)


async def test_ten_megabyte_value_goes_through(
    broker: EmbeddedBroker, topic_factory: TopicFactory
) -> None:
    """Tansu has no record size limit; fetches return an oversized first batch whole.

    So a 10 MB poison record reaches the consumer (which rejects it as too large) instead of
    wedging the partition, and the record after it is delivered too. Apache Kafka refuses it
    at produce time unless the topic's max.message.bytes is raised.
    """
    topic = await topic_factory(partitions=1)
    big = os.urandom(10 * 1024 * 1024)
    await produce(broker.bootstrap, topic, [(b"big", big), (b"small", b"after")])
    consumer = make_consumer(
        broker.bootstrap,
        unique_group(),
        [topic],
        client_id="t",
        max_poll_records=10,
        security=PLAINTEXT,
        **FAST_GROUP,
    )
    async with running_client(consumer):
        records = await take(consumer, 2)
    assert [(offset, key) for _, offset, key, _ in records] == [(0, b"big"), (1, b"small")]
    assert hashlib.sha256(records[0][3]).digest() == hashlib.sha256(big).digest()
    assert records[1][3] == b"after"


async def test_value_over_max_request_size_fails_before_the_network(
    broker: EmbeddedBroker, topic_factory: TopicFactory
) -> None:
    topic = await topic_factory(partitions=1)
    async with running_client(
        make_producer(broker.bootstrap, client_id="t", security=PLAINTEXT)
    ) as producer:
        with pytest.raises(MessageSizeTooLargeError):
            async with asyncio.timeout(10):
                await producer.send_and_wait(topic, bytes(MAX_REQUEST_SIZE + 1))


async def test_broker_start_failures_say_why(tmp_path: Path) -> None:
    with pytest.raises(BrokerUnavailable, match="not executable"):
        await EmbeddedBroker(binary=str(tmp_path / "missing"), log_dir=tmp_path).start()

    with pytest.raises(BrokerUnavailable, match=r"exited with code 1"):
        await EmbeddedBroker(binary=shutil.which("false") or "/bin/false", log_dir=tmp_path).start()

    async with EmbeddedBroker(log_dir=tmp_path / "a") as running:
        taken = EmbeddedBroker(port=running.port, log_dir=tmp_path / "b")
        with pytest.raises(BrokerUnavailable, match="is in use"):
            await taken.start()
        assert not taken.running


def test_backoff_doubles_caps_and_keeps_half() -> None:
    lows = [backoff_delay(n, base=0.1, cap=5.0, rand=lambda: 0.0) for n in range(1, 12)]
    highs = [backoff_delay(n, base=0.1, cap=5.0, rand=lambda: 1.0) for n in range(1, 12)]
    assert highs[:4] == pytest.approx([0.1, 0.2, 0.4, 0.8])
    assert lows[:2] == pytest.approx([0.05, 0.1])
    assert max(highs) == 5.0 and highs[-1] == 5.0 and lows[-1] == 2.5
    assert backoff_delay(10_000) <= 5.0
    with pytest.raises(ValueError):
        backoff_delay(0)


async def test_read_to_end_reads_what_was_there_once_and_stops_while_records_arrive(
    broker: EmbeddedBroker, topic_factory: TopicFactory
) -> None:
    topic = await topic_factory(partitions=3)
    big = b"b" * (1400 * 1024)  # larger than one partition fetch (1 MiB)
    # Batches of several records (one send_batch-like burst per partition) and single ones:
    # Tansu reports a partition's end inside its last batch.
    first = [(f"k{i % 10}".encode(), f"v{i}".encode()) for i in range(40)]
    async with running_client(
        make_producer(broker.bootstrap, client_id="burst", security=PLAINTEXT)
    ) as producer:
        await asyncio.gather(*[await producer.send(topic, v, key=k) for k, v in first])
    await produce(broker.bootstrap, topic, [(b"k0", big), (b"k1", b"single")])
    await produce(broker.bootstrap, topic, [(b"k2", f"w{i}".encode()) for i in range(5)])
    there = {value for _, value in first} | {big, b"single"} | {f"w{i}".encode() for i in range(5)}

    async def keep_appending(stop: asyncio.Event) -> int:
        sent = 0
        async with running_client(
            make_producer(broker.bootstrap, client_id="appender", security=PLAINTEXT)
        ) as p:
            while not stop.is_set():
                await p.send_and_wait(topic, f"late{sent}".encode(), key=b"k1")
                sent += 1
                await asyncio.sleep(0.05)
        return sent

    stop = asyncio.Event()
    appender = asyncio.create_task(keep_appending(stop))
    await asyncio.sleep(0.3)  # records arriving before and during the read
    try:
        async with asyncio.timeout(60):
            records = [
                r
                async for r in read_to_end(
                    broker.bootstrap, topic, client_id="t", security=PLAINTEXT
                )
            ]
    finally:
        stop.set()
        appended = await appender
    values = [r.value for r in records]
    assert appended > 0
    assert there <= set(values)  # everything there at the start, the big record too
    positions = [(r.partition, r.offset) for r in records]
    assert len(positions) == len(set(positions))  # each once
    assert len({r.partition for r in records}) > 1


async def test_read_to_end_of_a_missing_topic_says_so(broker: EmbeddedBroker) -> None:
    with pytest.raises(BrokerUnavailable, match="has no topic no-such-topic"):
        async for _ in read_to_end(
            broker.bootstrap, "no-such-topic", client_id="t", security=PLAINTEXT
        ):
            pass


@pytest.mark.parametrize(
    ("settle", "committed", "early", "first", "rereads"),
    [
        pytest.param(HOLE_SETTLE, 3, False, 3, 1, id="read-again"),
        # aiokafka can fetch before the listener runs: the position has moved by then, so
        # where the partition starts is asked of the group (or, with no commit, the log).
        pytest.param(HOLE_SETTLE, 3, True, 3, 1, id="fetched-before-the-listener"),
        pytest.param(HOLE_SETTLE, None, True, 0, 1, id="nothing-committed"),
        # kafka.hole_settle = 0, for Apache Kafka: the hole is believed, nothing read again.
        pytest.param(0.0, 3, False, 6, 0, id="believed-at-once"),
    ],
)
async def test_a_hole_at_the_start_of_a_partition_is_read_again_from_the_committed_offset(
    broker: EmbeddedBroker,
    topic_factory: TopicFactory,
    settle: float,
    committed: int | None,
    early: bool,
    first: int,
    rereads: int,
) -> None:
    # A group's committed offset is 3 (or nothing is committed: the partition starts at
    # 0), and the first fetch after the assignment hands out records from 6 on (as Tansu
    # can while a produce before them is still being stored): the reader takes none of
    # them, goes back to the start, and gets every record from there, each once, in
    # order. Told to believe holes at once, it takes 6 to 9 as fetched.
    topic = await topic_factory(partitions=1)
    await produce(broker.bootstrap, topic, [(b"k", b"v%d" % i) for i in range(10)])
    tp = TopicPartition(topic, 0)
    group = unique_group()
    if committed is not None:
        async with running_client(
            AIOKafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=group)
        ) as committer:
            committer.assign([tp])
            async with asyncio.timeout(10):
                await committer.commit({tp: committed})

    class SkipsAhead(ReadAgainListener):
        """Moves the consumer past where the partition starts, before or after learning it."""

        async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
            assert self.consumer is not None
            if early:
                self.consumer.seek(tp, 6)
            await super().on_partitions_assigned(assigned)
            self.consumer.seek(tp, 6)

    listening = SkipsAhead(ReadAgain(settle))
    consumer = make_consumer(
        broker.bootstrap, group, [topic], client_id="t", max_poll_records=100,
        rebalance_listener=listening, security=PLAINTEXT, **FAST_GROUP,
    )  # fmt: skip
    before = metrics.REGISTRY.get_sample_value("eobblast_offset_rereads_total")
    taken: list[int] = []
    async with running_client(consumer):
        async with asyncio.timeout(20):
            while len(taken) < 10 - first:
                batch = await consumer.getmany(timeout_ms=200)
                for got in batch.values():
                    taken += [r.offset for r in listening.holes.records(consumer, tp, got)]
                    assert not taken or taken[0] == first, taken
    assert taken == list(range(first, 10))
    assert before is not None
    assert metrics.REGISTRY.get_sample_value("eobblast_offset_rereads_total") == before + rereads


async def test_every_reader_takes_committed_records_only(
    broker: EmbeddedBroker, topic_factory: TopicFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A claims system that aborts a transaction takes its events back. Tansu refuses
    # transactional producers, so this shows what each kind of reader asks the brokers for
    # (Kafka then leaves out aborted records and holds back open transactions), and that it
    # reads what was written without a transaction as before.
    asked: list[str | None] = []

    class Asked(AIOKafkaConsumer):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            asked.append(kwargs.get("isolation_level"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(kafka_module, "AIOKafkaConsumer", Asked)
    topic = await topic_factory(partitions=1)
    await produce(broker.bootstrap, topic, [(b"k", b"v")])
    consumer = make_consumer(
        broker.bootstrap,
        unique_group(),
        [topic],
        client_id="t",
        max_poll_records=10,
        security=PLAINTEXT,
        **FAST_GROUP,
    )
    async with running_client(consumer):
        grouped = [value for *_, value in await take(consumer, 1)]
    read = [
        r.value
        async for r in read_to_end(broker.bootstrap, topic, client_id="t", security=PLAINTEXT)
    ]
    assert grouped == read == [b"v"]
    assert asked == ["read_committed", "read_committed"]
    # And every other consumer eobblast makes is given the same options.
    sources = {
        path.name: path.read_text()
        for path in Path(kafka_module.__file__).parents[1].rglob("*.py")
        if "AIOKafkaConsumer(" in path.read_text()
    }
    assert list(sources) == ["kafka.py"]
    made = sources["kafka.py"].count("AIOKafkaConsumer(")
    assert made >= 2 and sources["kafka.py"].count("**_reader_options(security),") == made

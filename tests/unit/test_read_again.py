"""What a reader takes of a fetch (`ReadAgain`): only records of partitions its listener holds,
checked against where each starts (asked of the broker), holes read again as
`kafka.hole_settle` says; and the same through a worker."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from types import SimpleNamespace
from typing import Any, cast

import pytest

from eobblast.config import load_config
from eobblast.pipeline import Pipeline
from eobblast.state.ledger import SendLedger
from eobblast.streams import TopicPartition, kafka
from eobblast.streams.kafka import AIOKafkaConsumer, KafkaError, ReadAgain, ReadAgainListener
from eobblast.worker import Worker, _Listener, new_worker_id

TP = TopicPartition("eob.events", 0)


class _Consumer:
    """A fetch's records, the group's committed offsets and the partitions' first ones (as
    the broker answers), and where the reader sends the consumer back to."""

    def __init__(
        self,
        committed: Mapping[TopicPartition, int | None] | None = None,
        firsts: Mapping[TopicPartition, int] | None = None,
    ) -> None:
        self.batch: Mapping[TopicPartition, Sequence[Any]] = {}
        self.seeks: list[tuple[TopicPartition, int]] = []
        self.commits: dict[TopicPartition, int | None] = dict(committed or {TP: 3})
        self.firsts: dict[TopicPartition, int] = dict(firsts or {})
        self.firsts_fail = False
        # Lookups answer only once this many are under way (None: at once).
        self.answer_together: int | None = None
        self._asked = 0
        self._all_asked = asyncio.Event()

    async def getmany(self, *, timeout_ms: int, max_records: int) -> Any:
        return self.batch

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append((tp, offset))

    async def committed(self, tp: TopicPartition) -> int | None:
        self._asked += 1
        if self.answer_together is not None:
            if self._asked >= self.answer_together:
                self._all_asked.set()
            await self._all_asked.wait()
        if tp not in self.commits:
            await asyncio.Event().wait()  # never answers
        return self.commits[tp]

    async def beginning_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        await asyncio.sleep(0)  # a request, as the broker's
        if self.firsts_fail:
            raise KafkaError("no first offsets")
        return {tp: self.firsts.get(tp, 0) for tp in tps}


def _records(*offsets: int) -> list[Any]:
    return [SimpleNamespace(offset=offset, key=b"M-1") for offset in offsets]


def _worker(**kafka: Any) -> tuple[Worker, _Consumer, _Listener]:
    """A worker (no pipeline, no ledger), its consumer, and its rebalance listener."""
    config = load_config(None, environ={}, overrides={"kafka": kafka})
    worker = Worker(
        config, cast(Pipeline, None), cast(SendLedger, None), worker_id=new_worker_id(0)
    )
    consumer = _Consumer()
    worker._consumer = cast(AIOKafkaConsumer, consumer)
    listener = _Listener(worker)
    listener.consumer = worker._consumer
    return worker, consumer, listener


async def _joining(listener: ReadAgainListener) -> None:
    """What aiokafka tells a listener before every join: nothing is revoked yet."""
    await listener.on_partitions_revoked(set())


async def _fetch(worker: Worker, consumer: _Consumer) -> list[int]:
    """Fetch once: the offsets handed out. Their tasks are cancelled before they run (this
    worker has no pipeline)."""
    before = {task for tasks in worker._tasks.values() for task in tasks}
    await worker._fetch(
        cast(AIOKafkaConsumer, consumer), 0, 100, asyncio.get_running_loop().create_future()
    )
    started = {
        task: info
        for tasks in worker._tasks.values()
        for task, info in tasks.items()
        if task not in before
    }
    for task in started:
        task.cancel()
    await asyncio.gather(*started, return_exceptions=True)
    return sorted(info.offset for info in started.values())


@pytest.mark.parametrize("settle", [0.02, 0.0])
async def test_records_are_handed_out_only_while_the_worker_holds_their_partition(
    settle: float,
) -> None:
    # aiokafka can hand out a fetch of a partition before on_partitions_assigned has run,
    # and one of a partition revoked meanwhile: neither is handed out, and the consumer is
    # sent back to the first record, so nothing is skipped once the partition is held.
    # Holes believed at once or not, the gate is the same.
    worker, consumer, listener = _worker(hole_settle=settle)
    await _joining(listener)

    consumer.batch = {TP: _records(3, 4)}
    assert await _fetch(worker, consumer) == []
    assert consumer.seeks == [(TP, 3)]

    await listener.on_partitions_assigned({TP})
    assert await _fetch(worker, consumer) == [3, 4]
    assert worker._tracker.in_flight == 2

    await listener.on_partitions_revoked({TP})  # what was in flight is abandoned: redelivered
    consumer.seeks.clear()
    consumer.batch = {TP: _records(5)}
    assert await _fetch(worker, consumer) == []
    assert consumer.seeks == [(TP, 5)]
    assert worker._tracker.in_flight == 0


@pytest.mark.parametrize(("settle", "taken", "seeks"), [(0.02, [3, 4], [5]), (0.0, [3, 4, 7], [])])
async def test_a_worker_reads_holes_again_as_kafka_hole_settle_says(
    settle: float, taken: list[int], seeks: list[int]
) -> None:
    worker, consumer, listener = _worker(hole_settle=settle)
    await _joining(listener)
    await listener.on_partitions_assigned({TP})  # starts at the group's committed offset: 3
    consumer.batch = {TP: _records(3, 4, 7)}
    assert await _fetch(worker, consumer) == taken
    assert consumer.seeks == [(TP, offset) for offset in seeks]


def _take(holes: ReadAgain, consumer: _Consumer, tp: TopicPartition, *offsets: int) -> list[int]:
    taken = holes.records(cast(AIOKafkaConsumer, consumer), tp, _records(*offsets))
    return [record.offset for record in taken]


async def test_a_reader_with_a_listener_takes_only_what_the_listener_holds() -> None:
    holes = ReadAgain()
    listener = holes.listener()
    consumer = _Consumer()
    listener.consumer = cast(AIOKafkaConsumer, consumer)
    await _joining(listener)
    assert _take(holes, consumer, TP, 5, 6) == []  # before the listener ran: fetched again
    assert consumer.seeks == [(TP, 5)]
    await listener.on_partitions_assigned({TP})
    assert _take(holes, consumer, TP, 3, 4) == [3, 4]
    await listener.on_partitions_revoked({TP})
    assert _take(holes, consumer, TP, 5) == []
    assert consumer.seeks == [(TP, 5), (TP, 5)]
    # Without a listener (a reader that assigns its partitions itself), or with one never
    # told of a join, all is taken: nothing waits for ever on a listener that is not there.
    alone = ReadAgain()
    alone.expect(TP, 3)
    assert _take(alone, consumer, TP, 3, 4) == [3, 4]
    unused = ReadAgain()
    unused.listener()
    assert _take(unused, consumer, TP, 5) == [5]


async def test_a_fetch_refused_whole_pauses_the_reader_and_one_taken_does_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Refused whole, the fetch is thrown away (the consumer is sent back): without a pause
    # the reader would fetch again at once, over and over, until the listener has run.
    monkeypatch.setattr(kafka, "REFUSED_PAUSE", 30.0)
    holes = ReadAgain()
    listener = holes.listener()
    consumer = _Consumer()
    listener.consumer = cast(AIOKafkaConsumer, consumer)
    await _joining(listener)
    other = TopicPartition("eob.events", 1)
    fetch = {TP: _records(3, 4), other: _records(8)}
    taking = asyncio.ensure_future(holes.take(cast(AIOKafkaConsumer, consumer), fetch))
    await asyncio.sleep(0.2)
    assert not taking.done()  # pausing
    taking.cancel()
    assert sorted(consumer.seeks) == [(TP, 3), (other, 8)]
    # One partition held: what it has is taken at once; an empty fetch pauses nothing.
    await listener.on_partitions_assigned({TP})
    async with asyncio.timeout(5):
        taken = await holes.take(cast(AIOKafkaConsumer, consumer), fetch)
        assert await holes.take(cast(AIOKafkaConsumer, consumer), {}) == {}
    assert {tp: [r.offset for r in records] for tp, records in taken.items()} == {TP: [3, 4]}


async def test_an_assignment_of_no_partitions_is_no_error(caplog: pytest.LogCaptureFixture) -> None:
    # A member gets none when the group has more members than the topic partitions: there
    # is nothing to ask the broker, and nothing to report.
    holes = ReadAgain()
    listener = holes.listener()
    listener.consumer = cast(AIOKafkaConsumer, object())  # asked anything, it fails
    await _joining(listener)
    with caplog.at_level(logging.INFO, "eobblast"):
        await listener.on_partitions_assigned(set())
    assert not caplog.records


async def test_where_assigned_partitions_start_is_asked_of_the_broker(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The group's commit for one, the first offset for one with none and for one whose
    # commit retention has passed, nothing for one whose lookup never answers (its first
    # fetch is taken as it comes) and for one whose first offset is unknown (-1): every
    # one is held all the same.
    monkeypatch.setattr(kafka, "START_TIMEOUT", 0.2)
    tps = [TopicPartition("eob.events", n) for n in range(5)]
    consumer = _Consumer(
        committed={tps[0]: 3, tps[1]: None, tps[3]: None, tps[4]: 2},
        firsts={tps[1]: 0, tps[3]: -1, tps[4]: 5},
    )
    holes = ReadAgain()
    listener = holes.listener()
    listener.consumer = cast(AIOKafkaConsumer, consumer)
    await _joining(listener)
    with caplog.at_level(logging.INFO, "eobblast"):
        await listener.on_partitions_assigned(set(tps))
    (unknown,) = [r for r in caplog.records if r.message.startswith("start offsets unknown")]
    assert unknown.__dict__["partitions"] == 2 and unknown.__dict__["errors"] == ["TimeoutError"]
    assert _take(holes, consumer, tps[0], 5, 6) == []
    assert _take(holes, consumer, tps[1], 2, 3) == []
    assert consumer.seeks == [(tps[0], 3), (tps[1], 0)]
    assert _take(holes, consumer, tps[2], 7, 8) == [7, 8]
    assert _take(holes, consumer, tps[3], 4) == [4]
    assert _take(holes, consumer, tps[4], 5, 6) == [5, 6]


async def test_first_offsets_not_known_leave_the_partitions_without_a_commit_unchecked(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tps = [TopicPartition("eob.events", n) for n in range(2)]
    consumer = _Consumer(committed={tps[0]: 3, tps[1]: None})
    consumer.firsts_fail = True
    holes = ReadAgain()
    with caplog.at_level(logging.INFO, "eobblast"):
        await holes.assigned(cast(AIOKafkaConsumer, consumer), tps)
    assert _take(holes, consumer, tps[0], 4) == []  # its commit says 3
    assert _take(holes, consumer, tps[1], 4) == [4]
    (unknown,) = [r for r in caplog.records if r.message.startswith("start offsets unknown")]
    assert unknown.__dict__["partitions"] == 1 and unknown.__dict__["errors"] == ["KafkaError"]


async def test_the_commits_are_asked_for_all_at_once() -> None:
    # One after another, the assignment's lookups would take a round trip each, and the
    # listener holds the member's heartbeats: here no lookup answers before all are asked.
    tps = [TopicPartition("eob.events", n) for n in range(24)]
    consumer = _Consumer(committed={tp: 3 for tp in tps})
    consumer.answer_together = len(tps)
    holes = ReadAgain()
    await holes.assigned(cast(AIOKafkaConsumer, consumer), tps)
    for tp in tps:
        assert _take(holes, consumer, tp, 4) == []
    assert consumer.seeks == [(tp, 3) for tp in tps]


async def test_a_revoked_partition_is_handed_out_no_more_while_the_worker_drains_it() -> None:
    # The revocation waits for the partition's work in flight; a fetch handed out before
    # it, and taken meanwhile, is not handed out: its new owner reads it from the commit.
    worker, consumer, listener = _worker()
    await _joining(listener)
    await listener.on_partitions_assigned({TP})
    sending = asyncio.Event()

    async def send() -> None:
        await sending.wait()

    in_flight = asyncio.create_task(send())
    worker._tasks[TP] = {in_flight: cast(Any, SimpleNamespace(offset=3, since=0.0))}
    revoking = asyncio.create_task(listener.on_partitions_revoked({TP}))
    await asyncio.sleep(0.01)
    assert not revoking.done()  # draining
    consumer.batch = {TP: _records(4)}
    assert await _fetch(worker, consumer) == []
    assert consumer.seeks == [(TP, 4)]
    sending.set()
    await revoking

"""What a worker hands out of a fetch: only records of partitions it holds, holes read again
as `kafka.hole_settle` says."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from types import SimpleNamespace
from typing import Any, cast

import pytest

from eobblast.config import load_config
from eobblast.pipeline import Pipeline
from eobblast.state.ledger import SendLedger
from eobblast.streams import TopicPartition
from eobblast.streams.kafka import AIOKafkaConsumer
from eobblast.worker import Worker, new_worker_id

TP = TopicPartition("eob.events", 0)


class _Consumer:
    """A fetch's records, and where the worker sends the consumer back to."""

    def __init__(self) -> None:
        self.batch: Mapping[TopicPartition, Sequence[Any]] = {}
        self.seeks: list[tuple[TopicPartition, int]] = []

    async def getmany(self, *, timeout_ms: int, max_records: int) -> Any:
        return self.batch

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append((tp, offset))

    async def committed(self, tp: TopicPartition) -> int:
        return 3


def _records(*offsets: int) -> list[Any]:
    return [SimpleNamespace(offset=offset, key=b"M-1") for offset in offsets]


def _worker(**kafka: Any) -> Worker:
    config = load_config(None, environ={}, overrides={"kafka": kafka})
    return Worker(config, cast(Pipeline, None), cast(SendLedger, None), worker_id=new_worker_id(0))


async def _fetch(worker: Worker, consumer: _Consumer) -> list[int]:
    """Fetch once: the offsets handed out. Their tasks are cancelled before they run (this
    worker has no pipeline)."""
    await worker._fetch(
        cast(AIOKafkaConsumer, consumer), 0, 100, asyncio.get_running_loop().create_future()
    )
    started = {task: info for tasks in worker._tasks.values() for task, info in tasks.items()}
    for task in started:
        task.cancel()
    await asyncio.gather(*started, return_exceptions=True)
    return sorted(info.offset for info in started.values())


async def test_records_are_handed_out_only_while_the_worker_holds_their_partition() -> None:
    # aiokafka can hand out a fetch of a partition before on_partitions_assigned has run,
    # and one of a partition revoked meanwhile: neither is handed out, and the consumer is
    # sent back to the first record, so nothing is skipped once the partition is held.
    worker = _worker()
    consumer = _Consumer()
    worker._consumer = cast(AIOKafkaConsumer, consumer)

    consumer.batch = {TP: _records(3, 4)}
    assert await _fetch(worker, consumer) == []
    assert consumer.seeks == [(TP, 3)]

    await worker.partitions_assigned({TP})
    assert await _fetch(worker, consumer) == [3, 4]
    assert worker._tracker.in_flight == 2

    await worker.partitions_revoked({TP})  # what was in flight is abandoned: redelivered
    consumer.seeks.clear()
    consumer.batch = {TP: _records(5)}
    assert await _fetch(worker, consumer) == []
    assert consumer.seeks == [(TP, 5)]
    assert worker._tracker.in_flight == 0


@pytest.mark.parametrize(("settle", "taken", "seeks"), [(0.02, [3, 4], [5]), (0.0, [3, 4, 7], [])])
async def test_a_worker_reads_holes_again_as_kafka_hole_settle_says(
    settle: float, taken: list[int], seeks: list[int]
) -> None:
    worker = _worker(hole_settle=settle)
    consumer = _Consumer()
    worker._consumer = cast(AIOKafkaConsumer, consumer)
    await worker.partitions_assigned({TP})  # starts at the group's committed offset: 3
    consumer.batch = {TP: _records(3, 4, 7)}
    assert await _fetch(worker, consumer) == taken
    assert consumer.seeks == [(TP, offset) for offset in seeks]

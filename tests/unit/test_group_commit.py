"""GroupCommit: concurrent calls share a batch; failures and cancellations stay their own."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence

import pytest

from eobblast.state.group import GroupCommit


class Store:
    """Records how items were run; `bad` items fail, and fail any batch they are in."""

    def __init__(self, bad: set[int] | None = None, delay: float = 0.0) -> None:
        self.batches: list[list[int]] = []
        self.singles: list[int] = []
        self.bad = bad or set()
        self.delay = delay

    async def many(self, items: Sequence[int]) -> list[int]:
        await asyncio.sleep(self.delay)
        if self.bad & set(items):
            raise RuntimeError("rolled back")
        self.batches.append(list(items))
        return [i * 10 for i in items]

    async def one(self, item: int) -> int:
        await asyncio.sleep(self.delay)
        if item in self.bad:
            raise ValueError(f"item {item}")
        self.singles.append(item)
        return item * 10


async def test_concurrent_calls_share_batches_and_get_their_own_results() -> None:
    store = Store(delay=0.01)
    kinds: list[tuple[str, int]] = []
    group = GroupCommit(store.many, store.one, limit=8, on_batch=lambda k, n: kinds.append((k, n)))
    results = await asyncio.gather(*(group.submit(i) for i in range(20)))
    assert results == [i * 10 for i in range(20)]
    assert sum(len(b) for b in store.batches) + len(store.singles) == 20
    assert max(len(b) for b in store.batches) == 8  # the limit holds
    assert [i for b in store.batches for i in b] + store.singles == list(range(20))  # in order
    assert ("shared", 8) in kinds


async def test_a_lone_call_runs_alone_at_once() -> None:
    store = Store()
    group = GroupCommit(store.many, store.one)
    assert await group.submit(3) == 30
    assert store.singles == [3] and store.batches == []


async def test_a_failing_item_fails_alone_and_the_rest_of_its_batch_succeeds() -> None:
    store = Store(bad={5})
    kinds: list[str] = []
    group = GroupCommit(store.many, store.one, on_batch=lambda k, n: kinds.append(k))
    results = await asyncio.gather(*(group.submit(i) for i in range(10)), return_exceptions=True)
    assert isinstance(results[5], ValueError) and str(results[5]) == "item 5"
    assert [r for i, r in enumerate(results) if i != 5] == [i * 10 for i in range(10) if i != 5]
    assert "split" in kinds
    assert sorted(store.singles) == [i for i in range(10) if i != 5]


async def test_a_caller_that_gives_up_does_not_disturb_the_others() -> None:
    store = Store(delay=0.05)
    group = GroupCommit(store.many, store.one)
    first = asyncio.create_task(group.submit(1))
    others = [asyncio.create_task(group.submit(i)) for i in (2, 3)]
    await asyncio.sleep(0)
    first.cancel()
    assert await asyncio.gather(*others) == [20, 30]
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_stopping_the_batch_task_releases_every_waiter() -> None:
    store = Store(delay=10.0)
    group = GroupCommit(store.many, store.one)
    waiters = [asyncio.create_task(group.submit(i)) for i in range(3)]
    await asyncio.sleep(0.01)
    assert group._drainer is not None
    group._drainer.cancel()
    done, pending = await asyncio.wait(waiters, timeout=2.0)
    assert not pending, "a waiter would have hung"
    assert all(t.cancelled() for t in done)


async def test_a_broken_batch_gives_its_callers_the_error_not_a_cancellation() -> None:
    # run_many breaking its contract (a result per item) is a fault of the batch: its
    # callers see the error (a CancelledError would read as their own cancellation), and
    # calls queued behind it still run.
    calls = 0

    async def short(items: Sequence[int]) -> list[int]:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        return [i * 10 for i in items][: 1 if calls == 1 else None]

    group = GroupCommit(short)
    first = [asyncio.create_task(group.submit(i)) for i in range(3)]
    await asyncio.sleep(0)  # the first batch is running: the next calls queue behind it
    later = [asyncio.create_task(group.submit(i)) for i in (7, 8)]
    results = await asyncio.gather(*first, return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results), results
    assert await asyncio.gather(*later) == [70, 80]


def test_limit_must_be_positive() -> None:
    store = Store()
    with pytest.raises(ValueError, match="limit"):
        GroupCommit(store.many, store.one, limit=0)


async def test_a_store_that_is_away_fails_the_whole_batch_at_once() -> None:
    # A locked SQLite file: run one by one, every item would wait out the busy timeout
    # again, with the event loop blocked (no Kafka heartbeats) for batch-size times as long.
    singles: list[int] = []
    kinds: list[str] = []

    async def many(items: Sequence[int]) -> list[int]:
        await asyncio.sleep(0.01)
        raise sqlite3.OperationalError("database is locked")

    async def one(item: int) -> int:
        singles.append(item)
        return item

    group = GroupCommit(many, one, on_batch=lambda k, n: kinds.append(k))
    results = await asyncio.gather(*(group.submit(i) for i in range(10)), return_exceptions=True)
    failed = [r for r in results if isinstance(r, sqlite3.OperationalError)]
    assert len(failed) == 10 and singles == [] and kinds == ["failed"]

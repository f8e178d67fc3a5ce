"""How a worker ends the tasks of partitions it loses: they must really end."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

from eobblast.worker import WORKER_GC_THRESHOLDS, _cancel_and_wait, settle_heap


async def test_a_task_that_loses_a_cancellation_is_cancelled_again_until_it_ends() -> None:
    # As Python 3.11's wait_for does when the awaited reply arrives in the same turn as the
    # cancel: the cancellation is dropped and the task goes on (it would send, then report).
    went_on = asyncio.Event()

    async def send() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            pass  # the reply "arrived": carry on as if nothing happened
        went_on.set()
        await asyncio.sleep(10)  # the next step: this cancel is not lost

    task = asyncio.create_task(send())
    await asyncio.sleep(0)
    await _cancel_and_wait({task})
    assert went_on.is_set() and task.cancelled()


async def test_tasks_already_done_are_left_alone() -> None:
    task = asyncio.create_task(asyncio.sleep(0))
    await task
    await _cancel_and_wait({task})
    assert task.done() and not task.cancelled()


def _collections_while_allocating(count: int) -> int:
    runs = 0

    def counted(phase: str, info: dict[str, Any]) -> None:
        nonlocal runs
        runs += phase == "start"

    kept: list[dict[str, int]] = []
    gc.callbacks.append(counted)
    try:
        for n in range(count):
            kept.append({"n": n})  # container objects, as an event's work allocates
    finally:
        gc.callbacks.remove(counted)
    return runs


def test_a_settled_worker_heap_is_collected_far_less_often() -> None:
    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)  # Python's defaults
        assert _collections_while_allocating(10_000) >= 10
        settle_heap()
        assert gc.get_threshold() == WORKER_GC_THRESHOLDS
        assert gc.get_freeze_count() > 0  # what existed is out of the collector's sight
        assert _collections_while_allocating(10_000) == 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)

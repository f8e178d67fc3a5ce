"""How a worker ends the tasks of partitions it loses: they must really end."""

from __future__ import annotations

import asyncio

from eobblast.worker import _cancel_and_wait


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

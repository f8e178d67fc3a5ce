"""Run many events through the pipeline with a bounded number in flight."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

from eobblast.pipeline import EventOutcome, Pipeline


async def run_events(
    pipeline: Pipeline,
    events: Iterable[bytes],
    *,
    max_in_flight: int,
    on_outcome: Callable[[EventOutcome], None],
) -> int:
    """Process every event with at most `max_in_flight` at once; returns how many ran."""
    source = iter(events)
    done = 0

    async def worker() -> None:
        nonlocal done
        # Workers pull from one iterator, so memory stays bounded by max_in_flight,
        # not by the size of the input.
        for raw in source:
            outcome = await pipeline.process(raw)
            done += 1
            on_outcome(outcome)

    async with asyncio.TaskGroup() as group:
        for _ in range(max(1, max_in_flight)):
            group.create_task(worker())
    return done

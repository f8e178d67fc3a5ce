"""Group commit: concurrent callers' small writes share one store transaction.

A worker keeps dozens of events in flight and each one claims the send ledger, passes the
bounce gate and records its delivery: one transaction each is most of what the stores
cost. With a `GroupCommit`, calls that arrive while a transaction runs wait and go
together in the next one (at most `limit`). If the shared transaction fails, each of its
calls runs again on its own, so one caller's error never becomes another's; unless the
store itself is away (locked, down: `transient` errors), when every call of the batch gets
that error at once: one at a time, each would wait out the store's timeout again. A single
call is not delayed: the batch starts on the next turn of the event loop.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import psycopg

I = TypeVar("I")  # noqa: E741 - an item, as in the type parameters of the stdlib
R = TypeVar("R")

# What a store's driver raises when the store is locked, down or unreachable (no item of a
# batch is at fault; trying again later is right). Not integrity or programming errors.
# PostgreSQL's lock timeout (LockNotAvailable) is an OperationalError; a session the server
# ended for idling in a transaction (a worker's loop stalled that long) is a dropped
# connection like any other, though psycopg files it under InternalError.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    sqlite3.OperationalError,
    psycopg.OperationalError,
    psycopg.errors.IdleInTransactionSessionTimeout,
    psycopg.InterfaceError,
    OSError,
    TimeoutError,
)


@dataclass(slots=True)
class _Waiting(Generic[I, R]):
    item: I
    result: asyncio.Future[R]


def _settle(waiting: _Waiting[I, R], result: R | None, error: BaseException | None) -> None:
    # A caller that gave up (cancelled) no longer waits: its future is already done.
    if waiting.result.done():
        return
    if error is not None:
        waiting.result.set_exception(error)
    else:
        waiting.result.set_result(result)  # type: ignore[arg-type]  # R when error is None


class GroupCommit(Generic[I, R]):
    """Runs items in batches: `run_many` for several at once, `run_one` alone or as fallback
    (by default `run_many` of that one item).

    `run_many` returns one result per item, in order, and must be all-or-nothing (one
    transaction). `on_batch(kind, size)` is told of each batch: "shared" when `run_many`
    succeeded, "split" when it failed and the items ran alone, "failed" when it failed
    with a `transient` error (every item gets it), "single" for a lone item.
    """

    def __init__(
        self,
        run_many: Callable[[Sequence[I]], Awaitable[Sequence[R]]],
        run_one: Callable[[I], Awaitable[R]] | None = None,
        *,
        limit: int = 64,
        on_batch: Callable[[str, int], None] | None = None,
        transient: tuple[type[BaseException], ...] = TRANSIENT_ERRORS,
    ) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self._run_many = run_many
        self._run_one = run_one or self._alone
        self._limit = limit
        self._on_batch = on_batch
        self._transient = transient
        self._waiting: list[_Waiting[I, R]] = []
        self._drainer: asyncio.Task[None] | None = None

    async def _alone(self, item: I) -> R:
        (result,) = await self._run_many([item])
        return result

    async def submit(self, item: I) -> R:
        """Run `item` in the next batch and return its result (or raise its error)."""
        result: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Waiting(item, result))
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain())
        return await result

    async def _drain(self) -> None:
        while self._waiting:
            batch = self._waiting[: self._limit]
            del self._waiting[: self._limit]
            try:
                await self._run(batch)
            except asyncio.CancelledError:
                # Stopped mid-way: nobody may wait for ever on a future.
                for waiting in batch + self._waiting:
                    waiting.result.cancel()
                self._waiting.clear()
                raise
            except Exception as exc:
                # A fault of this batch's bookkeeping, not of one item: its callers get the
                # error (a cancellation would look to them as if they had been cancelled),
                # and the items waiting behind it still run.
                for waiting in batch:
                    _settle(waiting, None, exc)

    async def _run(self, batch: list[_Waiting[I, R]]) -> None:
        if len(batch) > 1:
            try:
                results = await self._run_many([w.item for w in batch])
            except self._transient as exc:
                self._count("failed", len(batch))
                for waiting in batch:
                    _settle(waiting, None, exc)
                return
            except Exception:
                self._count("split", len(batch))
            else:
                if len(results) != len(batch):
                    # Checked before any caller is answered: none gets another's result.
                    raise RuntimeError(f"{len(results)} results for {len(batch)} items")
                self._count("shared", len(batch))
                for waiting, result in zip(batch, results, strict=True):
                    _settle(waiting, result, None)
                return
        else:
            self._count("single", 1)
        for waiting in batch:
            try:
                result = await self._run_one(waiting.item)
            except Exception as exc:
                _settle(waiting, None, exc)
            else:
                _settle(waiting, result, None)

    def _count(self, kind: str, size: int) -> None:
        if self._on_batch is not None:
            self._on_batch(kind, size)

"""SQLite stores wait for another process's write lock without stopping the event loop.

Another process (an admin command, a long purge, a checkpoint) holds a store's write lock:
a worker's write waits for it with its loop running (Kafka heartbeats, SMTP sessions,
metrics go on), goes through once the lock is free, and fails with SQLite's own "database
is locked" (the bounce store: StoreBusy) only after `LOCK_WAIT`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import sqlite3
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import eobblast.state.sqlite as sqlite_state
from eobblast.bounces.store import OutboxMessage, StoreBusy, open_bounce_store
from eobblast.observe.audit import AuditAction, AuditRecord, open_audit
from eobblast.shaping.budgets import BudgetKey, LeaseRequest, open_budgets
from eobblast.state.ledger import open_ledger

NOW = dt.datetime(2026, 11, 27, 12, tzinfo=dt.UTC)

# The other process: takes the write lock, says so, and keeps it until told.
HOLDER = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN IMMEDIATE")
print("held", flush=True)
sys.stdin.readline()
db.execute("COMMIT")
"""


@asynccontextmanager
async def lock_held_elsewhere(path: Path) -> AsyncIterator[Callable[[], Awaitable[None]]]:
    """Another process holds `path`'s write lock until the yielded release is awaited."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        HOLDER,
        str(path),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    stdin = proc.stdin
    try:
        assert await asyncio.wait_for(proc.stdout.readline(), 10) == b"held\n"

        async def release() -> None:
            stdin.write(b"\n")
            await stdin.drain()
            assert await asyncio.wait_for(proc.wait(), 10) == 0

        yield release
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@dataclass(frozen=True)
class Write:
    """A store's write, and a read that shows whether it went through."""

    name: str
    write: Callable[[], Coroutine[Any, Any, object]]
    written: Callable[[], Awaitable[bool]]
    close: Callable[[], Awaitable[None]]


async def ledger_claim(path: Path) -> Write:
    ledger = await open_ledger(f"sqlite:///{path}")

    async def written() -> bool:
        return await ledger.get("ev-lock-1") is not None

    return Write("send ledger", lambda: ledger.claim("ev-lock-1", "w0"), written, ledger.close)


async def audit_append(path: Path) -> Write:
    audit = await open_audit(f"sqlite:///{path}")
    record = AuditRecord("ev-lock-1", AuditAction.SENT, "w0", NOW, protection="tls_required")

    async def written() -> bool:
        return len(await audit.records("ev-lock-1")) == 1

    return Write("audit trail", lambda: audit.append(record), written, audit.close)


async def budget_lease(path: Path) -> Write:
    budgets = await open_budgets(f"sqlite:///{path}")
    key = BudgetKey("192.0.2.10", "example", 1)
    request = LeaseRequest(key, cap=50, want=5, now=NOW.timestamp())

    async def written() -> bool:
        return [u.used for u in await budgets.usage(1)] == [5]

    return Write("shaping budgets", lambda: budgets.lease(request), written, budgets.close)


async def bounce_transaction(path: Path) -> Write:
    store = await open_bounce_store(f"sqlite:///{path}")

    async def write() -> None:
        async with store.transaction(["M-lock-1"], NOW) as tx:
            await tx.put_payload("ev-lock-1", "M-lock-1", b"{}")

    async def written() -> bool:
        return _rows(path, "bounce_payloads") == 1

    return Write("bounce store", write, written, store.close)


async def bounce_outbox_ack(path: Path) -> Write:
    store = await open_bounce_store(f"sqlite:///{path}")
    async with store.transaction(["M-lock-1"], NOW) as tx:
        ids = await tx.enqueue([OutboxMessage("eob.delivery", b"ev-lock-1", b"{}")], 60.0)

    async def written() -> bool:
        return _rows(path, "bounce_outbox") == 0

    return Write("bounce outbox", lambda: store.ack_outbox(ids), written, store.close)


def _rows(path: Path, table: str) -> int:
    db = sqlite3.connect(path)
    try:
        return int(db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
    finally:
        db.close()


WRITES = [ledger_claim, audit_append, budget_lease, bounce_transaction, bounce_outbox_ack]


@pytest.mark.parametrize("opened", WRITES, ids=lambda f: f.__name__)
async def test_a_write_waits_for_another_process_with_the_loop_running(
    tmp_path: Path, opened: Callable[[Path], Awaitable[Write]]
) -> None:
    path = tmp_path / "store.db"
    store = await opened(path)
    try:
        async with lock_held_elsewhere(path) as release:
            waiting = asyncio.create_task(store.write())
            # The loop goes on while the write waits: with SQLite's busy handler on the
            # loop's thread, these sleeps would only end once the write had given up.
            for _ in range(30):
                await asyncio.sleep(0.01)
            assert not waiting.done(), waiting
            assert not await store.written()
            await release()
            await asyncio.wait_for(waiting, 10)
        assert await store.written(), store.name
        # The connection is left as it was: the next write takes the free lock at once.
        await store.write()
    finally:
        await store.close()


@pytest.mark.parametrize(
    ("opened", "error"),
    [
        (ledger_claim, sqlite3.OperationalError),
        # StoreBusy is what the pipeline waits out (the notice is neither sent nor failed).
        (bounce_transaction, StoreBusy),
    ],
    ids=["send ledger", "bounce store"],
)
async def test_a_write_gives_up_after_the_lock_wait_and_the_store_still_works(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    opened: Callable[[Path], Awaitable[Write]],
    error: type[Exception],
) -> None:
    monkeypatch.setattr(sqlite_state, "LOCK_WAIT", 0.3)
    path = tmp_path / "store.db"
    store = await opened(path)
    try:
        async with lock_held_elsewhere(path) as release:
            # Within LOCK_WAIT and a margin, where SQLite's own wait would take 10 s.
            with pytest.raises(error):
                async with asyncio.timeout(5):
                    await store.write()
            assert not await store.written()
            await release()
        await store.write()
        assert await store.written()
    finally:
        await store.close()


async def test_the_connection_keeps_its_long_timeout_for_other_statements(tmp_path: Path) -> None:
    # Only the lock-taking BEGIN waits briefly on the loop's thread; after a write, waiting
    # or not, the connection is back at LOCK_WAIT.
    path = tmp_path / "t.db"
    db = sqlite_state.open_sqlite(path, ["CREATE TABLE t (k INTEGER PRIMARY KEY)"])
    try:
        long_wait = int(sqlite_state.LOCK_WAIT * 1000)
        assert db.execute("PRAGMA busy_timeout").fetchone() == (long_wait,)
        async with lock_held_elsewhere(path) as release:
            waiting = asyncio.create_task(
                sqlite_state.write_transaction(db, lambda: db.execute("INSERT INTO t VALUES (1)"))
            )
            await asyncio.sleep(0.1)
            assert not waiting.done()
            await release()
            await asyncio.wait_for(waiting, 10)
        assert db.execute("PRAGMA busy_timeout").fetchone() == (long_wait,)
        assert db.execute("SELECT k FROM t").fetchall() == [(1,)]
    finally:
        db.close()

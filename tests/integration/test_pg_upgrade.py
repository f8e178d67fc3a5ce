"""Upgrading a store on PostgreSQL: an index a new release adds is built without stopping writes.

Workers on several machines share the store; a worker of the new release starts while
the others write. A plain CREATE INDEX would queue a lock that every later write waits
behind until the index is built (minutes, on a ledger of millions of rows).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import psycopg
import pytest

from eobblast.state.ledger import _SCHEMA, _SCHEMA_LOCK, open_ledger
from eobblast.state.postgres import _BUILD_LOCK_OFFSET
from tests.conftest import throwaway_pg_schema

INDEX = "send_ledger_final"
BUILD_LOCK = _SCHEMA_LOCK + _BUILD_LOCK_OFFSET
INSERT = (
    "INSERT INTO send_ledger (event_id, state, owner, outcome, reason, updated_at)"
    " VALUES (%s, 'final', '', 'delivered', 'delivered', 1)"
)


@pytest.fixture
def url() -> Iterator[str]:
    with throwaway_pg_schema("upgrade") as dsn:
        yield dsn


@pytest.fixture
async def old_ledger(url: str) -> AsyncIterator[str]:
    """The ledger table as an earlier release left it: rows, and not the new index."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute(_SCHEMA)
        async with conn.cursor() as cur:
            await cur.executemany(INSERT, [(f"old-{i}",) for i in range(2000)])
    yield url


async def _index_valid(url: str) -> bool | None:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(%s)", (INDEX,)
        )
        row = await cur.fetchone()
    return None if row is None else bool(row[0])


async def _waiting_on_a_lock(url: str, application: str, seconds: float = 30.0) -> None:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        deadline = time.monotonic() + seconds
        while True:
            cur = await conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
                " AND wait_event_type = 'Lock'",
                (application,),
            )
            row = await cur.fetchone()
            if row is not None and row[0] > 0:
                return
            assert time.monotonic() < deadline, f"{application} never waited on a lock"
            await asyncio.sleep(0.05)


async def test_a_new_index_is_built_while_other_workers_go_on_writing(old_ledger: str) -> None:
    url = old_ledger
    # A worker of the old release is in the middle of a write.
    async with await psycopg.AsyncConnection.connect(url) as writing:
        await writing.execute(INSERT, ("in-flight",))
        opening = asyncio.create_task(open_ledger(url))
        try:
            # The new worker's index build waits for that write to end...
            await _waiting_on_a_lock(url, "eobblast ledger")
            # ...and meanwhile another worker's write goes through. Behind a plain
            # CREATE INDEX it would wait until the build ends, and time out here.
            async with await psycopg.AsyncConnection.connect(url, autocommit=True) as other:
                await other.execute("SET lock_timeout = '5s'")
                await other.execute(INSERT, ("meanwhile",))
            await writing.commit()
            ledger = await asyncio.wait_for(opening, 60)
        finally:
            if not opening.done():
                opening.cancel()
    try:
        assert await _index_valid(url) is True
        entry = await ledger.get("meanwhile")
        assert entry is not None and entry.outcome == "delivered"
    finally:
        await ledger.close()


async def test_an_index_a_dead_build_left_invalid_is_built_again(old_ledger: str) -> None:
    url = old_ledger
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
        row = await cur.fetchone()
        if row is None or not row[0]:
            pytest.skip("marking an index invalid needs a PostgreSQL superuser")
        await conn.execute(f"CREATE INDEX {INDEX} ON send_ledger (updated_at)")
        # What a CREATE INDEX CONCURRENTLY cut short (its worker killed) leaves behind.
        await conn.execute(
            "UPDATE pg_index SET indisvalid = false WHERE indexrelid = to_regclass(%s)", (INDEX,)
        )
    assert await _index_valid(url) is False
    ledger = await open_ledger(url)
    try:
        assert await _index_valid(url) is True
    finally:
        await ledger.close()


async def test_a_worker_does_not_wait_for_an_index_another_is_building(old_ledger: str) -> None:
    url = old_ledger
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as building:
        # Another worker holds the build lock: this one starts at once, without the index.
        await building.execute("SELECT pg_advisory_lock(%s)", (BUILD_LOCK,))
        ledger = await asyncio.wait_for(open_ledger(url), 30)
        await ledger.close()
        assert await _index_valid(url) is None
        await building.execute("SELECT pg_advisory_unlock(%s)", (BUILD_LOCK,))
    ledger = await open_ledger(url)  # the next start builds it
    try:
        assert await _index_valid(url) is True
    finally:
        await ledger.close()

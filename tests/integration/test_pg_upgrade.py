"""Upgrading a store on PostgreSQL while other workers use it (the machine's PostgreSQL).

A new release of the ledger replaces the index `send_ledger_settled` with the partial
`send_ledger_final`. Built or dropped in the schema transaction, either would queue a lock
that every other worker's write to the table waits behind until it is done (minutes, on a
ledger of millions of rows). The new index is built CONCURRENTLY in the background and the
old one dropped once it is valid.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator

import psycopg
import pytest

from eobblast.bounces.store import open_bounce_store
from eobblast.observe.audit import open_audit
from eobblast.state import postgres
from eobblast.state.ledger import _SCHEMA, open_ledger
from eobblast.state.postgres import _BUILD_LOCKS, _BUILD_UNLOCK, _TRY_BUILD_LOCK
from tests.conftest import throwaway_pg_schema
from tests.integration.test_bounce_service import EARLIER_INDEXES, PARTIAL_INDEXES
from tests.integration.worker_stack import until

NEW = "send_ledger_final"
OLD = "send_ledger_settled"
BUILDER = "eobblast ledger index build"
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
    """The ledger as an earlier release left it: rows, its own index, not the new one."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute(_SCHEMA)
        await conn.execute(f"CREATE INDEX {OLD} ON send_ledger (updated_at)")
        async with conn.cursor() as cur:
            await cur.executemany(INSERT, [(f"old-{i}",) for i in range(2000)])
    yield url


async def _index_valid(url: str, name: str) -> bool | None:
    """None: no such index; False: there but invalid (a build cut short)."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        return await postgres._index_valid(conn, name)


async def _builder_blocked_by(url: str, blocker: int) -> int:
    """The pid of the index build once it waits for `blocker`'s transaction."""
    found: list[int] = []

    async def waiting() -> bool:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            cur = await conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = %s"
                " AND %s = ANY(pg_blocking_pids(pid))",
                (BUILDER, blocker),
            )
            found.extend(row[0] for row in await cur.fetchall())
        return bool(found)

    await until("the index build waits for the open write", waiting)
    return found[0]


async def test_the_new_index_is_built_while_other_workers_go_on_writing(
    old_ledger: str,
) -> None:
    url = old_ledger
    # A worker of the earlier release is in the middle of a write.
    async with await psycopg.AsyncConnection.connect(url) as writing:
        await writing.execute(INSERT, ("in-flight",))
        # The new release's worker starts at once: the build does not hold it up.
        ledger = await asyncio.wait_for(open_ledger(url), 30)
        try:
            await _builder_blocked_by(url, writing.info.backend_pid)
            # Meanwhile another worker's write goes through; behind a plain CREATE or
            # DROP INDEX it would wait until the build ends, and time out here.
            async with await psycopg.AsyncConnection.connect(url, autocommit=True) as other:
                await other.execute("SET lock_timeout = '5s'")
                await other.execute(INSERT, ("meanwhile",))
            # The old index stays until the new one is valid.
            assert await _index_valid(url, OLD) is True
            assert await _index_valid(url, NEW) is False  # being built
            await writing.commit()

            await until(
                "the new index built and the old one dropped",
                lambda: _both(url, new=True, old=None),
            )
            entry = await ledger.get("meanwhile")
            assert entry is not None and entry.outcome == "delivered"
        finally:
            await ledger.close()


async def test_a_fresh_store_gets_its_indexes_at_once(url: str) -> None:
    # A long report elsewhere in the database holds a snapshot: a CONCURRENTLY build would
    # wait for it to end. The tables are new, and empty: their indexes come with them.
    async with await psycopg.AsyncConnection.connect(url) as report:
        await report.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        await report.execute("SELECT count(*) FROM pg_class")
        ledger = await asyncio.wait_for(open_ledger(url), 30)
        try:
            assert await _index_valid(url, NEW) is True
        finally:
            await ledger.close()


async def test_an_upgrade_another_worker_holds_is_left_to_it_until_it_stops(
    old_ledger: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = old_ledger
    monkeypatch.setattr(postgres, "UPGRADE_POLL", 0.1)
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as other:
        cur = await other.execute(_TRY_BUILD_LOCK, (_BUILD_LOCKS, "ledger"))
        row = await cur.fetchone()
        assert row is not None and row[0], "the build lock is this test's schema's own"
        ledger = await open_ledger(url)
        try:
            await asyncio.sleep(0.5)  # several looks at the lock
            # Not built here, and the old index kept: the other worker is upgrading.
            assert await _both(url, new=None, old=True)
            # It stops half-way (its build lock goes with it): this worker finishes.
            await other.execute(_BUILD_UNLOCK, (_BUILD_LOCKS, "ledger"))
            await until("built by this worker", lambda: _both(url, new=True, old=None))
        finally:
            await ledger.close()


async def _both(url: str, *, new: bool | None, old: bool | None) -> bool:
    return await _index_valid(url, NEW) is new and await _index_valid(url, OLD) is old


async def test_a_build_cut_short_leaves_the_store_working_and_is_done_again(
    old_ledger: str, caplog: pytest.LogCaptureFixture
) -> None:
    url = old_ledger
    async with await psycopg.AsyncConnection.connect(url) as writing:
        await writing.execute(INSERT, ("in-flight",))
        with caplog.at_level(logging.WARNING, logger="eobblast.state"):
            ledger = await open_ledger(url)
            try:
                builder = await _builder_blocked_by(url, writing.info.backend_pid)
                async with await psycopg.AsyncConnection.connect(url, autocommit=True) as dba:
                    await dba.execute("SELECT pg_cancel_backend(%s)", (builder,))
                await asyncio.wait_for(ledger._conn.upgrading, 30)  # type: ignore[attr-defined]
                # The store works all the same, on the old index, which is kept.
                await ledger.finish("after-cancel", "delivered", "delivered")
                assert await ledger.get("after-cancel") is not None
                assert await _index_valid(url, OLD) is True
                assert await _index_valid(url, NEW) is False  # what the cut left
            finally:
                await ledger.close()
        assert [r.getMessage() for r in caplog.records] == ["index not built: QueryCanceled"]
        await writing.commit()
    ledger = await open_ledger(url)  # the next start drops the invalid one and builds it
    try:
        await until("built again", lambda: _both(url, new=True, old=None))
    finally:
        await ledger.close()


async def test_an_index_made_invalid_is_built_again(old_ledger: str) -> None:
    url = old_ledger
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
        row = await cur.fetchone()
        if row is None or not row[0]:
            pytest.skip("marking an index invalid needs a PostgreSQL superuser")
        await conn.execute(f"CREATE INDEX {NEW} ON send_ledger (updated_at)")
        await conn.execute(
            "UPDATE pg_index SET indisvalid = false WHERE indexrelid = to_regclass(%s)", (NEW,)
        )
    ledger = await open_ledger(url)
    try:
        await until("built again", lambda: _both(url, new=True, old=None))
    finally:
        await ledger.close()


async def test_workers_starting_together_upgrade_a_bounce_store_once(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Six partial indexes replace six full ones. Each worker building some of them at
    # once deadlocked the builds (two CONCURRENTLY builds on one table), and no worker
    # then dropped the old ones, having not built them all.
    first = await open_bounce_store(url)
    await first.close()
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        for name in PARTIAL_INDEXES:
            await conn.execute(f"DROP INDEX {name}")
        for name, columns in EARLIER_INDEXES.items():
            await conn.execute(f"CREATE INDEX {name} ON bounce_eobs {columns}")
        await conn.execute(
            "INSERT INTO bounce_eobs (eob_id, member_id, address, address_key, status,"
            " age_from, attempt, incident_recorded, ref, updated_at)"
            " SELECT 'e' || i, 'm' || i, 'a' || i || '@x.test', 'a' || i || '@x.test',"
            " CASE WHEN i % 3 = 0 THEN 'retry_scheduled' ELSE 'delivered' END,"
            " 1, 1, 0, '', 1 FROM generate_series(1, 30000) AS i"
        )

    async def indexes() -> set[str]:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            cur = await conn.execute(
                "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
                " WHERE i.indrelid = to_regclass('bounce_eobs') AND i.indisvalid"
                " AND NOT i.indisprimary"
            )
            return {str(row[0]) for row in await cur.fetchall()}

    with caplog.at_level(logging.WARNING, logger="eobblast.state"):
        stores = await asyncio.gather(*(open_bounce_store(url) for _ in range(3)))
        try:

            async def upgraded() -> bool:
                return await indexes() == PARTIAL_INDEXES

            await until("the partial indexes built and the full ones dropped", upgraded, 60)
        finally:
            for store in stores:
                await store.close()
    assert [r.getMessage() for r in caplog.records] == []


async def test_an_audit_trail_opens_while_another_worker_writes_to_it(url: str) -> None:
    # Its append-only triggers were replaced at every start: CREATE OR REPLACE TRIGGER
    # waited behind any open audit write, and every later write waited behind it.
    trail = await open_audit(url)
    await trail.close()
    async with await psycopg.AsyncConnection.connect(url) as writing:
        await writing.execute(
            "INSERT INTO audit_trail (at, event_id, action, actor)"
            " VALUES (now(), 'e1', 'sent', 'w')"
        )
        trail = await asyncio.wait_for(open_audit(url), 10)
        await trail.close()
        await writing.commit()
    # The triggers are there all the same: the trail stays append-only.
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.RaiseException):
            await conn.execute("DELETE FROM audit_trail")
        with pytest.raises(psycopg.errors.RaiseException):
            await conn.execute("TRUNCATE audit_trail")


async def test_the_old_index_stays_if_the_new_one_is_not_really_there(
    old_ledger: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Something else holds the new index's name: CREATE INDEX ... IF NOT EXISTS succeeds
    # without building it. The old index is kept all the same.
    url = old_ledger
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute(f"CREATE TABLE {NEW} (x int)")
    ledger = await open_ledger(url)
    try:
        await asyncio.wait_for(ledger._conn.upgrading, 30)  # type: ignore[attr-defined]
    finally:
        await ledger.close()
    assert await _index_valid(url, OLD) is True


async def test_an_audit_trigger_disabled_by_hand_is_enabled_again(url: str) -> None:
    trail = await open_audit(url)
    await trail.close()
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute(
            "INSERT INTO audit_trail (at, event_id, action, actor)"
            " VALUES (now(), 'e1', 'sent', 'w')"
        )
        await conn.execute("ALTER TABLE audit_trail DISABLE TRIGGER audit_trail_no_change")
    trail = await open_audit(url)
    await trail.close()
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.RaiseException):
            await conn.execute("DELETE FROM audit_trail")

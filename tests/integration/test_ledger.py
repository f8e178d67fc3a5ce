"""The send ledger: the same behaviour from SQLite and from PostgreSQL (the machine's server)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import psycopg
import pytest

from eobblast.errors import ConfigError, StoreNotAnswering
from eobblast.state import ClaimKind, LedgerState, SendLedger, open_ledger, postgres
from eobblast.state import ledger as ledger_module
from eobblast.state.group import TRANSIENT_ERRORS
from eobblast.state.ledger import AGAIN, CLAIM_LEASE, SQLITE_PURGE
from eobblast.state.postgres import libpq_reason
from tests.conftest import PG_BASE, PG_COMMIT, PgRelay, drop_store_connection


@pytest.fixture
def ledger_url(store_url: str) -> str:
    return store_url


@pytest.fixture
async def ledger(ledger_url: str) -> AsyncIterator[SendLedger]:
    opened = await open_ledger(ledger_url)
    yield opened
    await opened.close()


_YEAR = 365 * 86400


def _id() -> str:
    return str(uuid.uuid4())


async def test_first_claim_is_new_then_done_after_finish(ledger: SendLedger) -> None:
    event_id = _id()
    assert (await ledger.claim(event_id, "w1")).kind is ClaimKind.NEW
    await ledger.finish(event_id, "delivered", "delivered")
    again = await ledger.claim(event_id, "w2")
    assert again.kind is ClaimKind.DONE
    assert again.entry is not None and again.entry.outcome == "delivered"
    assert again.entry.state is LedgerState.FINAL


async def test_same_owner_in_flight_is_not_sent_twice(ledger: SendLedger) -> None:
    event_id = _id()
    assert (await ledger.claim(event_id, "w1")).kind is ClaimKind.NEW
    assert (await ledger.claim(event_id, "w1")).kind is ClaimKind.IN_FLIGHT


async def _age(url: str, event_ids: Sequence[str], seconds: float) -> None:
    """Time passes for these rows: their claims, renewals and outcomes are `seconds` older.

    Rows are aged rather than the clock moved: a PostgreSQL ledger reads the server's clock.
    """
    sql = "UPDATE send_ledger SET updated_at = updated_at - {0} WHERE event_id = {0}"
    if url.startswith("sqlite:///"):
        with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as db, db:
            db.executemany(sql.format("?"), [(seconds, event_id) for event_id in event_ids])
        return
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        for event_id in event_ids:
            await conn.execute(sql.format("%s"), (seconds, event_id))


async def test_dead_owner_in_flight_is_retried_and_counted(
    ledger: SendLedger, ledger_url: str
) -> None:
    event_id = _id()
    await ledger.claim(event_id, "dead-worker")
    await _age(ledger_url, [event_id], CLAIM_LEASE + 1)  # nobody renewed it
    retry = await ledger.claim(event_id, "w2")
    assert retry.kind is ClaimKind.RETRY
    entry = await ledger.get(event_id)
    assert entry is not None and entry.attempts == 2 and entry.owner == "w2"
    # now w2 owns it: a second claim by w2 is a concurrent duplicate, not a retry
    assert (await ledger.claim(event_id, "w2")).kind is ClaimKind.IN_FLIGHT


async def test_a_deferred_event_is_sent_again_only_where_nobody_else_resends_it(
    ledger: SendLedger,
) -> None:
    # Without a bounce service the claims system's new copy of a deferred event is its
    # retry: it used to get DONE and no email, with nothing in the logs.
    event_id = _id()
    await ledger.claim(event_id, "w1")
    await ledger.finish(event_id, "deferred", "temporary_failure")
    # A redelivery before its status went out is not the claims system's retry.
    assert (await ledger.claim(event_id, "w2", retry_deferred=True)).kind is ClaimKind.DONE
    await ledger.mark_published([(event_id, 1)])
    assert (await ledger.claim(event_id, "w2")).kind is ClaimKind.DONE  # bounce service on
    retry = await ledger.claim(event_id, "w2", retry_deferred=True)
    assert retry.kind is ClaimKind.RETRY
    entry = await ledger.get(event_id)
    assert entry is not None and entry.state is LedgerState.SENDING and entry.attempts == 2
    assert entry.owner == "w2" and not entry.status_published
    # In flight now: the same worker's second look waits, another's would take over.
    assert (await ledger.claim(event_id, "w2", retry_deferred=True)).kind is ClaimKind.IN_FLIGHT
    await ledger.finish(event_id, "delivered", "delivered")
    assert (await ledger.claim(event_id, "w3", retry_deferred=True)).kind is ClaimKind.DONE


async def test_a_row_held_for_want_of_consent_is_claimed_again(ledger: SendLedger) -> None:
    # Earlier releases claimed copies without consent and kept `held` as final for the
    # retention period: the copy published once the member consented got no email. Only
    # copies with consent claim now, so such a row is new again (attempt 1: the held copy
    # sent nothing, and the bounce service numbers the send's resends from 2), status out
    # or not.
    event_id = _id()
    await ledger.claim(event_id, "w1")
    await ledger.finish(event_id, "held", "no_consent")
    again = await ledger.claim(event_id, "w2")  # with or without a bounce service
    assert again.kind is ClaimKind.NEW and again.entry is None
    entry = await ledger.get(event_id)
    assert entry is not None and entry.state is LedgerState.SENDING and entry.attempts == 1
    assert (entry.owner, entry.outcome, entry.status_published) == ("w2", None, False)
    await ledger.finish(event_id, "delivered", "delivered")
    await ledger.mark_published([(event_id, 1)])
    done = await ledger.claim(event_id, "w3")
    assert done.kind is ClaimKind.DONE and done.entry is not None
    assert done.entry.status_published and done.entry.outcome == "delivered"
    # Held for another reason stays final.
    other = _id()
    await ledger.claim(other, "w1")
    await ledger.finish(other, "held", "awaiting_verification")
    await ledger.mark_published([(other, 1)])
    assert (await ledger.claim(other, "w2", retry_deferred=True)).kind is ClaimKind.DONE


async def test_an_event_whose_claim_is_renewed_is_not_taken_over(
    ledger: SendLedger, ledger_url: str
) -> None:
    # A worker that lost its partitions (evicted, still sending) or a second copy under
    # another key: the other worker used to take the claim over and send a second email.
    event_id = _id()
    await ledger.claim(event_id, "w1")
    assert (await ledger.claim(event_id, "w2")).kind is ClaimKind.ELSEWHERE
    entry = await ledger.get(event_id)
    assert entry is not None and entry.owner == "w1" and entry.attempts == 1
    # Its own second claim (an attempt run again) is still its own.
    assert (await ledger.claim(event_id, "w1" + AGAIN)).kind is ClaimKind.RETRY
    await _age(ledger_url, [event_id], CLAIM_LEASE - 5)
    await ledger.renew([event_id, _id()], "w1")  # w1 is still at it (an unknown id is no-op)
    await _age(ledger_url, [event_id], 15)  # a lease and 10 s after the claim
    assert (await ledger.claim(event_id, "w2")).kind is ClaimKind.ELSEWHERE
    await ledger.renew([event_id], "someone-else")  # renews only its own claims
    # Not renewed for a whole lease: its worker died or gave it up.
    await _age(ledger_url, [event_id], CLAIM_LEASE - 15)
    assert (await ledger.claim(event_id, "w2")).kind is ClaimKind.RETRY


async def test_postgresql_leases_keep_the_servers_time_not_the_workers(
    pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Workers on several machines: one whose clock ran a minute ahead took over every claim
    # made in the last minute (a second email each), one whose clock lagged renewed its
    # claims into the past.
    ledger = await open_ledger(pg_schema)
    try:
        taken, renewed = _id(), _id()
        await ledger.claim(taken, "w1")
        await ledger.claim(renewed, "w1")
        now = time.time()
        monkeypatch.setattr(time, "time", lambda: now + 2 * CLAIM_LEASE)
        assert (await ledger.claim(taken, "w2")).kind is ClaimKind.ELSEWHERE
        monkeypatch.setattr(time, "time", lambda: now - 2 * CLAIM_LEASE)
        await _age(pg_schema, [renewed], CLAIM_LEASE - 5)
        await ledger.renew([renewed], "w1")
        monkeypatch.undo()
        await _age(pg_schema, [renewed], 10)  # 5 s past the first lease, 10 s into the new
        assert (await ledger.claim(renewed, "w2")).kind is ClaimKind.ELSEWHERE
    finally:
        await ledger.close()


async def test_a_postgresql_ledger_measures_this_clock_against_the_servers(
    pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = await open_ledger(pg_schema)
    try:
        offset = await ledger.clock_offset()
        assert offset is not None and abs(offset) < 1  # the server runs on this machine
        real = time.time
        monkeypatch.setattr(time, "time", lambda: real() + 90)  # this clock 90 s ahead
        assert await ledger.clock_offset() == pytest.approx(-90, abs=1)
    finally:
        await ledger.close()


async def test_a_sqlite_ledger_shares_this_machines_clock(tmp_path: Path) -> None:
    ledger = await open_ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    try:
        assert await ledger.clock_offset() is None
    finally:
        await ledger.close()


async def test_published_flag(ledger: SendLedger) -> None:
    ids = [_id() for _ in range(3)]
    for event_id in ids:
        await ledger.claim(event_id, "w1")
        await ledger.finish(event_id, "rejected", "invalid_json")
    await ledger.mark_published([(event_id, 1) for event_id in ids[:2]])
    flags = [(await ledger.get(i)).status_published for i in ids]  # type: ignore[union-attr]
    assert flags == [True, True, False]
    assert await ledger.get(_id()) is None


async def test_a_status_mark_counts_only_for_its_own_settled_attempt(
    ledger: SendLedger, ledger_url: str
) -> None:
    # A worker's mark for attempt 1 written late, after another worker had taken the event
    # over: it said attempt 2's status was out, and a redelivery of the event, finding it
    # settled and reported, never published attempt 2's status.
    event_id = _id()
    await ledger.claim(event_id, "w1")
    await _age(ledger_url, [event_id], CLAIM_LEASE + 1)  # w1 stalled
    assert (await ledger.claim(event_id, "w2")).kind is ClaimKind.RETRY
    await ledger.finish(event_id, "delivered", "delivered")  # w1 finishes after all
    await ledger.mark_published([(event_id, 1)])  # w1's status
    entry = await ledger.get(event_id)
    assert entry is not None and entry.attempts == 2 and not entry.status_published
    # A mark for an attempt still sending is not taken either.
    sending = _id()
    await ledger.claim(sending, "w1")
    await ledger.mark_published([(sending, 1)])
    assert not (await ledger.get(sending)).status_published  # type: ignore[union-attr]
    # The settled attempt's own mark is.
    await ledger.mark_published([(event_id, 2), (_id(), 1)])
    entry = await ledger.get(event_id)
    assert entry is not None and entry.status_published


async def test_purge_forgets_events_settled_before_the_window_and_unmarked_ones_later(
    ledger: SendLedger, ledger_url: str
) -> None:
    old = [_id() for _ in range(5)]
    unmarked, unmarked_longer, sending = _id(), _id(), _id()
    for event_id in [*old, unmarked, unmarked_longer]:
        await ledger.claim(event_id, "w1")
        await ledger.finish(event_id, "delivered", "delivered")
    await ledger.claim(sending, "w1")
    await ledger.mark_published([(event_id, 1) for event_id in old])
    # Written long ago (other tests' rows, written now, stay inside the window).
    await _age(ledger_url, [*old, unmarked, sending], 10 * _YEAR)
    # Its worker crashed before writing the mark, long enough ago for that to be moot.
    await _age(ledger_url, [unmarked_longer], 30 * _YEAR)
    recent = _id()
    await ledger.claim(recent, "w1")
    await ledger.finish(recent, "delivered", "delivered")
    await ledger.mark_published([(recent, 1)])

    window = (time.time() - 5 * _YEAR, time.time() - 20 * _YEAR)
    assert await ledger.purge(*window, limit=4) == 4  # in batches of the limit
    assert await ledger.purge(*window, limit=4) == 2
    assert await ledger.purge(*window, limit=4) == 0
    assert [await ledger.get(event_id) for event_id in old] == [None] * 5
    assert await ledger.get(unmarked_longer) is None
    # Still sending, status mark missing for less than the second window, or inside the
    # window: kept.
    for event_id in (unmarked, sending):
        assert await ledger.get(event_id) is not None
    assert (await ledger.claim(recent, "w2")).kind is ClaimKind.DONE
    # A copy of a forgotten event is a new event.
    assert (await ledger.claim(old[0], "w2")).kind is ClaimKind.NEW


async def test_a_postgresql_purge_leaves_a_row_a_claim_is_taking_back(pg_schema: str) -> None:
    ledger = await open_ledger(pg_schema)
    try:
        event_id = _id()
        await ledger.claim(event_id, "w1")
        await ledger.finish(event_id, "deferred", "temporary_failure")
        await ledger.mark_published([(event_id, 1)])
        await _age(pg_schema, [event_id], 10 * _YEAR)
        # Another worker's claim takes the settled row back for sending (a copy of a
        # deferred event) and has not committed when the purge comes.
        async with await psycopg.AsyncConnection.connect(pg_schema) as other:
            async with other.transaction():
                await other.execute(
                    "SELECT 1 FROM send_ledger WHERE event_id = %s FOR UPDATE", (event_id,)
                )
                await other.execute(
                    "UPDATE send_ledger SET state = 'sending', status_published = 0"
                    " WHERE event_id = %s",
                    (event_id,),
                )
                purge = asyncio.create_task(ledger.purge(time.time() - 5 * _YEAR, 0.0))
                await asyncio.sleep(0.5)
        assert await asyncio.wait_for(purge, 10) == 0
        entry = await ledger.get(event_id)
        assert entry is not None and entry.state is LedgerState.SENDING
    finally:
        await ledger.close()


async def test_purge_goes_through_its_index(tmp_path: Path) -> None:
    """A ledger of months of events: finding the expired ones must not scan the table."""
    path = tmp_path / "ledger.db"
    ledger = await open_ledger(f"sqlite:///{path}")
    await ledger.close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        plan = [row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {SQLITE_PURGE}", (0.0, 0.0, 10))]
    assert any("send_ledger_final" in step for step in plan), plan
    assert not any(step.startswith("SCAN send_ledger") for step in plan), plan


async def test_a_ledger_indexed_by_an_earlier_release_is_indexed_again(ledger_url: str) -> None:
    # The earlier index left out events whose status mark was never written: the purge
    # could not find them, and they stayed for good.
    async def indexes() -> set[str]:
        if ledger_url.startswith("sqlite:///"):
            path = ledger_url.removeprefix("sqlite:///")
            with contextlib.closing(sqlite3.connect(path)) as db:
                sql = "SELECT name FROM sqlite_master WHERE tbl_name = 'send_ledger'"
                return {row[0] for row in db.execute(sql)}
        async with await psycopg.AsyncConnection.connect(ledger_url) as conn:
            cur = await conn.execute(
                "SELECT indexname FROM pg_indexes WHERE tablename = 'send_ledger'"
                " AND schemaname = current_schema()"
            )
            return {row[0] for row in await cur.fetchall()}

    ledger = await open_ledger(ledger_url)
    await ledger.close()
    earlier = (
        "CREATE INDEX send_ledger_settled ON send_ledger (updated_at)"
        " WHERE state = 'final' AND status_published = 1"
    )
    if ledger_url.startswith("sqlite:///"):
        path = ledger_url.removeprefix("sqlite:///")
        with contextlib.closing(sqlite3.connect(path)) as db, db:
            db.execute(earlier)
    else:
        async with await psycopg.AsyncConnection.connect(ledger_url, autocommit=True) as conn:
            await conn.execute(earlier)
    assert "send_ledger_settled" in await indexes()
    ledger = await open_ledger(ledger_url)
    try:
        # On PostgreSQL the earlier index is dropped in the background, CONCURRENTLY.
        deadline = time.monotonic() + 30
        while "send_ledger_settled" in (found := await indexes()):
            assert time.monotonic() < deadline, "the earlier index was not dropped"
            await asyncio.sleep(0.05)
    finally:
        await ledger.close()
    assert "send_ledger_final" in found


async def test_finish_without_claim_records_outcome(ledger: SendLedger) -> None:
    event_id = _id()
    await ledger.finish(event_id, "rejected", "missing_field")
    assert (await ledger.claim(event_id, "w1")).kind is ClaimKind.DONE


async def test_concurrent_claims_give_exactly_one_new(ledger: SendLedger) -> None:
    event_id = _id()
    kinds = await asyncio.gather(*(ledger.claim(event_id, "w1") for _ in range(20)))
    assert sum(c.kind is ClaimKind.NEW for c in kinds) == 1


async def test_concurrent_claims_and_finishes_of_many_events(
    ledger: SendLedger, ledger_url: str
) -> None:
    # Dozens in flight at once (as a worker has them): each event's answer is its own.
    ids = [_id() for _ in range(50)]
    await ledger.finish(ids[0], "delivered", "delivered")
    await ledger.claim(ids[1], "dead-worker")
    await _age(ledger_url, [ids[1]], CLAIM_LEASE + 1)
    claims = await asyncio.gather(*(ledger.claim(event_id, "w1") for event_id in ids))
    assert claims[0].kind is ClaimKind.DONE
    assert claims[1].kind is ClaimKind.RETRY
    assert {c.kind for c in claims[2:]} == {ClaimKind.NEW}
    await asyncio.gather(*(ledger.finish(e, "delivered", "delivered") for e in ids[1:]))
    entries = [await ledger.get(event_id) for event_id in ids]
    assert all(e is not None and e.outcome == "delivered" for e in entries)
    again = await asyncio.gather(*(ledger.claim(event_id, "w2") for event_id in ids))
    assert {c.kind for c in again} == {ClaimKind.DONE}


async def test_an_event_claimed_and_finished_twice_at_once_is_new_once_and_keeps_the_last(
    ledger: SendLedger,
) -> None:
    # Two copies of one event (two owners) claimed together, among others: the first claim
    # wins, the second finds it sending; two outcomes together: the later one stands.
    event_id, others = _id(), [_id() for _ in range(5)]
    claims = await asyncio.gather(
        ledger.claim(others[0], "w1"),
        ledger.claim(event_id, "w1"),
        *(ledger.claim(other, "w1") for other in others[1:]),
        ledger.claim(event_id, "w2"),
    )
    assert [c.kind for c in claims] == [ClaimKind.NEW] * 6 + [ClaimKind.ELSEWHERE]
    entry = await ledger.get(event_id)
    assert entry is not None and entry.owner == "w1" and entry.state is LedgerState.SENDING
    await asyncio.gather(
        ledger.finish(event_id, "deferred", "connection_lost"),
        *(ledger.finish(other, "delivered", "delivered") for other in others),
        ledger.finish(event_id, "delivered", "delivered"),
    )
    entry = await ledger.get(event_id)
    assert entry is not None and (entry.outcome, entry.reason) == ("delivered", "delivered")


def _transactions(url: str, event_ids: Sequence[str]) -> int:
    """How many transactions last wrote these events' rows."""
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT count(DISTINCT xmin::text) FROM send_ledger WHERE event_id = ANY(%s)",
            (list(event_ids),),
        ).fetchone()
    assert row is not None
    return int(row[0])


async def test_postgresql_claims_and_finishes_made_together_share_a_transaction(
    pg_schema: str,
) -> None:
    # Workers on several machines keep dozens of events in flight each: a transaction per
    # claim and per outcome would cost the server a commit (a WAL flush) each.
    ledger = await open_ledger(pg_schema)
    ids = [_id() for _ in range(40)]
    try:
        claims = await asyncio.gather(*(ledger.claim(event_id, "w1") for event_id in ids))
        assert {c.kind for c in claims} == {ClaimKind.NEW}
        claimed_in = _transactions(pg_schema, ids)
        await asyncio.gather(*(ledger.finish(e, "delivered", "delivered") for e in ids))
        finished_in = _transactions(pg_schema, ids)
    finally:
        await ledger.close()
    assert claimed_in <= 2 and finished_in <= 2, (claimed_in, finished_in)


async def test_postgresql_batches_over_the_same_events_in_other_orders_do_not_deadlock(
    pg_schema: str,
) -> None:
    # Two workers with copies of the same settled or abandoned events (a redelivery, copies
    # under other keys) claim them in their own orders: rows locked in arrival order
    # deadlocked, and the whole batch of one failed.
    first, second = await open_ledger(pg_schema), await open_ledger(pg_schema)
    ids = [f"ev-{n:03d}-{_id()}" for n in range(20)]
    try:
        await asyncio.gather(*(first.claim(event_id, "dead-worker") for event_id in ids))
        await _age(pg_schema, ids, CLAIM_LEASE + 1)  # nobody renewed them: each is a RETRY
        claims = await asyncio.gather(
            *(first.claim(event_id, "w1") for event_id in ids),
            *(second.claim(event_id, "w2") for event_id in reversed(ids)),
            return_exceptions=True,
        )
    finally:
        await first.close()
        await second.close()
    assert not [c for c in claims if isinstance(c, BaseException)], claims
    kinds = [c.kind for c in claims if not isinstance(c, BaseException)]
    by_event = zip(kinds[:20], reversed(kinds[20:]), strict=True)
    assert all({*pair} == {ClaimKind.ELSEWHERE, ClaimKind.RETRY} for pair in by_event), kinds


CLAIM_SCRIPT = """
import asyncio, sys
from eobblast.state import ClaimKind, open_ledger
async def main():
    ledger = await open_ledger(sys.argv[1])
    won = 0
    for i in range(200):
        won += (await ledger.claim(f"shared-{sys.argv[3]}-{i}", sys.argv[2])).kind is ClaimKind.NEW
    await ledger.close()
    print(won)
asyncio.run(main())
"""


def test_processes_share_the_ledger(ledger_url: str) -> None:
    # Two worker processes race for the same 200 events: each is won exactly once.
    tag = uuid.uuid4().hex[:8]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CLAIM_SCRIPT, ledger_url, f"worker{n}", tag],
            stdout=subprocess.PIPE,
            text=True,
        )
        for n in range(2)
    ]
    wins = [int(p.communicate(timeout=60)[0]) for p in procs]
    assert sum(wins) == 200


async def test_bad_url_is_a_clear_error() -> None:
    from eobblast.errors import ConfigError

    with pytest.raises(ConfigError, match="sqlite:///"):
        await open_ledger("mysql://x")


async def test_a_postgresql_store_comes_back_after_its_connection_was_dropped(
    pg_schema: str,
) -> None:
    # A server restart or a network break drops the connection. The statement that finds
    # it dropped fails (the worker tries again); the next one runs on a new connection.
    ledger = await open_ledger(pg_schema)
    first, second = _id(), _id()
    try:
        assert (await ledger.claim(first, "w1")).kind is ClaimKind.NEW
        drop_store_connection(ledger)
        with pytest.raises(psycopg.OperationalError):
            await ledger.claim(second, "w1")
        assert (await ledger.claim(second, "w1")).kind is ClaimKind.NEW
        assert (await ledger.claim(first, "w1")).kind is ClaimKind.IN_FLIGHT  # kept
    finally:
        await ledger.close()


def _sessions_idle_in_transaction(client_ports: Sequence[int]) -> int:
    with psycopg.connect(PG_BASE, autocommit=True) as admin:
        row = admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE client_port = ANY(%s)"
            " AND state = 'idle in transaction'",
            (list(client_ports),),
        ).fetchone()
    assert row is not None
    return int(row[0])


async def _until(check: Callable[[], bool], within: float) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "not within the time allowed"
        await asyncio.sleep(0.1)


async def test_a_postgresql_ledger_is_not_held_up_by_a_worker_gone_mid_batch(
    pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A worker's machine dropped off the network mid-batch: its session sat idle in its
    # transaction for hours, holding its rows' locks, and other workers' claims of those
    # events waited on them with their ledgers' lock held (renewals stalled, leases lapsed,
    # emails went out twice). Now such a wait ends in a transient error (the claim is
    # tried again), and the server ends the session that idles, undoing its claims.
    monkeypatch.setattr(postgres, "LOCK_TIMEOUT", "1s")
    monkeypatch.setattr(postgres, "IDLE_IN_TRANSACTION_TIMEOUT", "3s")
    settled, new = _id(), _id()
    async with PgRelay(freeze_at=b"VALUES ($1, 'sending', $2") as path:
        gone = await open_ledger(path.url(pg_schema))
        live = await open_ledger(pg_schema)
        try:
            await live.claim(settled, "w0")
            await live.finish(settled, "delivered", "delivered")
            # Its batch makes the new event's row (locked), then claims the settled one one
            # by one: that statement never reaches the server, nor does anything after it.
            batch = asyncio.gather(
                gone.claim(new, "w1"), gone.claim(settled, "w1"), return_exceptions=True
            )
            await _until(lambda: _sessions_idle_in_transaction(path.upstream_ports) == 1, 5)
            started = time.monotonic()
            async with asyncio.timeout(10):  # without a lock timeout: for ever
                with pytest.raises(psycopg.errors.LockNotAvailable) as waited:
                    await live.claim(new, "w2")
            assert isinstance(waited.value, TRANSIENT_ERRORS)
            assert time.monotonic() - started < 3
            async with asyncio.timeout(2):
                await live.renew([settled], "w2")  # the ledger is not held meanwhile
            # The server ends the session that idles: the gone worker's claim is undone.
            await _until(lambda: _sessions_idle_in_transaction(path.upstream_ports) == 0, 10)
            assert (await live.claim(new, "w2")).kind is ClaimKind.NEW
            # (Here the path passes the server's hang-up on: the batch fails, as it would
            # once the client's TCP keepalives found the path dead.)
            results = await asyncio.wait_for(batch, 10)
            assert all(isinstance(r, TRANSIENT_ERRORS) for r in results), results
        finally:
            with psycopg.connect(PG_BASE, autocommit=True) as admin:
                admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE client_port = ANY(%s)",
                    (path.upstream_ports,),
                )
            await live.close()
            await gone.close()


async def test_a_postgresql_ledger_whose_server_stops_answering_fails_in_time_and_comes_back(
    pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A hung pooler or a stopped server process keeps TCP up: keepalives are answered, sent
    # bytes acknowledged, and a claim waited for ever, holding its worker's batch (and every
    # call behind it). Now the call fails within the bound, as a transient error, and the
    # ledger connects again once the path passes data. The ledger's bound is its own, under
    # its claims' lease less a renewal's interval each side: renewals queue behind a call on
    # the connection, and one stuck there for the stores' general bound (60 s) would let
    # the lease (30 s) lapse, another worker take over claims this one holds, and send
    # their events again. Here lease 4 s, renewal 1 s: a bound of 2 s.
    _lease(monkeypatch, 4.0, 1.0)
    first, second = _id(), _id()
    async with PgRelay() as path:
        ledger = await open_ledger(path.url(pg_schema))
        try:
            assert (await ledger.claim(first, "w1")).kind is ClaimKind.NEW
            path.freeze()
            for call in (ledger.claim(second, "w1"), ledger.get(first)):
                started = time.monotonic()
                async with asyncio.timeout(20):  # without the bound: for ever
                    with pytest.raises(StoreNotAnswering) as frozen:
                        await call
                assert isinstance(frozen.value, TRANSIENT_ERRORS)
                assert 1.5 < time.monotonic() - started < 5
            path.thaw()
            assert (await ledger.claim(second, "w1")).kind is ClaimKind.NEW
            assert (await ledger.claim(first, "w1")).kind is ClaimKind.IN_FLIGHT  # kept
        finally:
            await ledger.close()


def _lease(monkeypatch: pytest.MonkeyPatch, lease: float, renew: float) -> None:
    monkeypatch.setattr(ledger_module, "CLAIM_LEASE", lease)
    monkeypatch.setattr(ledger_module, "CLAIM_RENEW", renew)


async def test_a_postgresql_caller_error_after_the_bound_keeps_its_own_type(
    pg_schema: str,
) -> None:
    # Only what the hang-up causes is "not answering" (transient, tried again as an
    # outage); a bug or a constraint that fails a slow transaction stays what it is, or
    # the worker would retry it for ever instead of giving it up.
    conn = await postgres.connect_postgres(pg_schema, "test store", 0x0E0B_0001, ())
    conn._answer_wait = 0.3
    try:
        with pytest.raises(ZeroDivisionError):
            async with conn.transaction():
                await conn.execute("SELECT 1")
                await asyncio.sleep(0.6)  # the bound passes and the socket is hung up on
                _ = 1 / 0
        # The connection it gave up on is replaced at the next call.
        assert (await (await conn.execute("SELECT 2")).fetchone()) == (2,)
    finally:
        await conn.close()


async def test_a_postgresql_store_frozen_during_its_schema_set_up_fails_in_time(
    pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A worker starting while the path freezes would otherwise wait for ever, never
    # restarted by its supervisor (it did not die).
    monkeypatch.setattr(postgres, "SET_UP_ANSWER_WAIT", 2.0)
    async with PgRelay(freeze_at=b"pg_advisory_xact_lock") as path:
        started = time.monotonic()
        async with asyncio.timeout(20):  # without the bound: for ever
            with pytest.raises(StoreNotAnswering):
                await open_ledger(path.url(pg_schema))
        assert 1.5 < time.monotonic() - started < 5


@pytest.mark.parametrize("failure", ["cut", "frozen"])
async def test_a_postgresql_claim_batch_whose_commit_fails_is_claimed_once(
    pg_schema: str, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    # A batch's COMMIT is the one statement whose failure leaves its outcome unknown: the
    # connection cut just as the server committed, or the path frozen with COMMIT unsent.
    # Either way the batch fails whole (a transient error; its claims are not run again one
    # by one) and each event has one claim: its worker finds it in flight, another waits.
    _lease(monkeypatch, 4.0, 1.0)  # a bound of 2 s
    events = [_id() for _ in range(5)]
    other = await open_ledger(pg_schema)
    async with PgRelay() as path:
        ledger = await open_ledger(path.url(pg_schema))
        try:
            # Armed now: opening the ledger committed its schema through the relay.
            if failure == "cut":
                path.cut_at = PG_COMMIT
            else:
                path.freeze_at = PG_COMMIT
            async with asyncio.timeout(20):  # frozen, without the bound: for ever
                results = await asyncio.gather(
                    *(ledger.claim(e, "w1") for e in events), return_exceptions=True
                )
            expected = psycopg.OperationalError if failure == "cut" else StoreNotAnswering
            assert all(isinstance(r, expected) for r in results), results
            assert all(isinstance(r, TRANSIENT_ERRORS) for r in results)
            path.cut_at = path.freeze_at = None
            path.thaw()
            # Cut: committed, so in flight under w1. Frozen: COMMIT never reached the
            # server, which rolled the batch back once the client hung up: new.
            again = ClaimKind.IN_FLIGHT if failure == "cut" else ClaimKind.NEW
            for event_id in events:
                assert (await ledger.claim(event_id, "w1")).kind is again
                assert (await other.claim(event_id, "w2")).kind is ClaimKind.ELSEWHERE
            assert path.cuts == (failure == "cut")
        finally:
            await ledger.close()
            await other.close()


async def test_a_postgresql_ledger_connection_limits_its_waits_and_keeps_them_when_it_comes_back(
    pg_schema: str,
) -> None:
    # The lock and idle limits are the store connection's own (its schema set-up may wait
    # longer), set again on a new connection, and the client probes the path to the server.
    ledger = await open_ledger(pg_schema)
    conn = ledger._conn  # type: ignore[attr-defined]

    async def limits() -> tuple[str, ...]:
        cur = await conn.execute(
            "SELECT current_setting('lock_timeout'),"
            " current_setting('idle_in_transaction_session_timeout')"
        )
        return tuple(await cur.fetchone())

    try:
        assert await limits() == ("10s", "30s")
        params = conn._conn.info.get_parameters()
        assert params["keepalives"] == "1" and params["tcp_user_timeout"] == "30000", params
        drop_store_connection(ledger)
        with pytest.raises(psycopg.OperationalError):
            await ledger.claim(_id(), "w1")
        assert await limits() == ("10s", "30s")
        assert conn._conn.info.get_parameters()["keepalives_idle"] == "30"
        # A transaction of its own that idles that long (the worker's loop stalled) has lost
        # its connection: a transient error, tried again, not a fault.
        await conn.execute("SET idle_in_transaction_session_timeout = '1s'")
        with pytest.raises(TRANSIENT_ERRORS):
            async with conn.transaction():
                await conn.execute("SELECT 1")
                await asyncio.sleep(2)
                await conn.execute("SELECT 1")
        assert (await ledger.claim(_id(), "w1")).kind is ClaimKind.NEW
        assert await limits() == ("10s", "30s")
    finally:
        await ledger.close()


@pytest.mark.parametrize(
    "url", ["postgresql://eob:S3cr%t@db.internal/eob", "postgresql://eob:S3cr3t@[db.internal/eob"]
)
async def test_an_unreadable_postgresql_url_is_refused_without_echoing_it(url: str) -> None:
    with pytest.raises(ConfigError) as refused:
        await open_ledger(url)
    assert "S3cr" not in str(refused.value) and "db.internal" not in str(refused.value)
    assert refused.value.__cause__ is None and refused.value.__suppress_context__


async def test_a_postgresql_ledger_it_cannot_reach_says_why_without_the_password() -> None:
    # The worker's error said only "cannot connect": libpq's reason (which port, refused)
    # is what tells an operator what to fix. The password never shows.
    with socket.socket() as bound:  # bound, not listening: connections are refused
        bound.bind(("127.0.0.1", 0))
        port = bound.getsockname()[1]
        with pytest.raises(ConfigError) as refused:
            await open_ledger(f"postgresql://eob:Sup3rS3cret@127.0.0.1:{port}/eob")
    said = refused.value.detail
    assert said.startswith("cannot connect to the PostgreSQL ledger: ")
    assert f"port {port} failed" in said and "refused" in said
    assert "Sup3rS3cret" not in said and refused.value.__cause__ is None


@pytest.mark.parametrize(
    ("said", "shown"),
    [
        (
            'connection to server at "db" failed: refused',
            'connection to server at "db" failed: refused',
        ),
        ("password authentication failed: eob\nDETAIL: more", None),
        ('FATAL: role "ebb-eob-x" does not exist', None),
    ],
)
def test_a_libpq_message_holding_the_password_is_not_shown(said: str, shown: str | None) -> None:
    # Masking the password in the line ("***") also masked it inside a user or host name
    # ("ebb-***-x"), which told the password; such a line is not shown at all.
    reason = libpq_reason(psycopg.OperationalError(said), "postgresql://eob:eob@db/eob")
    assert reason == (shown or "OperationalError (its message is not shown: it holds the password)")

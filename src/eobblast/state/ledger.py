"""The send ledger: one row per event id, so a redelivered or republished event is sent once.

The ledger is what turns Kafka's at-least-once delivery into effectively-once email:
`claim` before sending, `finish` with the outcome, `mark_published` once the status event
is acknowledged. Only an event that was in flight under another owner when that owner
died is ever sent again, so duplicates are bounded by the in-flight limit.

A claim is a lease: its owner renews it (`renew`, every CLAIM_RENEW s) while it sends the
event or holds an outcome it could not record yet. A claim renewed within CLAIM_LEASE is
`ELSEWHERE` to anyone else (wait, claim again), not taken over, so a worker that lost the
partition while still sending (evicted from the group, a copy published under another key)
is not doubled. A claim nobody renews (its worker died, or gave the record up) is taken
over once its lease has run out.

Leases are timed by one clock: the machine's for SQLite (one machine), the server's for
PostgreSQL (workers on machines whose clocks disagree must not cut each other's leases short).

A status mark names the attempt it is for: a late mark from an earlier attempt must not
say that a later attempt's status is out.
"""

from __future__ import annotations

import abc
import asyncio
import enum
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eobblast.errors import Outcome, ReasonCode
from eobblast.state.group import GroupCommit
from eobblast.state.postgres import connect_postgres
from eobblast.state.sqlite import open_sqlite, open_store, write_transaction

_SCHEMA = """
CREATE TABLE IF NOT EXISTS send_ledger (
    event_id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    owner TEXT NOT NULL,
    outcome TEXT,
    reason TEXT,
    attempts INTEGER NOT NULL DEFAULT 1,
    status_published INTEGER NOT NULL DEFAULT 0,
    updated_at DOUBLE PRECISION NOT NULL
)
"""
# Settled events, by when they were settled: what `purge` looks through. Partial, so a
# row enters it once (when its outcome is recorded) and sending rows stay out of it.
_FINAL_INDEX = (
    "CREATE INDEX IF NOT EXISTS send_ledger_final ON send_ledger (updated_at) WHERE state = 'final'"
)
# An earlier release's index of the same rows, less those whose status mark was not written.
_OLD_INDEX = "DROP INDEX IF EXISTS send_ledger_settled"
_COLUMNS = "event_id, state, owner, outcome, reason, attempts, status_published, updated_at"
# `{lock}`: on PostgreSQL the rows are locked as they are chosen, and rows a claim holds are
# skipped (its DELETE would otherwise wait, then delete a row the claim has just taken back
# for sending: only `event_id` is checked again after a wait, not the state).
_PURGE = (
    "DELETE FROM send_ledger WHERE event_id IN (SELECT event_id FROM send_ledger"
    " WHERE state = 'final' AND updated_at < ? AND (status_published = 1 OR updated_at < ?)"
    " LIMIT ?{lock})"
)
SQLITE_PURGE = _PURGE.format(lock="")
_PG_PURGE = _PURGE.format(lock=" FOR UPDATE SKIP LOCKED").replace("?", "%s")
# A status mark counts only for the attempt it names, once that attempt is settled.
_SQLITE_MARK = (
    "UPDATE send_ledger SET status_published = 1"
    " WHERE event_id = ? AND attempts = ? AND state = 'final'"
)
# One statement for a batch of marks: the pairs unnested side by side.
_PG_MARK = (
    "UPDATE send_ledger SET status_published = 1 FROM unnest(%s::text[], %s::int[])"
    " AS mark(event_id, attempts) WHERE send_ledger.event_id = mark.event_id"
    " AND send_ledger.attempts = mark.attempts AND state = 'final'"
)
# On PostgreSQL every time written or compared is the server's clock, in epoch seconds
# (extract(epoch from clock_timestamp())): leases do not depend on the workers' clocks.
_PG_CLAIM = (
    "INSERT INTO send_ledger (event_id, state, owner, updated_at) VALUES (%s, 'sending', %s,"
    " extract(epoch from clock_timestamp())) ON CONFLICT (event_id) DO NOTHING"
)
# A batch's first claims of its events, in one statement (in event id order, so two
# workers' batches take their rows' locks in the same order): the rows it made come back.
_PG_CLAIM_MANY = (
    "INSERT INTO send_ledger (event_id, state, owner, updated_at)"
    " SELECT claim.event_id, 'sending', claim.owner, extract(epoch from clock_timestamp())"
    " FROM unnest(%s::text[], %s::text[]) AS claim(event_id, owner) ORDER BY claim.event_id"
    " ON CONFLICT (event_id) DO NOTHING RETURNING event_id"
)
_PG_CLAIMED = (
    "SELECT event_id, state, owner, outcome, reason, attempts, status_published, updated_at,"
    " extract(epoch from clock_timestamp()) FROM send_ledger WHERE event_id = %s FOR UPDATE"
)
_PG_RETAKE = (
    "UPDATE send_ledger SET state = 'sending', owner = %s, attempts = attempts + 1,"
    " status_published = 0, updated_at = extract(epoch from clock_timestamp())"
    " WHERE event_id = %s"
)
_PG_RESTART = (
    "UPDATE send_ledger SET state = 'sending', owner = %s, attempts = 1, outcome = NULL,"
    " reason = NULL, status_published = 0, updated_at = extract(epoch from clock_timestamp())"
    " WHERE event_id = %s"
)
# A batch's outcomes in one statement, each event once (its last outcome), in id order.
_PG_FINISH_MANY = (
    "INSERT INTO send_ledger (event_id, state, owner, outcome, reason, updated_at)"
    " SELECT done.event_id, 'final', '', done.outcome, done.reason,"
    " extract(epoch from clock_timestamp())"
    " FROM unnest(%s::text[], %s::text[], %s::text[]) AS done(event_id, outcome, reason)"
    " ORDER BY done.event_id"
    " ON CONFLICT (event_id) DO UPDATE SET state = 'final', outcome = EXCLUDED.outcome,"
    " reason = EXCLUDED.reason, updated_at = EXCLUDED.updated_at"
)
_PG_RENEW = (
    "UPDATE send_ledger SET updated_at = extract(epoch from clock_timestamp())"
    " WHERE event_id = ANY(%s) AND state = 'sending' AND owner IN (%s, %s)"
)
# Rows deleted per transaction (~10-30 ms of the ledger's write lock on SQLite).
PURGE_BATCH = 1_000
# Owners renew their claims this often; a claim not renewed for CLAIM_LEASE may be taken.
CLAIM_RENEW = 5.0
CLAIM_LEASE = 30.0
# Round trips per clock comparison; the quickest one's reading counts.
CLOCK_SAMPLES = 3
# A worker's second claim of its own event (an attempt run again) adds this to its id.
AGAIN = "-again"


_SCHEMA_LOCK = 0x0E0B_B1A5


class LedgerState(enum.StrEnum):
    """Where an event stands in the ledger."""

    SENDING = "sending"
    FINAL = "final"


class ClaimKind(enum.Enum):
    """What a claim found."""

    NEW = "new"  # first time: send it
    RETRY = "retry"  # another owner died while sending it: send again (bounded duplicates)
    IN_FLIGHT = "in_flight"  # this owner is sending it right now: wait, do not send twice
    ELSEWHERE = "elsewhere"  # a live owner is sending it: wait, claim again later
    DONE = "done"  # it already has a final outcome: never send again


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One event's row."""

    event_id: str
    state: LedgerState
    owner: str
    outcome: str | None
    reason: str | None
    attempts: int
    status_published: bool
    updated_at: float = 0.0  # when it was claimed or its claim last renewed

    @property
    def withheld(self) -> bool:
        """Whether this is the row of a copy held for want of consent (earlier releases
        claimed such copies; it sent nothing)."""
        return self.outcome == Outcome.HELD and self.reason == ReasonCode.NO_CONSENT


@dataclass(frozen=True, slots=True)
class Claim:
    """The result of claiming an event for sending."""

    kind: ClaimKind
    entry: LedgerEntry | None = None


def _entry(row: Sequence[Any]) -> LedgerEntry:
    return LedgerEntry(
        str(row[0]),
        LedgerState(row[1]),
        str(row[2]),
        row[3],
        row[4],
        int(row[5]),
        bool(row[6]),
        float(row[7]),
    )


class SendLedger(abc.ABC):
    """The interface both stores implement; the same tests run against each."""

    @abc.abstractmethod
    async def claim(self, event_id: str, owner: str, *, retry_deferred: bool = False) -> Claim:
        """Claim an event for sending by `owner` (a worker instance id). `retry_deferred`:
        an event whose final outcome was `deferred` is sent again (RETRY), not only
        reported (DONE): where no bounce service resends it, a copy of it is its retry. A
        row of an event held for want of consent (earlier releases claimed such copies; the
        workers now claim only copies that carry consent) is claimed as NEW, from attempt 1:
        it sent no email."""

    @abc.abstractmethod
    async def finish(self, event_id: str, outcome: str, reason: str) -> None:
        """Record the final outcome of an event."""

    @abc.abstractmethod
    async def mark_published(self, marks: Sequence[tuple[str, int]]) -> None:
        """Record that the status events of these (event id, attempt) pairs were acknowledged
        by Kafka. A mark for an attempt other than the event's settled last one is ignored."""

    @abc.abstractmethod
    async def get(self, event_id: str) -> LedgerEntry | None:
        """The row of an event, if any."""

    @abc.abstractmethod
    async def renew(self, event_ids: Sequence[str], owner: str) -> None:
        """Renew `owner`'s claims of these events (those still sending under it; call
        every CLAIM_RENEW s for what it is sending or has not recorded yet)."""

    @abc.abstractmethod
    async def purge(self, before: float, unmarked_before: float, limit: int = PURGE_BATCH) -> int:
        """Forget up to `limit` events settled before `before` (epoch seconds) whose status
        is marked published, or settled before `unmarked_before` whose mark never came (a
        worker that stopped or crashed with marks unwritten); returns how many. A copy of
        one arriving later is sent again. (The times are the caller's clock: seconds of
        skew are nothing to a window of days.)"""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections."""

    async def clock_offset(self) -> float | None:
        """The ledger's clock minus this process's, in seconds; None where they are the same
        clock (a ledger on this machine)."""
        return None

    @staticmethod
    def _decide(entry: LedgerEntry, owner: str, retry_deferred: bool, now: float) -> Claim:
        """What a claim by `owner` finds in `entry`, at `now` by the ledger's clock."""
        if entry.state is LedgerState.FINAL:
            # A deferred event whose status went out: a new copy is the claims system's
            # retry (a Kafka redelivery comes before the status is marked published).
            if retry_deferred and entry.outcome == Outcome.DEFERRED and entry.status_published:
                return Claim(ClaimKind.RETRY, entry)  # sent again, as the next attempt
            if entry.withheld:
                # Only a copy with consent claims; that copy sent nothing: new, attempt 1.
                return Claim(ClaimKind.NEW)
            return Claim(ClaimKind.DONE, entry)
        if entry.owner == owner:
            return Claim(ClaimKind.IN_FLIGHT, entry)
        same_worker = entry.owner.removesuffix(AGAIN) == owner.removesuffix(AGAIN)
        if not same_worker and now - entry.updated_at < CLAIM_LEASE:
            return Claim(ClaimKind.ELSEWHERE, entry)
        return Claim(ClaimKind.RETRY, entry)


class _GroupedLedger(SendLedger):
    """A store's ledger whose concurrent claims, and outcomes, share one transaction per
    batch (GroupCommit): a worker keeps dozens of events in flight, and a transaction
    each would cost a commit (on PostgreSQL a WAL flush and round trips) per event."""

    def __init__(self) -> None:
        self._claims: GroupCommit[tuple[str, str, bool], Claim] = GroupCommit(self._claim_many)
        self._finishes: GroupCommit[tuple[str, str, str], None] = GroupCommit(self._finish_many)

    async def claim(self, event_id: str, owner: str, *, retry_deferred: bool = False) -> Claim:
        """Claim an event for sending by `owner` (in a transaction shared with concurrent
        claims: one per batch, not one per event)."""
        return await self._claims.submit((event_id, owner, retry_deferred))

    async def finish(self, event_id: str, outcome: str, reason: str) -> None:
        """Record the final outcome of an event (shared transaction, as claims)."""
        await self._finishes.submit((event_id, outcome, reason))

    @abc.abstractmethod
    async def _claim_many(self, items: Sequence[tuple[str, str, bool]]) -> list[Claim]:
        """Claims (event id, owner, retry_deferred) in one transaction, answered in order."""

    @abc.abstractmethod
    async def _finish_many(self, items: Sequence[tuple[str, str, str]]) -> list[None]:
        """Outcomes (event id, outcome, reason) in one transaction."""


class SqliteLedger(_GroupedLedger):
    """The ledger in one SQLite file (WAL), shared by the worker processes of one machine.

    Statements are tiny single-row writes that finish in microseconds, so they run on the
    event loop's thread; a write waits for another process's lock with the loop running
    (`begin_immediate`).
    """

    def __init__(self, path: Path) -> None:
        super().__init__()
        self._db = open_sqlite(path, [_SCHEMA, _FINAL_INDEX, _OLD_INDEX])

    def _claim_row(self, event_id: str, owner: str, retry_deferred: bool) -> Claim:
        db = self._db
        inserted = db.execute(
            "INSERT OR IGNORE INTO send_ledger (event_id, state, owner, updated_at)"
            " VALUES (?, 'sending', ?, ?)",
            (event_id, owner, time.time()),
        ).rowcount
        if inserted:
            return Claim(ClaimKind.NEW)
        row = db.execute(
            f"SELECT {_COLUMNS} FROM send_ledger WHERE event_id = ?",  # noqa: S608
            (event_id,),
        ).fetchone()
        claim = self._decide(_entry(row), owner, retry_deferred, time.time())
        if claim.kind is ClaimKind.RETRY:
            db.execute(
                "UPDATE send_ledger SET state = 'sending', owner = ?, attempts = attempts + 1,"
                " status_published = 0, updated_at = ? WHERE event_id = ?",
                (owner, time.time(), event_id),
            )
        elif claim.kind is ClaimKind.NEW:  # a row that sent nothing, taken from the start
            db.execute(
                "UPDATE send_ledger SET state = 'sending', owner = ?, attempts = 1,"
                " outcome = NULL, reason = NULL, status_published = 0, updated_at = ?"
                " WHERE event_id = ?",
                (owner, time.time(), event_id),
            )
        return claim

    async def _claim_many(self, items: Sequence[tuple[str, str, bool]]) -> list[Claim]:
        return await write_transaction(self._db, lambda: [self._claim_row(*item) for item in items])

    async def _finish_many(self, items: Sequence[tuple[str, str, str]]) -> list[None]:
        now = time.time()
        await write_transaction(
            self._db,
            lambda: self._db.executemany(
                "INSERT INTO send_ledger (event_id, state, owner, outcome, reason, updated_at)"
                " VALUES (?, 'final', '', ?, ?, ?) ON CONFLICT(event_id) DO UPDATE SET"
                " state = 'final', outcome = excluded.outcome, reason = excluded.reason,"
                " updated_at = excluded.updated_at",
                [(event_id, outcome, reason, now) for event_id, outcome, reason in items],
            ),
        )
        return [None] * len(items)

    async def mark_published(self, marks: Sequence[tuple[str, int]]) -> None:
        """Record that these attempts' status events were acknowledged."""
        if marks:
            await write_transaction(self._db, lambda: self._db.executemany(_SQLITE_MARK, marks))

    async def get(self, event_id: str) -> LedgerEntry | None:
        """The row of an event, if any."""
        row = self._db.execute(
            f"SELECT {_COLUMNS} FROM send_ledger WHERE event_id = ?",  # noqa: S608
            (event_id,),
        ).fetchone()
        return _entry(row) if row else None

    async def renew(self, event_ids: Sequence[str], owner: str) -> None:
        """Renew `owner`'s claims of these events."""
        if event_ids:
            now = time.time()
            await write_transaction(
                self._db,
                lambda: self._db.executemany(
                    "UPDATE send_ledger SET updated_at = ? WHERE event_id = ?"
                    " AND state = 'sending' AND owner IN (?, ?)",
                    [(now, event_id, owner, owner + AGAIN) for event_id in event_ids],
                ),
            )

    async def purge(self, before: float, unmarked_before: float, limit: int = PURGE_BATCH) -> int:
        """Forget up to `limit` events settled long enough ago."""
        return await write_transaction(
            self._db,
            lambda: self._db.execute(SQLITE_PURGE, (before, unmarked_before, limit)).rowcount,
        )

    async def close(self) -> None:
        """Close the database."""
        self._db.close()


class PostgresLedger(_GroupedLedger):
    """The ledger in PostgreSQL, for workers that span machines."""

    def __init__(self, conn: Any) -> None:
        super().__init__()
        self._conn = conn
        self._lock = asyncio.Lock()

    @classmethod
    async def connect(cls, dsn: str) -> PostgresLedger:
        """Connect and create the table if needed."""
        # Its calls are bounded under the claims' lease: renewals queue behind a call on
        # the connection, and one stuck there past the lease would let another worker
        # take over claims this one still holds, and send their events again.
        conn = await connect_postgres(
            dsn,
            "ledger",
            _SCHEMA_LOCK,
            [_SCHEMA, _FINAL_INDEX, _OLD_INDEX],
            answer_wait=CLAIM_LEASE - 2 * CLAIM_RENEW,
        )
        return cls(conn)

    async def _claim_many(self, items: Sequence[tuple[str, str, bool]]) -> list[Claim]:
        # The common case, events new to the ledger, in one statement; the rest (and a
        # second claim of an event within the batch) one by one, as a lone claim would be.
        firsts: dict[str, str] = {}
        for event_id, owner, _ in items:
            firsts.setdefault(event_id, owner)
        async with self._lock, self._conn.transaction():
            cur = await self._conn.execute(_PG_CLAIM_MANY, (list(firsts), list(firsts.values())))
            made = {row[0] for row in await cur.fetchall()}
            claims: dict[int, Claim] = {}
            rest: list[int] = []
            for n, (event_id, _, _) in enumerate(items):
                if event_id in made:
                    made.discard(event_id)  # a later claim of it in this batch finds it taken
                    claims[n] = Claim(ClaimKind.NEW)
                else:
                    rest.append(n)
            # The rows that were there already are locked one by one: in event id order, as
            # every batch does, or two batches over the same events in other orders would
            # deadlock (and fail whole). Stable: two claims of one event keep their order.
            for n in sorted(rest, key=lambda n: items[n][0]):
                claims[n] = await self._claim_row(*items[n])
            return [claims[n] for n in range(len(items))]

    async def _claim_row(self, event_id: str, owner: str, retry_deferred: bool) -> Claim:
        row = None
        while row is None:
            cur = await self._conn.execute(_PG_CLAIM, (event_id, owner))
            if cur.rowcount:
                return Claim(ClaimKind.NEW)
            cur = await self._conn.execute(_PG_CLAIMED, (event_id,))
            # None: a purge deleted the row in between; the event is new again.
            row = await cur.fetchone()
        claim = self._decide(_entry(row), owner, retry_deferred, float(row[-1]))
        if claim.kind is ClaimKind.RETRY:
            await self._conn.execute(_PG_RETAKE, (owner, event_id))
        elif claim.kind is ClaimKind.NEW:  # a row that sent nothing, taken from the start
            await self._conn.execute(_PG_RESTART, (owner, event_id))
        return claim

    async def _finish_many(self, items: Sequence[tuple[str, str, str]]) -> list[None]:
        # One row may take one change per statement: an event finished twice in a batch
        # keeps its last outcome, as one after the other would.
        last = {event_id: (outcome, reason) for event_id, outcome, reason in items}
        async with self._lock:
            await self._conn.execute(
                _PG_FINISH_MANY,
                (list(last), [o for o, _ in last.values()], [r for _, r in last.values()]),
            )
        return [None] * len(items)

    async def mark_published(self, marks: Sequence[tuple[str, int]]) -> None:
        """Record that these attempts' status events were acknowledged."""
        if marks:
            async with self._lock:
                await self._conn.execute(
                    _PG_MARK, ([event_id for event_id, _ in marks], [a for _, a in marks])
                )

    async def get(self, event_id: str) -> LedgerEntry | None:
        """The row of an event, if any."""
        async with self._lock:
            cur = await self._conn.execute(
                f"SELECT {_COLUMNS} FROM send_ledger WHERE event_id = %s",  # noqa: S608
                (event_id,),
            )
            row = await cur.fetchone()
        return _entry(row) if row else None

    async def renew(self, event_ids: Sequence[str], owner: str) -> None:
        """Renew `owner`'s claims of these events."""
        if event_ids:
            async with self._lock:
                await self._conn.execute(_PG_RENEW, (list(event_ids), owner, owner + AGAIN))

    async def purge(self, before: float, unmarked_before: float, limit: int = PURGE_BATCH) -> int:
        """Forget up to `limit` events settled long enough ago."""
        async with self._lock:
            cur = await self._conn.execute(_PG_PURGE, (before, unmarked_before, limit))
            return int(cur.rowcount)

    async def clock_offset(self) -> float:
        """The server's clock minus this process's, from the quickest of a few round trips
        (a reconnection or a stalled loop would put seconds of error into one)."""
        samples: list[tuple[float, float]] = []
        async with self._lock:
            for _ in range(CLOCK_SAMPLES):
                sent = time.time()
                cur = await self._conn.execute("SELECT extract(epoch from clock_timestamp())")
                row = await cur.fetchone()
                received = time.time()
                samples.append((received - sent, float(row[0]) - (sent + received) / 2))
        return min(samples)[1]

    async def close(self) -> None:
        """Close the connection."""
        await self._conn.close()


async def open_ledger(url: str) -> SendLedger:
    """Open the ledger named by a URL (`eobblast.state.sqlite.open_store`)."""
    return await open_store(url, "ledger", SqliteLedger, PostgresLedger.connect)

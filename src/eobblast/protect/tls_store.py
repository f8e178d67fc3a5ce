"""What the workers learn of receivers' TLS, shared between them and kept across restarts.

Each worker keeps a `TlsCache`: verified handshakes make a domain TLS-required, failures make
it portal-only for a while. Without sharing, every worker learns each domain on its own and a
restart forgets everything, so after a deploy members of domains learned as TLS-capable get
portal notices again until each worker has seen a verified handshake. `TlsSync` writes a
worker's new observations to a table beside the send ledger (same database: one SQLite file
per machine, or PostgreSQL across machines) and reads the others' back, every few seconds.

Timestamps only ever move forward (the latest observation wins, as in `TlsCache`), so the
order in which workers write does not matter. Domain names stay out of the logs.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from eobblast.protect.policy import TlsCache, TlsRecord
from eobblast.state.postgres import PURGE_ANSWER_WAIT, connect_postgres
from eobblast.state.sqlite import open_sqlite, open_store, write_transaction

log = logging.getLogger("eobblast.protect.tls")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tls_knowledge (
    domain TEXT PRIMARY KEY,
    verified_at DOUBLE PRECISION,
    failed_at DOUBLE PRECISION,
    version DOUBLE PRECISION NOT NULL
)
"""
_INDEX = "CREATE INDEX IF NOT EXISTS tls_knowledge_version ON tls_knowledge (version)"
_SCHEMA_LOCK = 0x0E0B_715C
# PostgreSQL stamps rows with its own clock at write time; a transaction that commits later
# than this after its stamp is still found by the periodic full read.
_PG_OVERLAP_SECONDS = 30.0
# Every this many rounds a worker reads the whole table and the expired rows are deleted.
FULL_READ_EVERY = 60


def _epoch(when: dt.datetime | None) -> float | None:
    return None if when is None else when.timestamp()


def _when(epoch: float | None) -> dt.datetime | None:
    return None if epoch is None else dt.datetime.fromtimestamp(epoch, dt.UTC)


def _rows(records: Sequence[TlsRecord]) -> list[tuple[str, float | None, float | None]]:
    return [(r.domain, _epoch(r.last_verified_at), _epoch(r.last_failed_at)) for r in records]


def _records(rows: Sequence[Sequence[Any]]) -> list[TlsRecord]:
    return [TlsRecord(str(row[0]), _when(row[1]), _when(row[2])) for row in rows]


class TlsStore(abc.ABC):
    """The shared table of TLS observations.

    Rows carry a version the database assigns when they are written; `changed` takes the
    position a reader reached (None: from the start) and returns what was written since
    and the new position. Writers' clocks play no part.
    """

    @abc.abstractmethod
    async def merge(self, records: Sequence[TlsRecord]) -> None:
        """Add observations, keeping each domain's latest verified and failed times."""

    @abc.abstractmethod
    async def changed(self, position: float | None) -> tuple[list[TlsRecord], float | None]:
        """Rows written after `position` (every row for None), and the position reached."""

    @abc.abstractmethod
    async def purge(self, verified_before: float, failed_before: float) -> int:
        """Delete rows whose observations are all older than these (epoch seconds)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close the connection."""


_SQLITE_MERGE = (
    "INSERT INTO tls_knowledge (domain, verified_at, failed_at, version) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (domain) DO UPDATE SET"
    # SQLite's MAX() of a NULL is NULL: COALESCE keeps whichever side is known.
    " verified_at = MAX(COALESCE(excluded.verified_at, verified_at),"
    " COALESCE(verified_at, excluded.verified_at)),"
    " failed_at = MAX(COALESCE(excluded.failed_at, failed_at),"
    " COALESCE(failed_at, excluded.failed_at)),"
    " version = excluded.version"
)


class SqliteTlsStore(TlsStore):
    """The table in the ledger's SQLite file."""

    def __init__(self, path: Path) -> None:
        self._db = open_sqlite(path, (_SCHEMA, _INDEX))

    async def merge(self, records: Sequence[TlsRecord]) -> None:
        """Add observations, keeping each domain's latest verified and failed times."""

        def work() -> None:
            # Writers take turns (BEGIN IMMEDIATE): the next version follows commit order,
            # so a reader that has seen version N has seen everything before it.
            (version,) = self._db.execute(
                "SELECT COALESCE(MAX(version), 0) + 1 FROM tls_knowledge"
            ).fetchone()
            self._db.executemany(_SQLITE_MERGE, [(*row, version) for row in _rows(records)])

        await write_transaction(self._db, work)

    async def changed(self, position: float | None) -> tuple[list[TlsRecord], float | None]:
        """Rows written after `position` (every row for None), and the position reached."""
        rows = self._db.execute(
            "SELECT domain, verified_at, failed_at, version FROM tls_knowledge WHERE version > ?",
            (-1.0 if position is None else position,),
        ).fetchall()
        reached = max((float(row[3]) for row in rows), default=position)
        return _records(rows), reached

    async def purge(self, verified_before: float, failed_before: float) -> int:
        """Delete rows whose observations are all older than these (epoch seconds)."""
        sql = (
            "DELETE FROM tls_knowledge WHERE (verified_at IS NULL OR verified_at < ?)"
            " AND (failed_at IS NULL OR failed_at < ?)"
        )
        return await write_transaction(
            self._db, lambda: self._db.execute(sql, (verified_before, failed_before)).rowcount
        )

    async def close(self) -> None:
        """Close the connection."""
        self._db.close()


class PostgresTlsStore(TlsStore):
    """The table in the ledger's PostgreSQL database, for workers that span machines."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self._lock = asyncio.Lock()

    @classmethod
    async def connect(cls, dsn: str) -> PostgresTlsStore:
        """Connect and create the table if needed."""
        conn = await connect_postgres(dsn, "TLS knowledge table", _SCHEMA_LOCK, (_SCHEMA, _INDEX))
        return cls(conn)

    async def merge(self, records: Sequence[TlsRecord]) -> None:
        """Add observations, keeping each domain's latest verified and failed times."""
        async with self._lock, self._conn.transaction(), self._conn.cursor() as cursor:
            # The server's clock stamps the rows (one clock for every worker); GREATEST
            # ignores NULLs.
            await cursor.executemany(
                "INSERT INTO tls_knowledge (domain, verified_at, failed_at, version)"
                " VALUES (%s, %s, %s, EXTRACT(EPOCH FROM clock_timestamp()))"
                " ON CONFLICT (domain) DO UPDATE SET"
                " verified_at = GREATEST(tls_knowledge.verified_at, excluded.verified_at),"
                " failed_at = GREATEST(tls_knowledge.failed_at, excluded.failed_at),"
                " version = excluded.version",
                _rows(records),
            )

    async def changed(self, position: float | None) -> tuple[list[TlsRecord], float | None]:
        """Rows written after `position` (every row for None), and the position reached.

        Stamps come before commits: rows are read from a while before the position, so a
        transaction that committed a little late is still seen."""
        since = -1.0 if position is None else position - _PG_OVERLAP_SECONDS
        async with self._lock:
            cursor = await self._conn.execute(
                "SELECT domain, verified_at, failed_at, version FROM tls_knowledge"
                " WHERE version > %s",
                (since,),
            )
            rows = await cursor.fetchall()
        reached = max((float(row[3]) for row in rows), default=position)
        return _records(rows), reached

    async def purge(self, verified_before: float, failed_before: float) -> int:
        """Delete rows whose observations are all older than these (epoch seconds)."""
        async with self._lock:
            cursor = await self._conn.execute(
                "DELETE FROM tls_knowledge WHERE (verified_at IS NULL OR verified_at < %s)"
                " AND (failed_at IS NULL OR failed_at < %s)",
                (verified_before, failed_before),
                answer_within=PURGE_ANSWER_WAIT,
            )
            return int(cursor.rowcount)

    async def close(self) -> None:
        """Close the connection."""
        await self._conn.close()


async def open_tls_store(url: str) -> TlsStore:
    """The TLS table in the database a ledger URL names (`open_store`)."""
    return await open_store(url, "ledger (TLS knowledge)", SqliteTlsStore, PostgresTlsStore.connect)


class TlsSync:
    """Keeps one worker's `TlsCache` and the shared table in step."""

    def __init__(
        self,
        cache: TlsCache,
        store: TlsStore,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cache = cache
        self.store = store
        self._clock = clock
        self._position: float | None = None  # how far this worker has read the table
        self._rounds = 0

    async def sync(self) -> None:
        """Write this worker's new observations, read everyone's, drop expired ones.

        A round that fails is logged by error type (no domain names) and its observations
        wait for the next: this worker still decides with what it knows.
        """
        now = self._clock()
        full = self._rounds % FULL_READ_EVERY == 0
        self._rounds += 1
        written = self.cache.take_unsaved()
        try:
            if written:
                await self.store.merge(written)
            records, position = await self.store.changed(None if full else self._position)
            if full:
                await self.store.purge(
                    now - self.cache.verified_ttl.total_seconds(),
                    now - self.cache.failure_ttl.total_seconds(),
                )
        except BaseException as exc:
            self.cache.unsaved(written)
            if not isinstance(exc, Exception):
                raise  # cancelled: the observations are back for a last round
            log.warning("TLS knowledge not synced: %s", type(exc).__name__)
        else:
            for record in records:
                self.cache.merge(record)
            self._position = position
        finally:
            self.cache.prune(dt.datetime.fromtimestamp(now, dt.UTC))

    async def run(self, stop: asyncio.Event, every: float) -> None:
        """Sync every `every` seconds until `stop` is set."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(every):
                    await stop.wait()
            if not stop.is_set():
                await self.sync()

    async def close(self) -> None:
        """A last sync (what this worker learned outlives it), then close the store."""
        try:
            await self.sync()
        finally:
            await self.store.close()


__all__ = [
    "PostgresTlsStore",
    "SqliteTlsStore",
    "TlsStore",
    "TlsSync",
    "open_tls_store",
]

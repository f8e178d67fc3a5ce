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
from eobblast.state.postgres import connect_postgres
from eobblast.state.sqlite import open_sqlite, open_store, write_transaction

log = logging.getLogger("eobblast.protect.tls")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tls_knowledge (
    domain TEXT PRIMARY KEY,
    verified_at DOUBLE PRECISION,
    failed_at DOUBLE PRECISION,
    changed_at DOUBLE PRECISION NOT NULL
)
"""
_INDEX = "CREATE INDEX IF NOT EXISTS tls_knowledge_changed ON tls_knowledge (changed_at)"
_SCHEMA_LOCK = 0x0E0B_715C
# Rows are read back from a little before the last one seen: writers' clocks and
# transactions that commit out of order must not hide a row.
_OVERLAP_SECONDS = 30.0


def _epoch(when: dt.datetime | None) -> float | None:
    return None if when is None else when.timestamp()


def _when(epoch: float | None) -> dt.datetime | None:
    return None if epoch is None else dt.datetime.fromtimestamp(epoch, dt.UTC)


def _record(row: Sequence[Any]) -> TlsRecord:
    return TlsRecord(str(row[0]), _when(row[1]), _when(row[2]))


class TlsStore(abc.ABC):
    """The shared table of TLS observations."""

    @abc.abstractmethod
    async def merge(self, records: Sequence[TlsRecord], now: float) -> None:
        """Add observations, keeping each domain's latest verified and failed times."""

    @abc.abstractmethod
    async def changed_since(self, since: float) -> list[tuple[TlsRecord, float]]:
        """Rows written at or after `since` (epoch seconds), with when they were written."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close the connection."""


class SqliteTlsStore(TlsStore):
    """The table in the ledger's SQLite file."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = open_sqlite(path, (_SCHEMA, _INDEX))

    async def merge(self, records: Sequence[TlsRecord], now: float) -> None:
        """Add observations, keeping each domain's latest verified and failed times."""
        rows = [
            (r.domain, _epoch(r.last_verified_at), _epoch(r.last_failed_at), now) for r in records
        ]

        def work() -> None:
            # SQLite's MAX() of a NULL is NULL: COALESCE keeps whichever side is known.
            self._db.executemany(
                "INSERT INTO tls_knowledge (domain, verified_at, failed_at, changed_at)"
                " VALUES (?, ?, ?, ?) ON CONFLICT (domain) DO UPDATE SET"
                " verified_at = MAX(COALESCE(excluded.verified_at, verified_at),"
                " COALESCE(verified_at, excluded.verified_at)),"
                " failed_at = MAX(COALESCE(excluded.failed_at, failed_at),"
                " COALESCE(failed_at, excluded.failed_at)),"
                " changed_at = excluded.changed_at",
                rows,
            )

        write_transaction(self._db, work)

    async def changed_since(self, since: float) -> list[tuple[TlsRecord, float]]:
        """Rows written at or after `since` (epoch seconds), with when they were written."""
        cursor = self._db.execute(
            "SELECT domain, verified_at, failed_at, changed_at FROM tls_knowledge"
            " WHERE changed_at >= ?",
            (since,),
        )
        return [(_record(row), float(row[3])) for row in cursor.fetchall()]

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

    async def merge(self, records: Sequence[TlsRecord], now: float) -> None:
        """Add observations, keeping each domain's latest verified and failed times."""
        rows = [
            (r.domain, _epoch(r.last_verified_at), _epoch(r.last_failed_at), now) for r in records
        ]
        async with self._lock, self._conn.transaction(), self._conn.cursor() as cursor:
            # GREATEST ignores NULLs.
            await cursor.executemany(
                "INSERT INTO tls_knowledge (domain, verified_at, failed_at, changed_at)"
                " VALUES (%s, %s, %s, %s) ON CONFLICT (domain) DO UPDATE SET"
                " verified_at = GREATEST(tls_knowledge.verified_at, excluded.verified_at),"
                " failed_at = GREATEST(tls_knowledge.failed_at, excluded.failed_at),"
                " changed_at = excluded.changed_at",
                rows,
            )

    async def changed_since(self, since: float) -> list[tuple[TlsRecord, float]]:
        """Rows written at or after `since` (epoch seconds), with when they were written."""
        async with self._lock:
            cursor = await self._conn.execute(
                "SELECT domain, verified_at, failed_at, changed_at FROM tls_knowledge"
                " WHERE changed_at >= %s",
                (since,),
            )
            return [(_record(row), float(row[3])) for row in await cursor.fetchall()]

    async def close(self) -> None:
        """Close the connection."""
        await self._conn.close()


async def open_tls_store(url: str) -> TlsStore:
    """The TLS table in the database a ledger URL names (`open_store`)."""
    return await open_store(url, "ledger", SqliteTlsStore, PostgresTlsStore.connect)


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
        self._seen = 0.0  # the latest changed_at read back

    async def sync(self) -> None:
        """Write this worker's new observations, read everyone's, drop expired ones."""
        now = self._clock()
        written = self.cache.take_unsaved()
        try:
            if written:
                await self.store.merge(written, now)
            rows = await self.store.changed_since(self._seen - _OVERLAP_SECONDS)
        except Exception as exc:
            # Not fatal: this worker still decides with what it knows; the next round retries.
            self.cache.unsaved(written)
            log.warning("TLS knowledge not synced: %s", type(exc).__name__)
            return
        for record, changed_at in rows:
            self.cache.merge(record)
            self._seen = max(self._seen, changed_at)
        self.cache.prune(dt.datetime.fromtimestamp(now, dt.UTC))

    async def run(self, stop: asyncio.Event, every: float) -> None:
        """Sync every `every` seconds until `stop` is set."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(every):
                    await stop.wait()
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

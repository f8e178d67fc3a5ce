"""Fetched MTA-STS policies, kept beside the send ledger: shared by workers, kept across restarts.

RFC 8461 section 5.1 expects a sender to keep a policy until its max_age runs out and to
use it when a refresh fails. Kept in a worker's memory only, a policy is lost at every
restart (and unknown to every other worker): whoever can block the TXT lookup or the
HTTPS fetch at that moment strips the domain's `enforce` protection until a fetch
succeeds. The table lives in the ledger's database (one SQLite file per machine, or
PostgreSQL across machines), as `tls_knowledge` does.

Expiry is kept on the wall clock (epoch seconds), the only clock processes share;
`StoredPolicy.cached` turns it back into a monotonic one. Domains are keyed by their
normalised A-label form. Domain names stay out of the logs.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from eobblast.protect.mta_sts import StoredPolicy, policy_from_columns
from eobblast.state.postgres import connect_postgres
from eobblast.state.sqlite import open_sqlite, open_store, write_transaction

__all__ = [
    "ANSWER_WAIT",
    "PostgresStsStore",
    "SqliteStsStore",
    "StsStore",
    "open_sts_store",
]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS mta_sts_policies (
    domain TEXT PRIMARY KEY,
    policy_id TEXT NOT NULL,
    mode TEXT NOT NULL,
    mx TEXT NOT NULL,
    max_age BIGINT NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL
)
"""
_INDEX = "CREATE INDEX IF NOT EXISTS mta_sts_policies_expires ON mta_sts_policies (expires_at)"
_SCHEMA_LOCK = 0x0E0B_575F
#: How long a PostgreSQL call may take before the connection is given up (StoreNotAnswering):
#: a message to a domain waits for it. Never cancelled from outside instead (a cancelled
#: psycopg call waits for the server's answer to the cancel, which a frozen path never gives).
ANSWER_WAIT = 5.0


def _row(stored: StoredPolicy) -> tuple[str, str, str, str, int, float]:
    policy = stored.policy
    mx = " ".join(policy.mx)
    return (stored.domain, stored.id, str(policy.mode), mx, policy.max_age, stored.expires_at)


def _stored(row: Sequence[Any] | None) -> StoredPolicy | None:
    if row is None:
        return None
    policy = policy_from_columns(str(row[2]), int(row[4]), str(row[3]))
    if policy is None:
        return None  # not a policy we would have written: as if there were none
    return StoredPolicy(str(row[0]), str(row[1]), policy, float(row[5]))


class StsStore(abc.ABC):
    """The shared table of fetched policies, one row per domain, the latest write winning."""

    @abc.abstractmethod
    async def load(self, domain: str) -> StoredPolicy | None:
        """The domain's stored policy (expired or not), None if there is none."""

    @abc.abstractmethod
    async def save(self, stored: StoredPolicy) -> None:
        """Keep a fetched policy in place of the domain's earlier one."""

    @abc.abstractmethod
    async def purge(self, expired_before: float) -> int:
        """Delete the policies that expired before this time (epoch seconds)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close the connection."""


_SELECT = (
    "SELECT domain, policy_id, mode, mx, max_age, expires_at FROM mta_sts_policies WHERE domain = ?"
)
_UPSERT = (
    "INSERT INTO mta_sts_policies (domain, policy_id, mode, mx, max_age, expires_at)"
    " VALUES (?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (domain) DO UPDATE SET policy_id = excluded.policy_id,"
    " mode = excluded.mode, mx = excluded.mx, max_age = excluded.max_age,"
    " expires_at = excluded.expires_at"
)


class SqliteStsStore(StsStore):
    """The table in the ledger's SQLite file."""

    def __init__(self, path: Path) -> None:
        self._db = open_sqlite(path, (_SCHEMA, _INDEX))

    async def load(self, domain: str) -> StoredPolicy | None:
        """The domain's stored policy (expired or not), None if there is none."""
        return _stored(self._db.execute(_SELECT, (domain,)).fetchone())

    async def save(self, stored: StoredPolicy) -> None:
        """Keep a fetched policy in place of the domain's earlier one."""
        await write_transaction(self._db, lambda: self._db.execute(_UPSERT, _row(stored)))

    async def purge(self, expired_before: float) -> int:
        """Delete the policies that expired before this time (epoch seconds)."""
        sql = "DELETE FROM mta_sts_policies WHERE expires_at < ?"
        return await write_transaction(
            self._db, lambda: self._db.execute(sql, (expired_before,)).rowcount
        )

    async def close(self) -> None:
        """Close the connection."""
        self._db.close()


class PostgresStsStore(StsStore):
    """The table in the ledger's PostgreSQL database, for workers that span machines."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self._lock = asyncio.Lock()

    @classmethod
    async def connect(cls, dsn: str) -> PostgresStsStore:
        """Connect and create the table if needed."""
        conn = await connect_postgres(
            dsn, "MTA-STS policy table", _SCHEMA_LOCK, (_SCHEMA, _INDEX), answer_wait=ANSWER_WAIT
        )
        return cls(conn)

    async def load(self, domain: str) -> StoredPolicy | None:
        """The domain's stored policy (expired or not), None if there is none."""
        async with self._lock:
            cursor = await self._conn.execute(_SELECT.replace("?", "%s"), (domain,))
            return _stored(await cursor.fetchone())

    async def save(self, stored: StoredPolicy) -> None:
        """Keep a fetched policy in place of the domain's earlier one."""
        async with self._lock:
            await self._conn.execute(_UPSERT.replace("?", "%s"), _row(stored))

    async def purge(self, expired_before: float) -> int:
        """Delete the policies that expired before this time (epoch seconds)."""
        async with self._lock:
            cursor = await self._conn.execute(
                "DELETE FROM mta_sts_policies WHERE expires_at < %s",
                (expired_before,),
            )
            return int(cursor.rowcount)

    async def close(self) -> None:
        """Close the connection."""
        await self._conn.close()


async def open_sts_store(url: str) -> StsStore:
    """The MTA-STS policy table in the database a ledger URL names (`open_store`)."""
    return await open_store(
        url, "ledger (MTA-STS policies)", SqliteStsStore, PostgresStsStore.connect
    )

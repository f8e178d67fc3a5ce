"""PostgreSQL helpers shared by the stores that span machines."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Iterable
from typing import Any

from eobblast.errors import ConfigError


async def connect_postgres(
    dsn: str, what: str, schema_lock: int, schema: Iterable[str]
) -> PgConnection:
    """A store's autocommit connection with its schema created.

    Workers starting together would race on `CREATE ... IF NOT EXISTS`: a transaction-level
    advisory lock (one id per store) serialises them. A failed connection is a ConfigError
    naming the store, never the DSN (it may carry a password).
    """
    import psycopg

    try:
        conn = await _connect(dsn, what)
    except psycopg.OperationalError:
        raise ConfigError(f"cannot connect to the PostgreSQL {what}") from None
    except (psycopg.Error, ValueError):
        # A URL psycopg cannot parse: its message quotes the URL, password included.
        raise ConfigError(f"the PostgreSQL {what} url cannot be read") from None
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (schema_lock,))
        for statement in schema:
            index = _NEW_INDEX.match(statement)
            if index is not None:
                # CREATE INDEX IF NOT EXISTS locks the table against writes even when the
                # index is there: a starting worker would wait behind every open write, and
                # every other worker's writes behind it.
                cur = await conn.execute("SELECT to_regclass(%s)", (index.group(1),))
                row = await cur.fetchone()
                if row is not None and row[0] is not None:
                    continue
            await conn.execute(statement)
    return PgConnection(conn, dsn, what)


_NEW_INDEX = re.compile(r"\s*CREATE\s+(?:UNIQUE\s+)?INDEX\s+IF\s+NOT\s+EXISTS\s+(\w+)", re.I)


async def _connect(dsn: str, what: str) -> Any:
    import psycopg

    # The store's name shows in pg_stat_activity: which of eobblast's connections is which.
    return await psycopg.AsyncConnection.connect(
        dsn, autocommit=True, connect_timeout=10, application_name=f"eobblast {what}"
    )


class PgConnection:
    """A store's connection that comes back after the server or the network dropped it.

    The statement that finds it dropped fails (its caller tries again, as for any store
    outage); the next use outside a transaction opens a new connection first. Inside a
    transaction it never reconnects: what followed would not be part of it.
    """

    def __init__(self, conn: Any, dsn: str, what: str) -> None:
        self._conn = conn
        self._dsn = dsn
        self._what = what
        self._depth = 0
        self._closed = False
        self._reconnecting = asyncio.Lock()

    async def _ready(self) -> None:
        if self._depth or self._closed or not (self._conn.broken or self._conn.closed):
            return
        async with self._reconnecting:
            if self._conn.broken or self._conn.closed:
                with contextlib.suppress(Exception):
                    await self._conn.close()
                self._conn = await _connect(self._dsn, self._what)

    async def execute(self, *args: Any, **kwargs: Any) -> Any:
        """`AsyncConnection.execute`, on a live connection."""
        await self._ready()
        return await self._conn.execute(*args, **kwargs)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Any]:
        """`AsyncConnection.transaction`, begun on a live connection."""
        await self._ready()
        self._depth += 1
        try:
            async with self._conn.transaction() as tx:
                yield tx
        finally:
            self._depth -= 1

    def cursor(self, *args: Any, **kwargs: Any) -> Any:
        """`AsyncConnection.cursor` (used inside a transaction, which readied the connection)."""
        return self._conn.cursor(*args, **kwargs)

    async def close(self) -> None:
        """Close for good: no reconnecting after this."""
        self._closed = True
        await self._conn.close()

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
    advisory lock (one id per store) serialises them. An index the store lacks (a new
    release's, on a table an earlier one filled) is built afterwards, CONCURRENTLY: a plain
    CREATE INDEX would stop every worker's writes to the table until it is built. A failed
    connection is a ConfigError naming the store, never the DSN (it may carry a password).
    """
    import psycopg

    try:
        conn = await _connect(dsn, what)
    except psycopg.OperationalError:
        raise ConfigError(f"cannot connect to the PostgreSQL {what}") from None
    except (psycopg.Error, ValueError):
        # A URL psycopg cannot parse: its message quotes the URL, password included.
        raise ConfigError(f"the PostgreSQL {what} url cannot be read") from None
    missing: list[tuple[str, str]] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (schema_lock,))
        for statement in schema:
            index = _NEW_INDEX.match(statement)
            if index is not None:
                # CREATE INDEX IF NOT EXISTS locks the table against writes even when the
                # index is there: a starting worker would wait behind every open write, and
                # every other worker's writes behind it.
                if await _index_valid(conn, index.group(1)) is not True:
                    missing.append((index.group(1), statement))
                continue
            await conn.execute(statement)
    for name, statement in missing:
        await _build_concurrently(conn, name, statement, schema_lock + _BUILD_LOCK_OFFSET)
    return PgConnection(conn, dsn, what)


# Non-unique indexes only: a unique one may back an ON CONFLICT, needed before any write.
_NEW_INDEX = re.compile(r"\s*CREATE\s+INDEX\s+IF\s+NOT\s+EXISTS\s+(\w+)", re.I)
# The lock of an index build, apart from the schema lock: a worker waiting on the schema
# lock in its transaction must not be one the build waits for (CREATE INDEX CONCURRENTLY
# waits for older transactions), or the two would deadlock.
_BUILD_LOCK_OFFSET = 0x100
_CREATE_INDEX = re.compile(r"^\s*CREATE\s+INDEX", re.I)


async def _index_valid(conn: Any, name: str) -> bool | None:
    """Whether the index is there and usable (None: not there; False: a build that died)."""
    cur = await conn.execute(
        "SELECT i.indisvalid FROM pg_index i WHERE i.indexrelid = to_regclass(%s)", (name,)
    )
    row = await cur.fetchone()
    return None if row is None else bool(row[0])


async def _build_concurrently(conn: Any, name: str, statement: str, build_lock: int) -> None:
    """Build an index without stopping writes to its table (CREATE INDEX CONCURRENTLY).

    One worker builds; the others start without waiting (the index speeds queries up, none
    needs it). An index left invalid by a build that died is dropped and built again, by
    whoever holds the build lock: never one another worker is still building.
    """
    from psycopg import sql

    cur = await conn.execute("SELECT pg_try_advisory_lock(%s)", (build_lock,))
    row = await cur.fetchone()
    if row is None or not row[0]:
        return  # another worker is building it
    try:
        state = await _index_valid(conn, name)
        if state is True:
            return
        if state is False:
            await conn.execute(
                sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(sql.Identifier(name))
            )
        await conn.execute(_CREATE_INDEX.sub("CREATE INDEX CONCURRENTLY", statement, count=1))
    finally:
        await conn.execute("SELECT pg_advisory_unlock(%s)", (build_lock,))


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

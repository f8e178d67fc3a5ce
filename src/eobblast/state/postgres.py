"""PostgreSQL helpers shared by the stores that span machines."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from eobblast.errors import ConfigError


async def connect_postgres(dsn: str, what: str, schema_lock: int, schema: Iterable[str]) -> Any:
    """A store's autocommit connection with its schema created.

    Workers starting together would race on `CREATE ... IF NOT EXISTS`: a transaction-level
    advisory lock (one id per store) serialises them. A failed connection is a ConfigError
    naming the store, never the DSN (it may carry a password).
    """
    import psycopg

    try:
        conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True, connect_timeout=10)
    except psycopg.OperationalError:
        raise ConfigError(f"cannot connect to the PostgreSQL {what}") from None
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (schema_lock,))
        for statement in schema:
            await conn.execute(statement)
    return conn

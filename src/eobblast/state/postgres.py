"""PostgreSQL helpers shared by the stores that span machines."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from typing import Any

from eobblast.errors import ConfigError, StoreNotAnswering

log = logging.getLogger("eobblast.state")


def libpq_reason(exc: BaseException, dsn: str) -> str:
    """What libpq said of a failed connection, for an operator: its first line (which host,
    port, user or database, and why). libpq never quotes the password; should the line
    hold it all the same, none of the line is shown (masking it would also mask a user or
    host name that happens to contain it, and so tell the password)."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    said = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    try:
        password = str(conninfo_to_dict(dsn).get("password") or "")
    except (psycopg.ProgrammingError, ValueError):  # unreadable: show nothing of what was said
        return type(exc).__name__
    if password and password in said:
        return f"{type(exc).__name__} (its message is not shown: it holds the password)"
    return said


async def connect_postgres(
    dsn: str,
    what: str,
    schema_lock: int,
    schema: Iterable[str],
    *,
    answer_wait: float | None = None,
) -> PgConnection:
    """A store's autocommit connection with its schema created; its calls bounded by
    `answer_wait` s (ANSWER_WAIT if None), its schema set-up by SET_UP_ANSWER_WAIT.

    Workers starting together would race on `CREATE ... IF NOT EXISTS`: a transaction-level
    advisory lock (one id per store) serialises them. A failed connection is a ConfigError
    naming the store, never the DSN (it may carry a password).

    An index a new release adds to a table an earlier one filled is built in the
    background, CONCURRENTLY (`_upgrade_indexes`), and an old index it replaces is dropped
    only once the new ones are valid: inside the schema transaction either would take a
    lock that stops every worker's writes to the table until it is done. Indexes of a
    table this transaction creates are made with it (it is empty). A trigger is created
    only when missing or disabled: CREATE OR REPLACE TRIGGER would lock its table at every
    start. A column a new release adds (`ALTER TABLE t ADD COLUMN IF NOT EXISTS c ...`,
    nullable, no default: no row is rewritten) is added only when missing, for the same
    reason: the ALTER takes its table's strongest lock before it looks.
    """
    import psycopg

    try:
        conn = await _connect(dsn, what)
    except psycopg.OperationalError as exc:
        said = libpq_reason(exc, dsn)
        raise ConfigError(f"cannot connect to the PostgreSQL {what}: {said}") from None
    except (psycopg.Error, ValueError):
        # A URL psycopg cannot parse: its message quotes the URL, password included.
        raise ConfigError(f"the PostgreSQL {what} url cannot be read") from None
    try:
        builds, drops = await _set_up(conn, what, schema_lock, schema)
    except BaseException:
        # Not left open behind a failed start (a frozen path, a lock it waited too long for).
        with contextlib.suppress(Exception):
            await conn.close()
        raise
    upgrading = _upgrade_indexes(dsn, what, builds, drops) if builds or drops else None
    return PgConnection(conn, dsn, what, upgrading, answer_wait=answer_wait)


async def _set_up(
    conn: Any, what: str, schema_lock: int, schema: Iterable[str]
) -> tuple[list[tuple[str, str]], list[str]]:
    """Create the store's schema (`connect_postgres`); returns the index builds and drops
    left for the background."""
    statements = list(schema)
    builds: list[tuple[str, str]] = []  # (index, its CREATE INDEX), for the background
    drops: list[str] = []
    # Bounded as its calls are later, though longer: it may wait for the schema lock while
    # other workers set theirs up, and for a table's lock to add a column.
    with _answered_within(SET_UP_ANSWER_WAIT, what, lambda: conn):
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (schema_lock,))
            # Which tables were there before: a table created here gets its indexes at once.
            tables = {
                index.group("table")
                for statement in statements
                if (index := _NEW_INDEX.match(statement)) is not None
            }
            existed = {table: await _exists(conn, table) for table in tables}
            for statement in statements:
                index = _NEW_INDEX.match(statement)
                dropped = _DROP_INDEX.match(statement)
                if index is not None:
                    name = index.group("name")
                    # CREATE INDEX IF NOT EXISTS locks the table against writes even when the
                    # index is there: a starting worker would wait behind every open write, and
                    # every other worker's writes behind it.
                    if index.group("unique") or not existed[index.group("table")]:
                        # Unique ones may back an ON CONFLICT: never left for later.
                        if not await _exists(conn, name):
                            await conn.execute(statement)
                    elif await _index_valid(conn, name) is not True:
                        builds.append((name, statement))
                elif dropped is not None:
                    if await _exists(conn, dropped.group(1)):
                        drops.append(dropped.group(1))
                elif (column := _ADD_COLUMN.match(statement)) is not None:
                    if not await _has_column(conn, column.group("table"), column.group("column")):
                        await _add_column(conn, what, statement)
                elif (trigger := _TRIGGER.match(statement)) is not None:
                    # CREATE OR REPLACE TRIGGER locks its table against writes, as a new index
                    # would: made once (a changed trigger takes a new name).
                    if not await _has_trigger(conn, trigger.group("name"), trigger.group("table")):
                        await conn.execute(statement)
                else:
                    await conn.execute(statement)
        # Only now: the schema transaction may wait longer for its locks (ADD COLUMN has its
        # own wait, the schema lock waits for the workers starting alongside).
        await store_session(conn)
    return builds, drops


# How long adding a column waits for its table's lock. Waiting behind a long read (an
# export), it would hold every other writer of the table behind itself meanwhile.
ADD_COLUMN_LOCK_WAIT = "5s"


async def _add_column(conn: Any, what: str, statement: str) -> None:
    import psycopg

    await conn.execute(f"SET LOCAL lock_timeout = '{ADD_COLUMN_LOCK_WAIT}'")
    try:
        await conn.execute(statement)
    except psycopg.errors.LockNotAvailable:
        raise ConfigError(
            f"the PostgreSQL {what}'s table is in use (a long query holds it): a new column"
            f" waited {ADD_COLUMN_LOCK_WAIT} for it, and is added at the next start"
        ) from None
    await conn.execute("SET LOCAL lock_timeout TO DEFAULT")


_NEW_INDEX = re.compile(
    r"\s*CREATE\s+(?P<unique>UNIQUE\s+)?INDEX\s+IF\s+NOT\s+EXISTS\s+(?P<name>\w+)"
    r"\s+ON\s+(?P<table>\w+)",
    re.I,
)
_ADD_COLUMN = re.compile(
    r"\s*ALTER\s+TABLE\s+(?P<table>\w+)\s+ADD\s+COLUMN\s+IF\s+NOT\s+EXISTS\s+(?P<column>\w+)\s",
    re.I,
)
_DROP_INDEX = re.compile(r"\s*DROP\s+INDEX\s+IF\s+EXISTS\s+(\w+)\s*$", re.I)
_CREATE_INDEX = re.compile(r"^\s*CREATE\s+INDEX", re.I)
_TRIGGER = re.compile(
    r"\s*CREATE\s+OR\s+REPLACE\s+TRIGGER\s+(?P<name>\w+)\s.*?\sON\s+(?P<table>\w+)(?:\s|$)",
    re.I | re.S,
)
# Two-key advisory locks (namespace, hashtext(schema.store)): one worker upgrades a store's
# indexes, one after another (two CONCURRENTLY builds on a table deadlock each other).
# Apart from the schema lock (a CONCURRENTLY build waits for older transactions, one of
# which may be a worker waiting for the schema lock) and from other schemas' stores.
_BUILD_LOCKS = 0x0E0B_1DE0
_TRY_BUILD_LOCK = "SELECT pg_try_advisory_lock(%s::int4, hashtext(current_schema() || '.' || %s))"
_BUILD_UNLOCK = "SELECT pg_advisory_unlock(%s::int4, hashtext(current_schema() || '.' || %s))"
# How often a worker whose store another worker is upgrading looks whether it still is (it
# takes over if that worker stopped half-way). Never a waiting lock call: its snapshot
# would be one the build waits for.
UPGRADE_POLL = 5.0
# How long a worker waits for another's upgrade before it leaves it to that worker.
UPGRADE_WAIT = 3600.0


# Names looked up in this store's own schema (the first of the search path), never another's.
_EXISTS = "SELECT to_regclass(format('%%I.%%I', current_schema(), %s::text)) IS NOT NULL"
_INDEX_VALID = (
    "SELECT i.indisvalid FROM pg_index i"
    " WHERE i.indexrelid = to_regclass(format('%%I.%%I', current_schema(), %s::text))"
)
_HAS_COLUMN = (
    "SELECT 1 FROM pg_attribute WHERE attname = %s AND NOT attisdropped"
    " AND attrelid = to_regclass(format('%%I.%%I', current_schema(), %s::text))"
)
_TRIGGER_ENABLED = (
    "SELECT tgenabled <> 'D' FROM pg_trigger WHERE tgname = %s"
    " AND tgrelid = to_regclass(format('%%I.%%I', current_schema(), %s::text))"
)


async def _exists(conn: Any, name: str) -> bool:
    cur = await conn.execute(_EXISTS, (name,))
    row = await cur.fetchone()
    return bool(row and row[0])


async def _has_column(conn: Any, table: str, column: str) -> bool:
    cur = await conn.execute(_HAS_COLUMN, (column, table))
    return await cur.fetchone() is not None


async def _has_trigger(conn: Any, name: str, table: str) -> bool:
    """Whether the trigger is there and enabled (one disabled by hand is made again)."""
    cur = await conn.execute(_TRIGGER_ENABLED, (name, table))
    row = await cur.fetchone()
    if row is not None and not row[0]:
        log.warning("a disabled trigger is enabled again", extra={"trigger": name})
    return bool(row and row[0])


async def _index_valid(conn: Any, name: str) -> bool | None:
    """Whether the index is there and usable (None: not there; False: a build that died)."""
    cur = await conn.execute(_INDEX_VALID, (name,))
    row = await cur.fetchone()
    return None if row is None else bool(row[0])


async def _upgrade_indexes(
    dsn: str, what: str, builds: Sequence[tuple[str, str]], drops: Sequence[str]
) -> None:
    """Build a new release's indexes CONCURRENTLY on a connection of their own, then drop
    the indexes they replace, while the store is in use.

    One worker does it (the store's build lock); the others look again every UPGRADE_POLL
    seconds, on a connection opened for each look, and finish what is left if that worker
    stopped, for up to UPGRADE_WAIT. Nothing here is needed for the store to be right, only
    fast: a build that fails is logged (a worker that takes over tries it once more, then
    the next start), and the old indexes stay until every new one is valid. Session-level
    advisory locks need a direct (or session-pooled) connection to PostgreSQL.
    """
    import psycopg

    deadline = time.monotonic() + UPGRADE_WAIT
    try:
        while True:
            conn = await _build_connection(dsn, what)
            cur = await conn.execute(_TRY_BUILD_LOCK, (_BUILD_LOCKS, what))
            row = await cur.fetchone()
            if row and row[0]:
                break
            await conn.close()
            if time.monotonic() > deadline:
                log.info("index upgrade left to the worker doing it", extra={"store": what})
                return
            await asyncio.sleep(UPGRADE_POLL * random.uniform(0.8, 1.2))
    except psycopg.Error as exc:
        log.warning("index upgrade not started: %s", type(exc).__name__, extra={"store": what})
        return
    try:
        await _upgrade_locked(conn, what, builds, drops)
        # Closing the connection releases the lock, should this fail.
        with contextlib.suppress(psycopg.Error):
            await conn.execute(_BUILD_UNLOCK, (_BUILD_LOCKS, what))
    except asyncio.CancelledError:
        # The store closed first: psycopg cancels the statement on the server (a build cut
        # short leaves an invalid index, built again at the next start).
        raise
    except Exception as exc:
        log.warning("index upgrade stopped: %s", type(exc).__name__, extra={"store": what})
    finally:
        with contextlib.suppress(Exception):
            await conn.close()


async def _build_connection(dsn: str, what: str) -> Any:
    """A connection for index builds: no statement or lock timeout (a large index would
    never finish under an operator's role limits), and a client that vanished is noticed
    (its session would otherwise hold the build lock for hours)."""
    conn = await _connect(dsn, f"{what} index build")
    await _settings(conn, ("SET statement_timeout = 0", "SET lock_timeout = 0", *_CLIENT_GONE))
    return conn


# The server notices a client that vanished (a worker's machine gone, a network cut):
# probes after a minute idle, and a look every 10 s while a statement of it runs.
_CLIENT_GONE = (
    "SET tcp_keepalives_idle = 60",
    "SET tcp_keepalives_interval = 10",
    "SET tcp_keepalives_count = 6",
    "SET client_connection_check_interval = '10s'",  # PostgreSQL 14 and later
)
# How long a store's session may sit in a transaction doing nothing before the server ends
# it (and rolls it back). eobblast's transactions wait for nothing but their own statements
# (the bounce service's run Python between them; publishing and auditing wait for the
# commit): one idle this long is a worker that is gone mid-batch, whose row and advisory
# locks held other workers' batches (for the OS's two hours of keepalive) until their
# leases lapsed and their events were sent twice.
IDLE_IN_TRANSACTION_TIMEOUT = "30s"
# How long a store's statement waits for a lock. Longer is a transaction that is stuck or
# gone: the statement fails (LockNotAvailable, a transient store error its caller tries
# again) rather than hold the store's connection, and every call queued behind it.
LOCK_TIMEOUT = "10s"


# How long a store call may take: one statement outside a transaction, or a transaction
# from BEGIN to COMMIT. TCP keepalives and tcp_user_timeout notice a path that is gone, not
# one frozen with TCP up (a hung connection pooler, a server process stopped: the far end's
# kernel acknowledges everything), and a server-side statement_timeout is kept by the very
# server that does not answer. Past this bound the client hangs up: the call fails with
# StoreNotAnswering (transient: tried again as any outage), and the next call opens a new
# connection. Far above what a call of a working store waits (LOCK_TIMEOUT for a lock), and
# under the workers' default `stuck_after`, so a frozen store is an error before a stuck
# attempt. The ledger's own bound is shorter: under its claims' lease (`open_ledger`).
ANSWER_WAIT = 60.0
# The bound of a store's schema set-up at start (connect_postgres).
SET_UP_ANSWER_WAIT = 120.0
# The bound of a purge that deletes in one statement: a backlog (a first purge after weeks,
# or after an outage) can be millions of rows, and failing it would only start it again.
PURGE_ANSWER_WAIT = 600.0


async def store_session(conn: Any) -> None:
    """Set a store connection's session up: how long it waits for locks, how long it may
    idle in a transaction, and how the server notices its client vanished."""
    await _settings(
        conn,
        (
            f"SET idle_in_transaction_session_timeout = '{IDLE_IN_TRANSACTION_TIMEOUT}'",
            f"SET lock_timeout = '{LOCK_TIMEOUT}'",
            *_CLIENT_GONE,
        ),
    )


async def _settings(conn: Any, settings: Iterable[str]) -> None:
    import psycopg

    for setting in settings:
        # A setting this server does not have yet (an older release) is done without.
        with contextlib.suppress(psycopg.errors.UndefinedObject):
            await conn.execute(setting)


async def _upgrade_locked(
    conn: Any, what: str, builds: Sequence[tuple[str, str]], drops: Sequence[str]
) -> None:
    """The upgrade, with the store's build lock held: each index still missing or invalid
    is built (another worker may have built some since), then the old ones dropped."""
    import psycopg

    complete = True
    for name, statement in builds:
        state = await _index_valid(conn, name)
        if state is True:
            continue
        try:
            if state is False:  # what a build cut short left
                await _drop_concurrently(conn, name)
            log.info("building an index concurrently", extra={"store": what, "index": name})
            await conn.execute(_CREATE_INDEX.sub("CREATE INDEX CONCURRENTLY", statement, count=1))
            log.info("index built", extra={"store": what, "index": name})
        except psycopg.Error as exc:
            log.warning(
                "index not built: %s", type(exc).__name__, extra={"store": what, "index": name}
            )
            complete = False
    # Valid now, here: a CREATE INDEX ... IF NOT EXISTS succeeds without building anything
    # when something else already has the name.
    for name, _ in builds:
        if await _index_valid(conn, name) is not True:
            complete = False
    for name in drops if complete else ():
        if await _exists(conn, name):
            log.info("dropping a replaced index", extra={"store": what, "index": name})
            await _drop_concurrently(conn, name)


async def _drop_concurrently(conn: Any, name: str) -> None:
    from psycopg import sql

    await conn.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(sql.Identifier(name)))


# libpq's TCP keepalives and user timeout: a connection whose server or network path is
# gone fails within about a minute, not the OS's two hours (or 15 minutes of retransmits):
# until then a batch waits on it, holding its store's connection and the calls behind it.
# A DSN that sets any of these keeps its own value.
CLIENT_KEEPALIVES: dict[str, int] = {
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
    "tcp_user_timeout": 30_000,  # ms unacknowledged before the connection is dropped
}


async def _connect(dsn: str, what: str) -> Any:
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    given = conninfo_to_dict(dsn)
    tcp: dict[str, Any] = {k: v for k, v in CLIENT_KEEPALIVES.items() if k not in given}
    # The store's name shows in pg_stat_activity: which of eobblast's connections is which.
    return await psycopg.AsyncConnection.connect(
        dsn, autocommit=True, connect_timeout=10, application_name=f"eobblast {what}", **tcp
    )


def _hang_up(conn: Any) -> None:
    """Shut a connection's socket down under libpq, which keeps it open: the call waiting on
    it wakes at once and fails as if the server had hung up (`broken` from then on).
    Cancelling that call instead would send the server a cancel request and wait for its
    answer: through a frozen path, for ever with some psycopg releases."""
    with contextlib.suppress(Exception):  # already closed: nothing to hang up on
        with socket.fromfd(conn.pgconn.socket, socket.AF_INET, socket.SOCK_STREAM) as dup:
            dup.shutdown(socket.SHUT_RDWR)


@contextlib.contextmanager
def _answered_within(seconds: float, what: str, conn_of: Callable[[], Any]) -> Iterator[float]:
    """The block within `seconds`, or the connection (`conn_of()` then) is hung up on and
    the block fails with StoreNotAnswering; gives the deadline (event-loop time)."""
    import psycopg

    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    timer = loop.call_at(deadline, lambda: _hang_up(conn_of()))
    try:
        yield deadline
    except (psycopg.OperationalError, psycopg.InterfaceError, TimeoutError) as exc:
        # Only the failures a hang-up (or a reconnect's own deadline) causes: a caller's
        # error after the deadline (a bug, a constraint) keeps its own type.
        if loop.time() >= deadline:
            raise StoreNotAnswering(f"the PostgreSQL {what}", seconds) from exc
        raise
    finally:
        timer.cancel()


class PgConnection:
    """A store's connection that comes back after the server or the network dropped it.

    The statement that finds it dropped fails (its caller tries again, as for any store
    outage); the next use outside a transaction opens a new connection first. Inside a
    transaction it never reconnects: what followed would not be part of it. A call the
    server has not answered within its bound (ANSWER_WAIT) fails with StoreNotAnswering, its
    connection given up.
    """

    def __init__(
        self,
        conn: Any,
        dsn: str,
        what: str,
        upgrading: Awaitable[None] | None = None,
        *,
        answer_wait: float | None = None,
    ) -> None:
        self._conn = conn
        self._answer_wait = answer_wait  # this store's bound, if not ANSWER_WAIT
        self._dsn = dsn
        self._what = what
        self._depth = 0
        self._closed = False
        self._reconnecting = asyncio.Lock()
        # Indexes being built for this release, on a connection of their own.
        self.upgrading = None if upgrading is None else asyncio.ensure_future(upgrading)

    async def _ready(self, deadline: float) -> None:
        """A new connection in place of a broken one, by `deadline` (an event-loop time)."""
        if self._depth or self._closed or not self.broken:
            return
        async with self._reconnecting:
            if self.broken:
                with contextlib.suppress(Exception):
                    await self._conn.close()
                # Through a frozen path a connection is made, or not, within the call's
                # bound, not libpq's connect_timeout.
                async with asyncio.timeout_at(deadline):
                    conn = await _connect(self._dsn, self._what)
                # Ours before its settings are made: the bound's hang-up reaches it.
                self._conn = conn
                try:
                    await store_session(conn)
                except BaseException:
                    # Not used without its settings: the next use connects again.
                    await conn.close()
                    raise

    def _bounded(self, seconds: float | None) -> contextlib.AbstractContextManager[float]:
        """The block within `seconds` (this store's bound if None), or the connection is
        hung up on and the block fails with StoreNotAnswering; gives the deadline."""
        if seconds is None:
            seconds = ANSWER_WAIT if self._answer_wait is None else self._answer_wait
        return _answered_within(seconds, self._what, lambda: self._conn)

    @property
    def broken(self) -> bool:
        """Whether the connection was lost (the next use outside a transaction reconnects)."""
        return bool(self._conn.broken or self._conn.closed)

    async def execute(self, *args: Any, answer_within: float | None = None, **kwargs: Any) -> Any:
        """`AsyncConnection.execute`, on a live connection; outside a transaction, bounded
        by `answer_within` s (ANSWER_WAIT if None; inside, the transaction's bound holds)."""
        if self._depth:
            return await self._conn.execute(*args, **kwargs)
        with self._bounded(answer_within) as deadline:
            await self._ready(deadline)
            return await self._conn.execute(*args, **kwargs)

    @contextlib.asynccontextmanager
    async def transaction(self, *, answer_within: float | None = None) -> AsyncIterator[Any]:
        """`AsyncConnection.transaction`, begun on a live connection, and bounded from BEGIN
        to COMMIT by `answer_within` s (ANSWER_WAIT if None)."""
        with self._bounded(answer_within) as deadline:
            await self._ready(deadline)
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
        """Close for good: no reconnecting after this (an index build under way stops)."""
        self._closed = True
        if self.upgrading is not None and not self.upgrading.done():
            self.upgrading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.upgrading
        await self._conn.close()

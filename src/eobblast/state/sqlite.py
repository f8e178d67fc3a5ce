"""SQLite helpers shared by the stores that keep a file per machine."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import stat
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import TypeVar

from eobblast.errors import ConfigError

T = TypeVar("T")
S = TypeVar("S")

SQLITE_PREFIX = "sqlite:///"
POSTGRES_PREFIXES = ("postgresql://", "postgres://")


def sqlite_path(url: str, what: str) -> Path | None:
    """The file of a `sqlite:///` URL (None for another scheme). As in SQLAlchemy,
    `sqlite:///state/x.db` is relative to the working directory and `sqlite:////var/x.db`
    (four slashes) absolute."""
    if not url.startswith(SQLITE_PREFIX):
        return None
    rest = url.removeprefix(SQLITE_PREFIX)
    if not rest.strip():
        raise ConfigError(f"{what} url names no file: sqlite:///<file>")
    return Path(rest)


def store_location(url: str, what: str) -> Path | str:
    """Where a store's URL points: its SQLite file, or the PostgreSQL URL itself;
    ConfigError for any other scheme."""
    path = sqlite_path(url, what)
    if path is not None:
        return path
    if url.startswith(POSTGRES_PREFIXES):
        return url
    raise ConfigError(f"{what} url must start with sqlite:/// or postgresql://")


async def open_store(
    url: str,
    what: str,
    sqlite: Callable[[Path], S],
    postgres: Callable[[str], Awaitable[S]],
) -> S:
    """A store opened from its URL: a SQLite file (one machine) or PostgreSQL (across)."""
    location = store_location(url, what)
    if isinstance(location, Path):
        return sqlite(location)
    return await postgres(location)


# Pages written to the WAL before a checkpoint copies them into the database (SQLite's
# default: 1,000). Random index leaves (event ids, members, addresses) are written again by
# many transactions; copied once per checkpoint, ten times fewer checkpoints cost the bounce
# store ~7% less CPU per notice (149-154 against 161-165 us, 64 concurrent notices on a
# store of 20,000). The WAL file grows to ~40 MB. A process crash loses nothing (the
# failure model here); a power loss before a checkpoint could roll back more of the latest
# transactions than with 1,000 pages, as `synchronous=NORMAL` syncs only at checkpoints.
WAL_CHECKPOINT_PAGES = 10_000

# How long a write waits for another process's write lock before it fails ("database is
# locked"), and how much of that SQLite may spend blocking the event loop at a time (see
# `begin_immediate`).
LOCK_WAIT = 10.0
BLOCKING_WAIT_MS = 20
_WAIT_LONG = f"PRAGMA busy_timeout={int(LOCK_WAIT * 1000)}"
_WAIT_SHORT = f"PRAGMA busy_timeout={BLOCKING_WAIT_MS}"


def open_sqlite(path: Path, schema: Iterable[str]) -> sqlite3.Connection:
    """A store's connection (its directory created): autocommit, WAL, a `busy_timeout` of
    `LOCK_WAIT`, its schema created. Writes take the lock with `begin_immediate`, which
    waits for another process's write lock without stopping the event loop.

    Switching to WAL needs a moment of exclusive access, which SQLite does not wait for:
    processes starting together retry briefly instead of failing. `synchronous=NORMAL` is
    durable against process crashes (the failure model here); fsync at checkpoints, which
    come every `WAL_CHECKPOINT_PAGES` pages.
    """
    statements = list(schema)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    _owner_only(path)
    db = sqlite3.connect(path, isolation_level=None, timeout=LOCK_WAIT)
    db.execute(_WAIT_LONG)
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            for statement in statements:
                db.execute(statement)
            break
        except sqlite3.OperationalError as exc:
            if not is_busy(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute(f"PRAGMA wal_autocheckpoint={WAL_CHECKPOINT_PAGES}")
    return db


def add_column(db: sqlite3.Connection, table: str, column: str, declaration: str) -> None:
    """Add a column a new release brings to a table an earlier one made, if it is missing
    (SQLite has no ADD COLUMN IF NOT EXISTS). Nullable, no default: existing rows read it
    as NULL, and the earlier release's INSERTs, which name their columns, still work. Two
    processes starting together may both try: the second finds it there."""
    if any(row[1] == column for row in db.execute(f"PRAGMA table_info({table})")):
        return
    try:
        db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
    except sqlite3.OperationalError as exc:
        if "duplicate column" not in str(exc):
            raise


def _owner_only(path: Path) -> None:
    # Stores hold raw events, escrowed notices and audit records: readable by their owner
    # only, whatever the umask. SQLite gives its -wal and -shm files the database file's
    # mode, so creating that file 0600 (or narrowing an older one) covers all three.
    # A file another account owns (shared on purpose, through its group) is left as it is.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if _ours_and_open(os.fstat(fd)):
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    for suffix in ("-wal", "-shm"):
        side = path.with_name(path.name + suffix)
        with contextlib.suppress(FileNotFoundError):
            if _ours_and_open(side.stat()):
                side.chmod(0o600)


def _ours_and_open(info: os.stat_result) -> bool:
    return bool(stat.S_IMODE(info.st_mode) & 0o077) and info.st_uid == os.geteuid()


async def begin_immediate(db: sqlite3.Connection) -> None:
    """`BEGIN IMMEDIATE` on `db`, waiting up to `LOCK_WAIT` for another process's write lock
    with the event loop running; `sqlite3.OperationalError` ("database is locked") after.

    SQLite's own busy handler sleeps on the calling thread, which is the event loop's: a
    worker whose store another process holds for a while (a long purge, a checkpoint, an
    admin command) would stop its Kafka heartbeats, its SMTP sessions and its metrics for as
    long. It may block only for `BLOCKING_WAIT_MS` (most waits are over by then); longer,
    the loop runs between tries. Every write to a store's connection takes its lock here
    (reads need none in WAL mode). Another write on `db` may run while this waits, but not
    inside a half-done transaction: the work after `write_transaction`'s begin is
    synchronous, and the bounce store, whose transactions await, holds its own lock around
    this call and its whole transaction.
    """
    deadline = time.monotonic() + LOCK_WAIT
    delay = 0.002
    while True:
        db.execute(_WAIT_SHORT)
        try:
            db.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as exc:
            if not is_busy(exc) or time.monotonic() >= deadline:
                raise
        finally:
            db.execute(_WAIT_LONG)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)


def is_busy(exc: sqlite3.OperationalError) -> bool:
    """Whether SQLite gave up waiting for another connection's lock."""
    return (exc.sqlite_errorcode & 0xFF) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


async def write_transaction(db: sqlite3.Connection, work: Callable[[], T]) -> T:
    """Run `work` (synchronous statements on `db`) in one write transaction, its lock taken
    by `begin_immediate`.

    The stores' connections are in autocommit mode, where every statement, and every row of
    an executemany, would be a commit of its own.
    """
    await begin_immediate(db)
    try:
        result = work()
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return result

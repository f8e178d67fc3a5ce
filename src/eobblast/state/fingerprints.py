"""Fingerprints of the secrets a deployment uses, recorded in the stores that depend on them.

Each machine keeps its secrets (the VERP key, the escrow key ring, the member-reference
key) in files of its own, while workers on several machines share PostgreSQL stores: a
host that made keys of its own would sign return paths, seal portal items and write audit
references that mean nothing to the others. So a store records in `secret_fingerprints`
the fingerprint of each key used with it, under the key's name ("VERP key 1"), and a host
starts only with keys that agree (`change_fingerprints`, with what services decide). A
fingerprint is SHA-256 over a fixed label, the name and the key: it tells keys apart,
tells one key used for two purposes apart, and reveals nothing of them (they are 256
random bits).
"""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from eobblast.errors import ConfigError
from eobblast.state.postgres import connect_postgres, libpq_reason
from eobblast.state.sqlite import open_sqlite, store_location, write_transaction

_LABEL = b"eobblast.secret-fingerprint.v1\x00"
_CREATE = (
    "CREATE TABLE IF NOT EXISTS secret_fingerprints ("
    " name TEXT PRIMARY KEY, fingerprint TEXT NOT NULL, recorded_at BIGINT NOT NULL)"
)
_SELECT = "SELECT name, fingerprint, recorded_at FROM secret_fingerprints"
# Plain statements, run with the record lock held: no row another host could add between
# the look and the write, so no ON CONFLICT (whose DO UPDATE would need the UPDATE right).
_DELETE = "DELETE FROM secret_fingerprints WHERE name = {0}"
_INSERT = "INSERT INTO secret_fingerprints (name, fingerprint, recorded_at) VALUES ({0}, {0}, {0})"
_SCHEMA_LOCK = 0x0E0B_F1A9
# Held from the look to the write, by every host: one at a time. A transaction-level
# advisory lock needs no right on the table (LOCK TABLE would need UPDATE, DELETE or
# TRUNCATE), and its wait is bounded by RECORD_WAIT, whatever the role's lock_timeout.
_RECORD_LOCK = 0x0E0B_F1AA
# How long (seconds) a host waits while another looks and writes, which takes milliseconds.
RECORD_WAIT = 30.0


@dataclass(frozen=True, slots=True)
class Recorded:
    """A fingerprint a store records, and when (seconds since the epoch)."""

    fingerprint: str
    at: int


@dataclass(frozen=True, slots=True)
class Change:
    """What to write to a store: fingerprints by name (replacing any recorded under the
    name), and names whose fingerprint to remove."""

    record: Mapping[str, str] = field(default_factory=dict)
    forget: frozenset[str] = frozenset()


# Looks at what a store records (name -> Recorded) and says what to change; raises (a
# ConfigError) to change nothing.
Decide = Callable[[Mapping[str, Recorded]], Change]


def fingerprint(name: str, key: bytes) -> str:
    """The fingerprint of the key recorded under `name`: SHA-256 (hex) over a fixed label,
    the name and the key (a key reused under another name has another fingerprint)."""
    return hashlib.sha256(_LABEL + name.encode() + b"\x00" + key).hexdigest()


async def change_fingerprints(url: str, what: str, decide: Decide) -> None:
    """Show `decide` what the store at `url` records, then make the change it returns, in
    one transaction that excludes every other host's: of two hosts that start at once, the
    second sees what the first recorded. A failing store is a ConfigError naming `what`
    (never its URL)."""
    location = store_location(url, what)
    if isinstance(location, Path):
        try:
            await _change_sqlite(location, decide)
        except (sqlite3.Error, OSError) as exc:
            raise ConfigError(_trouble(what, _sqlite_reason(exc))) from None
        return
    import psycopg

    try:
        await _change_postgres(location, what, decide)
    except psycopg.Error as exc:
        raise ConfigError(_trouble(what, _pg_reason(exc, location))) from None


async def _change_sqlite(path: Path, decide: Decide) -> None:
    db = open_sqlite(path, [_CREATE])
    try:

        def work() -> None:
            recorded = _rows(db.execute(_SELECT).fetchall())
            for statement, args in _statements(recorded, decide):
                db.execute(statement.format("?"), args)

        await write_transaction(db, work)
    finally:
        db.close()


async def _change_postgres(dsn: str, what: str, decide: Decide) -> None:
    conn = await connect_postgres(dsn, what, _SCHEMA_LOCK, [_CREATE])
    try:
        async with conn.transaction():
            # Two hosts' keys under different names (two key rings) would not conflict
            # row by row: the look and the write are one step, one host at a time.
            await conn.execute(f"SET LOCAL lock_timeout = {int(RECORD_WAIT * 1000)}")
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_RECORD_LOCK,))
            cur = await conn.execute(_SELECT)
            recorded = _rows(await cur.fetchall())
            for statement, args in _statements(recorded, decide):
                await conn.execute(statement.format("%s"), args)
    finally:
        await conn.close()


def _rows(rows: list[tuple[str, str, int]]) -> dict[str, Recorded]:
    return {name: Recorded(value, int(at)) for name, value, at in rows}


def _statements(
    recorded: Mapping[str, Recorded], decide: Decide
) -> list[tuple[str, tuple[object, ...]]]:
    """The statements (placeholders `{0}`) that make the change `decide` asks for."""
    change = decide(recorded)
    now = int(time.time())
    replaced = (change.forget | change.record.keys()) & recorded.keys()
    deletes = [(_DELETE, (name,)) for name in sorted(replaced)]
    inserts = [(_INSERT, (name, value, now)) for name, value in sorted(change.record.items())]
    return [*deletes, *inserts]


async def recorded_fingerprints(url: str, what: str) -> dict[str, str]:
    """What the store at `url` records (name -> fingerprint), read without creating
    anything: nothing, while it has no table (or no file) yet. A failing store is a
    ConfigError naming `what` (never its URL)."""
    location = store_location(url, what)
    if isinstance(location, Path):
        try:
            return _read_sqlite(location)
        except (sqlite3.Error, OSError) as exc:
            raise ConfigError(_trouble(what, _sqlite_reason(exc))) from None
    import psycopg

    conn = await connect_postgres(location, what, _SCHEMA_LOCK, ())
    try:
        cur = await conn.execute(_SELECT)
        return {name: value for name, value, _ in await cur.fetchall()}
    except psycopg.errors.UndefinedTable:
        return {}
    except psycopg.Error as exc:
        raise ConfigError(_trouble(what, _pg_reason(exc, location))) from None
    finally:
        await conn.close()


def _read_sqlite(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    # Read only. A store in use has its WAL file, read along; one that is not has none,
    # and is read as it stands (immutable), so that no empty WAL file is left beside it.
    in_use = path.with_name(path.name + "-wal").exists()
    uri = path.resolve().as_uri() + ("?mode=ro" if in_use else "?immutable=1")
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
        if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'secret_fingerprints'").fetchone():
            return {name: value for name, value, _ in db.execute(_SELECT).fetchall()}
    return {}


def _trouble(what: str, reason: str) -> str:
    return f"the {what} store's secret fingerprints cannot be read or recorded: {reason}"


def _sqlite_reason(exc: BaseException) -> str:
    # SQLite's messages name no file; an OSError's would (the strerror alone does not).
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return str(exc) or type(exc).__name__


def _pg_reason(exc: BaseException, dsn: str) -> str:
    import psycopg

    if isinstance(exc, psycopg.errors.LockNotAvailable):
        return f"another host held them for over {RECORD_WAIT:g} s (try again)"
    return libpq_reason(exc, dsn)

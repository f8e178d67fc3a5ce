"""Fingerprints of the secrets a deployment uses, recorded in the stores that depend on them.

Each machine keeps its secrets (the VERP key, the escrow key ring, the member-reference
key) in files of its own, while workers on several machines share PostgreSQL stores: a
host that made keys of its own would sign return paths, seal portal items and write audit
references that mean nothing to the others. So a store records in `secret_fingerprints`,
the first time, the fingerprint of each key used with it, and a host starts only with keys
that agree (`agree_fingerprints`). A fingerprint is SHA-256 over a fixed label and the key:
it tells keys apart and reveals nothing of them (they are 256 random bits).
"""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from eobblast.state.postgres import connect_postgres
from eobblast.state.sqlite import open_sqlite, store_location, write_transaction

_LABEL = b"eobblast.secret-fingerprint.v1\x00"
_CREATE = (
    "CREATE TABLE IF NOT EXISTS secret_fingerprints ("
    " name TEXT PRIMARY KEY, fingerprint TEXT NOT NULL, recorded_at BIGINT NOT NULL)"
)
_SELECT = "SELECT name, fingerprint FROM secret_fingerprints"
_INSERT = (
    "INSERT INTO secret_fingerprints (name, fingerprint, recorded_at) VALUES ({0}, {0}, {0})"
    " ON CONFLICT (name) DO NOTHING"
)
_SCHEMA_LOCK = 0x0E0B_F1A9

# Looks at what a store records (name -> fingerprint) and raises if this host's keys
# disagree with it.
Agree = Callable[[Mapping[str, str]], None]


def fingerprint(key: bytes) -> str:
    """A key's fingerprint: SHA-256 (hex) over a fixed label and the key."""
    return hashlib.sha256(_LABEL + key).hexdigest()


async def agree_fingerprints(url: str, what: str, ours: Mapping[str, str], agree: Agree) -> None:
    """Show `agree` what the store at `url` records, then record those of `ours` (name ->
    fingerprint) it has no fingerprint for yet, in one transaction that excludes every
    other host's: of two hosts that start at once, the second sees what the first recorded.
    """
    location = store_location(url, what)

    def new_rows(recorded: Mapping[str, str]) -> list[tuple[str, str, int]]:
        agree(recorded)
        now = int(time.time())
        return [(name, value, now) for name, value in ours.items() if name not in recorded]

    if isinstance(location, Path):
        db = open_sqlite(location, [_CREATE])
        try:

            def work() -> None:
                rows = new_rows(dict(db.execute(_SELECT).fetchall()))
                db.executemany(_INSERT.format("?"), rows)

            await write_transaction(db, work)
        finally:
            db.close()
        return
    conn = await connect_postgres(location, what, _SCHEMA_LOCK, [_CREATE])
    try:
        async with conn.transaction():
            # Two hosts' keys under different names (two key rings) would not conflict
            # row by row: the look and the insert are one step, one host at a time.
            await conn.execute("LOCK TABLE secret_fingerprints IN SHARE ROW EXCLUSIVE MODE")
            cur = await conn.execute(_SELECT)
            rows = new_rows(dict(await cur.fetchall()))
            async with conn.cursor() as insert:
                await insert.executemany(_INSERT.format("%s"), rows)
    finally:
        await conn.close()


async def recorded_fingerprints(url: str, what: str) -> dict[str, str]:
    """What the store at `url` records, read without creating anything: nothing, while it
    has no table (or no file) yet."""
    location = store_location(url, what)
    if isinstance(location, Path):
        return _read_sqlite(location)
    import psycopg

    conn = await connect_postgres(location, what, _SCHEMA_LOCK, ())
    try:
        cur = await conn.execute(_SELECT)
        return dict(await cur.fetchall())
    except psycopg.errors.UndefinedTable:
        return {}
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
            return dict(db.execute(_SELECT).fetchall())
    return {}

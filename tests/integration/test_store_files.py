"""Every store file is readable by its owner only: they hold raw events and escrowed
notices (PHI), audit records and delivery state, whatever umask the service runs with."""

from __future__ import annotations

import os
import stat
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from eobblast.bounces.store import open_bounce_store
from eobblast.observe.audit import open_audit
from eobblast.protect.escrow import KeyRing, open_escrow
from eobblast.protect.tls_store import open_tls_store
from eobblast.shaping.budgets import open_budgets
from eobblast.state import open_ledger


@pytest.fixture
def open_umask() -> Iterator[None]:
    old = os.umask(0o022)  # the usual default: new files would be world-readable
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _modes(path: Path) -> dict[str, int]:
    """The permission bits of a database file and of its -wal and -shm files."""
    return {f.name: _mode(f) for f in sorted(path.parent.glob(path.name + "*"))}


def _open_up(path: Path) -> None:
    for f in path.parent.glob(path.name + "*"):
        f.chmod(0o644)  # as an earlier version left them


OPENERS: dict[str, Callable[[str, Path], Awaitable[Any]]] = {
    "ledger": lambda url, _: open_ledger(url),
    "bounces": lambda url, _: open_bounce_store(url),
    "escrow": lambda url, tmp: open_escrow(url, KeyRing.generate(tmp / "keys")),
    "audit": lambda url, _: open_audit(url),
    "tls": lambda url, _: open_tls_store(url),
    "budgets": lambda url, _: open_budgets(url),
}


@pytest.mark.parametrize("kind", sorted(OPENERS))
@pytest.mark.usefixtures("open_umask")
async def test_a_new_store_and_its_wal_are_the_owners_alone(kind: str, tmp_path: Path) -> None:
    path = tmp_path / "state" / f"{kind}.db"
    store = await OPENERS[kind](f"sqlite:///{path}", tmp_path)
    try:
        # The schema was written through the WAL: all three files exist.
        names = [path.name, path.name + "-shm", path.name + "-wal"]
        assert _modes(path) == dict.fromkeys(names, 0o600)
        assert _mode(path.parent) & 0o077 == 0
    finally:
        await store.close()


@pytest.mark.usefixtures("open_umask")
async def test_an_older_world_readable_store_is_narrowed_when_opened(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    ledger = await open_ledger(f"sqlite:///{path}")
    await ledger.close()
    _open_up(path)
    assert set(_modes(path).values()) == {0o644}
    ledger = await open_ledger(f"sqlite:///{path}")
    try:
        assert set(_modes(path).values()) == {0o600}
    finally:
        await ledger.close()


def test_a_store_checkpoints_its_wal_every_ten_thousand_pages(tmp_path: Path) -> None:
    # Pages written again and again (random index leaves) are copied into the database once
    # per checkpoint: past SQLite's default of 1,000 pages, the WAL keeps growing.
    from eobblast.state.sqlite import WAL_CHECKPOINT_PAGES, open_sqlite

    path = tmp_path / "store.db"
    db = open_sqlite(path, ["CREATE TABLE t (k INTEGER PRIMARY KEY, v BLOB)"])
    try:
        page = db.execute("PRAGMA page_size").fetchone()[0]
        for _ in range(3_000):  # ~3,000 pages, one transaction each
            db.execute("INSERT INTO t (v) VALUES (?)", (os.urandom(page - 100),))
        wal = path.with_name(path.name + "-wal").stat().st_size
        assert wal > 2_000 * page  # not checkpointed at 1,000
        assert db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == WAL_CHECKPOINT_PAGES
    finally:
        db.close()

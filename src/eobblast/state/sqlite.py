"""SQLite helpers shared by the stores that keep a file per machine."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def write_transaction(db: sqlite3.Connection, work: Callable[[], T]) -> T:
    """Run `work` (synchronous statements on `db`) in one write transaction.

    The stores' connections are in autocommit mode, where every statement, and every row of
    an executemany, would be a commit of its own.
    """
    db.execute("BEGIN IMMEDIATE")
    try:
        result = work()
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return result

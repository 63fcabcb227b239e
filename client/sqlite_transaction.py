"""One explicit SQLite write transaction, shared by the device store and the privacy ledger."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def write_transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Cursor]:
    """Committed whole, or rolled back whole on any exception (the connection must use isolation_level=None).

    BEGIN IMMEDIATE takes the write lock up front, so a concurrent writer waits here
    instead of failing half-way through the body.
    """
    cur = conn.cursor()
    cur.execute("BEGIN IMMEDIATE")
    try:
        yield cur
    except BaseException:
        cur.execute("ROLLBACK")
        raise
    cur.execute("COMMIT")

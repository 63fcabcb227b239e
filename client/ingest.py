"""Importing one user's interactions from a file into the device store.

The file is read and validated whole by the loaders of `common.interaction_loader` (a
bad row names its file, line and reason) before anything is written; the write is one
transaction. A file is identified by its SHA-256, so importing it again adds nothing,
and an interaction (item, time) already in the store is never added twice.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedinterest.client.device_store import DeviceStore, ImportResult, file_sha256
from fedinterest.common.column_values import ColumnMap
from fedinterest.common.interaction_loader import ALL_FORMATS, load_interactions
from fedinterest.common.interactions import DataFormatError
from fedinterest.common.table_loader import suffix_format


def infer_format(path: str | Path) -> str:
    """The format a file's suffix names; ValueError asking for --format otherwise."""
    fmt = suffix_format(path)
    if fmt is None:
        raise ValueError(f"{path}: cannot tell the format from the file name; pass --format (one of {', '.join(ALL_FORMATS)})")
    return fmt


def ingest_file(
    store: DeviceStore, path: str | Path, *, fmt: str | None = None, columns: ColumnMap = ColumnMap(), user: str | None = None
) -> ImportResult:
    """Import the interactions of one user from `path` (all of them or none).

    A file holding several users is refused unless `user` names the one to import.
    """
    fmt = fmt or infer_format(path)
    table = load_interactions(path, format=fmt, columns=columns)
    users = list(dict.fromkeys(table.users))  # first-appearance order, for the message
    if user is None:
        if len(users) > 1:
            shown = ", ".join(repr(u) for u in users[:5]) + (", ..." if len(users) > 5 else "")
            raise DataFormatError(str(path), None, f"holds {len(users)} users ({shown}); a device keeps one user's history: pass --user ID")
        user = users[0]
    elif user not in users:
        raise DataFormatError(str(path), None, f"has no interactions of user {user!r} (it has {len(users)} users)")
    keep = np.fromiter((u == user for u in table.users), dtype=bool, count=len(table))
    mine = table.take(keep)
    return store.import_interactions(
        items=mine.items, timestamps=mine.timestamps, ratings=mine.ratings, lines=mine.lines,
        user_id=user, source=str(Path(path).resolve()), fmt=fmt, sha256=file_sha256(path),
    )

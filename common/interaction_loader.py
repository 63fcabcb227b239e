"""Reading an interaction file in any supported format into an `InteractionTable`.

Formats:
  - MovieLens 100K `u.data` (tab-separated) and MovieLens 1M `ratings.dat` (`::`),
    common/movielens_loader.py;
  - generic CSV/TSV (header row), JSON lines and Parquet, with a `ColumnMap` naming
    the user, item, timestamp and optional rating columns, common/table_loader.py;
  - the "sequence" format: one line per user, `user item item ...`,
    common/sequence_loader.py.

Every loader refuses malformed input at the first bad row (common/file_text.py).
"""

from __future__ import annotations

from pathlib import Path

from fedinterest.common.column_values import ColumnMap
from fedinterest.common.interactions import InteractionTable
from fedinterest.common.movielens_loader import load_movielens_1m, load_movielens_100k
from fedinterest.common.sequence_loader import load_sequences
from fedinterest.common.table_loader import GENERIC_FORMATS, load_table

ALL_FORMATS = ("ml-100k", "ml-1m", "csv", "tsv", "jsonl", "parquet", "sequences")


def load_interactions(path: str | Path, *, format: str, columns: ColumnMap = ColumnMap()) -> InteractionTable:
    """Read `path` in the named format (one of ALL_FORMATS)."""
    if format not in ALL_FORMATS:
        raise ValueError(f"unknown interaction format {format!r}; choices: " + ", ".join(ALL_FORMATS))
    if format in GENERIC_FORMATS:
        return load_table(path, columns=columns, format=format)
    # The fixed layouts have no named columns; a mapping here is a configuration mistake.
    if columns != ColumnMap():
        raise ValueError(f"columns= applies only to {', '.join(GENERIC_FORMATS)}, not to {format!r}")
    if format == "ml-100k":
        return load_movielens_100k(path)
    if format == "ml-1m":
        return load_movielens_1m(path)
    return load_sequences(path)

"""Tests of the loaders' dispatch and ordering, and smoke tests on the real MovieLens files."""

from __future__ import annotations

from pathlib import Path

import pytest
from loader_helpers import expect_error, write_file, write_parquet

from fedinterest.common.column_values import ColumnMap
from fedinterest.common.interaction_loader import load_interactions
from fedinterest.common.interactions import to_sequences
from fedinterest.common.movielens_loader import load_movielens_1m, load_movielens_100k
from fedinterest.common.table_loader import load_table

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# ---------------------------------------------------------------------------- ordering, dispatch, options


def test_to_sequences_is_chronological_with_stable_ties(tmp_path: Path) -> None:
    text = "user,item,timestamp\na,w,5\nb,q,2\na,x,3\na,y,3\nb,r,1\na,z,1\na,v,3\n"
    data = to_sequences(load_table(write_file(tmp_path, "t.csv", text)), "t")
    by_user = {u: [data.item_ids[i - 1] for i in seq] for u, seq in zip(data.user_ids, data.sequences)}
    # Equal timestamps (x, y, v at 3) stay in file order.
    assert by_user == {"a": ["z", "x", "y", "v", "w"], "b": ["r", "q"]}


def test_load_interactions_dispatches_every_format(tmp_path: Path) -> None:
    files = {
        "ml-100k": write_file(tmp_path, "u.data", "1\t2\t3\t4\n"),
        "ml-1m": write_file(tmp_path, "r.dat", "1::2::3::4\n"),
        "csv": write_file(tmp_path, "a.txt", "user,item,timestamp\n1,2,4\n"),
        "tsv": write_file(tmp_path, "b.txt", "user\titem\ttimestamp\n1\t2\t4\n"),
        "jsonl": write_file(tmp_path, "c.txt", '{"user": 1, "item": 2, "timestamp": 4}\n'),
        "parquet": write_parquet(tmp_path, "d.bin", {"user": [1], "item": [2], "timestamp": [4]}),
        "sequences": write_file(tmp_path, "e.txt", "1 2\n"),
    }
    for fmt, path in files.items():
        table = load_interactions(path, format=fmt)
        assert (table.source, table.users, table.items) == (str(path), ["1"], ["2"]), fmt
    with pytest.raises(ValueError, match="unknown interaction format 'ml-20m'; choices: ml-100k, ml-1m, csv, tsv, jsonl, parquet, sequences"):
        load_interactions(files["ml-1m"], format="ml-20m")
    with pytest.raises(ValueError, match="columns= applies only to"):
        load_interactions(files["ml-1m"], format="ml-1m", columns=ColumnMap(user="uid"))
    mapped = load_interactions(write_file(tmp_path, "m.csv", "uid,iid,ts\n5,6,7\n"), format="csv", columns=ColumnMap("uid", "iid", "ts"))
    assert (mapped.users, mapped.items) == (["5"], ["6"])


def test_load_table_format_inference_and_options(tmp_path: Path) -> None:
    path = write_file(tmp_path, "data.txt", "user,item,timestamp\n1,2,3\n")
    expect_error(load_table, path, None, "cannot tell the format from the suffix '.txt'; pass format= one of csv, tsv, jsonl, parquet")
    expect_error(lambda p: load_table(p, format="xlsx"), path, None, "unknown format 'xlsx'; formats: csv, tsv, jsonl, parquet")
    assert load_table(write_file(tmp_path, "UP.CSV", "user,item,timestamp\n1,2,3\n")).users == ["1"]
    with pytest.raises(ValueError, match="distinct"):
        ColumnMap(user="id", item="id")
    with pytest.raises(ValueError, match="non-empty"):
        ColumnMap(rating=" ")


# ---------------------------------------------------------------------------- real data smoke tests


def _real(relative: str) -> Path:
    path = SHARED_DATA / relative
    if not path.is_file():
        reason = f"real data file {path} is absent"
        print(reason)
        pytest.skip(reason)
    return path


# (loader, file, rows, users, items, first row's user and item, time span): the files' published counts.
REAL_FILES = [
    (load_movielens_100k, "ml-100k/u.data", 100_000, 943, 1_682, ("196", "242"), (874724710, 893286638)),
    (load_movielens_1m, "ml-1m/ratings_u1-2999.dat", 487_650, 2_999, 3_615, ("1", "1193"), (970620734, 1046388675)),
]


@pytest.mark.parametrize(("loader", "relative", "rows", "users", "items", "first", "span"), REAL_FILES, ids=["ml-100k", "ml-1m-subset"])
def test_real_movielens_files(loader, relative: str, rows: int, users: int, items: int, first: tuple, span: tuple) -> None:
    table = loader(_real(relative))
    assert (len(table), len(set(table.users)), len(set(table.items))) == (rows, users, items)
    assert (table.users[0], table.items[0]) == first
    assert (table.timestamps.min(), table.timestamps.max()) == span
    assert table.lines[-1] == rows

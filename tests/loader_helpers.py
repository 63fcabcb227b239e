"""Writing small interaction files and asserting a loader's refusal, for the loader tests."""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fedinterest.common.interactions import DataFormatError


def write_file(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8", newline="")
    else:
        path.write_bytes(content)
    return path


def write_parquet(tmp_path: Path, name: str, data: dict | pa.Table) -> Path:
    path = tmp_path / name
    table = data if isinstance(data, pa.Table) else pa.table(data)
    pq.write_table(table, path)
    return path


def expect_error(load, path: Path, line: int | None, reason: str) -> DataFormatError:
    """Assert that `load(path)` fails naming the file, `line` and the `reason` text."""
    with pytest.raises(DataFormatError, match=re.escape(reason)) as info:
        load(path)
    err = info.value
    assert err.path == str(path)
    assert err.line == line
    where = f"{path}:{line}: " if line is not None else f"{path}: "
    assert str(err).startswith(where), str(err)
    return err

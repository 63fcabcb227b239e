"""common/structured_files.py: a missing or unparsable JSON/TOML file is the caller's error, naming the file."""

from __future__ import annotations

import pytest

from fedinterest.common.errors import FedinterestError
from fedinterest.common.structured_files import read_json, read_toml


class ReadError(FedinterestError, ValueError):
    pass


def test_documents_are_parsed(tmp_path):
    (tmp_path / "a.json").write_text('{"x": [1, 2]}', encoding="utf-8")
    (tmp_path / "a.toml").write_text("[run]\nx = 1\n", encoding="utf-8")
    assert read_json(tmp_path / "a.json", ReadError) == {"x": [1, 2]}
    assert read_toml(tmp_path / "a.toml", ReadError) == {"run": {"x": 1}}


@pytest.mark.parametrize(("name", "text", "read", "kind"), [("bad.json", "{", read_json, "JSON"), ("bad.toml", "x = \n", read_toml, "TOML")])
def test_an_unparsable_file_raises_the_callers_error_naming_it(tmp_path, name, text, read, kind):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ReadError, match=rf"{name}: not valid {kind} \(.*line 1"):
        read(path, ReadError)


def test_a_missing_file_raises_the_callers_message_or_passes_through(tmp_path):
    with pytest.raises(ReadError, match="^the table is missing$"):
        read_json(tmp_path / "none.json", ReadError, missing="the table is missing")
    with pytest.raises(FileNotFoundError):
        read_toml(tmp_path / "none.toml", ReadError)

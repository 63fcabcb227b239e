"""One JSON or TOML file read whole, with the caller's error for a missing or unparsable file.

Every reader of a config, a run file, a checkpoint record or a deployment table says the
same two things when it cannot read its file: it is missing (in the caller's words, which
say what the file is for), or it is not valid JSON/TOML (with the parser's position). The
error class is the caller's, so each CLI keeps its exit code (common/errors.py).
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

ErrorClass = Callable[[str], Exception]


def read_json(path: Path, error: ErrorClass, *, missing: str | None = None) -> Any:
    """The parsed JSON document at `path`.

    `error(message)` is raised for invalid JSON, and for a missing file when `missing` is
    given (its message); without it FileNotFoundError passes through to the caller.
    """
    return _parse(path, json.loads, json.JSONDecodeError, "JSON", error, missing)


def read_toml(path: Path, error: ErrorClass, *, missing: str | None = None) -> dict[str, Any]:
    """The parsed TOML document at `path`; errors as in `read_json`."""
    document: dict[str, Any] = _parse(path, tomllib.loads, tomllib.TOMLDecodeError, "TOML", error, missing)
    return document


def _parse(
    path: Path,
    parse: Callable[[str], Any],
    invalid: type[ValueError],
    kind: str,
    error: ErrorClass,
    missing: str | None,
) -> Any:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError as err:
        if missing is None:
            raise
        raise error(missing) from err
    try:
        return parse(text)
    except invalid as err:
        raise error(f"{path}: not valid {kind} ({err})") from err

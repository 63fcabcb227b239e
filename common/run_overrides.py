"""`--set key=value` items of a run config: TOML literals, or plain text for string keys.

Shared by `fedinterest simulate` and `fedinterest server run`.
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import fields

from fedinterest.common.run_config import RunConfig


def run_config_types() -> dict[str, type]:
    """The Python type of every run-config key (kebab-case), from RunConfig's defaults."""
    return {f.name.replace("_", "-"): type(getattr(RunConfig, f.name)) for f in fields(RunConfig)}


def parse_set_items(items: Sequence[str], extra_types: Mapping[str, type] | None = None) -> dict[str, object]:
    """`--set key=value` items as a mapping; ValueError names a malformed item.

    A string key takes the text as it is (`dataset=ml-100k`, quotes optional); other keys
    need a TOML literal of their type (`noise-multiplier=0.5`, `seed=3`). Unknown keys
    are passed through for the caller's config check to name.
    """
    types = {**run_config_types(), **(extra_types or {})}
    parsed: dict[str, object] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected key=value")
        text = text.strip()
        literal = _toml_literal(text)
        if types.get(key) is str:
            value: object = literal if isinstance(literal, str) else text
        elif literal is _NOT_TOML:
            if key in types:
                raise ValueError(f"--set {key}={text}: not a valid {types[key].__name__}")
            value = text
        else:
            value = literal
        parsed[key] = value
    return parsed


_NOT_TOML = object()


def _toml_literal(text: str) -> object:
    try:
        document = tomllib.loads(f"v = {text}")
    # Not only TOMLDecodeError: nested arrays (`seed=[[[[...`) raise RecursionError, and an
    # integer of more than 4300 digits int()'s ValueError (TOMLDecodeError is a ValueError too).
    except (ValueError, RecursionError):
        return _NOT_TOML
    # `seed=1\nx=2` parses as two keys; taking `v` alone would silently drop the rest.
    if set(document) != {"v"}:
        return _NOT_TOML
    return document["v"]


def toml_value(value: object) -> str:
    """One TOML literal (bool, int, float incl. inf/nan, str)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        # Not json.dumps(value) as it is: its ASCII escapes write a character beyond U+FFFF as a
        # surrogate pair (\\ud800\\udc00 for U+10000), which TOML refuses. Raw UTF-8 is valid TOML, except
        # DEL, which TOML wants escaped; a lone surrogate (from undecodable argv bytes) has no TOML form.
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"cannot write {value!r} as a TOML value: it is not valid Unicode text") from None
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    raise TypeError(f"cannot write {value!r} as a TOML value")


def flat_toml(values: Mapping[str, object]) -> str:
    """A flat TOML document (`key = value` lines), what `flwr run --run-config FILE` reads."""
    return "".join(f"{key} = {toml_value(value)}\n" for key, value in values.items())

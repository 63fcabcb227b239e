"""Public catalogue attributes of items (brand, categories, genres), for attribute item vectors.

What a shop or a film catalogue knows about its own items, not about any user: a model
may use it without spending privacy budget (docs/privacy.md). Three layouts, chosen by
the file:
- JSON `{item id: [attribute ids]}` (the S3-Rec Amazon `*_item2attributes.json`);
- MovieLens 1M `movies.dat` (`id::title::Genre|Genre`, Latin-1);
- MovieLens 100K `u.item` (`id|title|date|video date|url|19 genre flags`).

`item_attribute_rows` maps them onto a dataset's item indices: row i holds the attribute
indices (1..A, numbered in sorted order of the attribute names) of item index i, row
PAD_ID none. An item of the catalogue that the file does not describe, or describes
with no attribute, gets one shared attribute "(none)": every item needs a vector.
Errors name the file, the line (or key) and the reason.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from fedinterest.common.interactions import DataFormatError

NO_ATTRIBUTE = "(none)"
ML100K_GENRES = 19  # the genre flags that end every u.item line


def item_attribute_rows(path: str | Path, item_ids: Sequence[str]) -> tuple[tuple[int, ...], ...]:
    """The attribute rows of `item_ids` (the dataset's items, index i = item_ids[i - 1])."""
    return _rows(str(path), tuple(item_ids))


@lru_cache(maxsize=4)
def _rows(path: str, item_ids: tuple[str, ...]) -> tuple[tuple[int, ...], ...]:
    described = read_item_attributes(path)
    per_item = [described.get(item) or (NO_ATTRIBUTE,) for item in item_ids]
    names = sorted({name for names in per_item for name in names})
    number = {name: index for index, name in enumerate(names, start=1)}
    return ((),) + tuple(tuple(sorted({number[name] for name in names})) for names in per_item)


def read_item_attributes(path: str | Path) -> dict[str, tuple[str, ...]]:
    """Item id -> its attribute names, from any of the three layouts."""
    src = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise DataFormatError(src, None, f"cannot read the item attributes ({err.strerror or err})") from err
    name = Path(path).name
    if name == "u.item":
        return _movielens_100k(src, raw.decode("latin-1"))
    if name.endswith(".dat"):
        return _movielens_1m(src, raw.decode("latin-1"))
    return _json_mapping(src, raw)


def _json_mapping(src: str, raw: bytes) -> dict[str, tuple[str, ...]]:
    try:
        document = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataFormatError(src, getattr(err, "lineno", None), f"not a JSON object of item attributes ({err})") from err
    if not isinstance(document, dict):
        raise DataFormatError(src, None, f"expected a JSON object {{item id: [attribute ids]}}, got {type(document).__name__}")
    out = {}
    for item, attributes in document.items():
        if not isinstance(attributes, list) or any(isinstance(a, bool) or not isinstance(a, (int, str)) for a in attributes):
            raise DataFormatError(src, None, f"item {item!r}: attributes must be a list of ids (numbers or strings), got {attributes!r}")
        out[str(item)] = tuple(str(a) for a in attributes)
    return out


def _movielens_1m(src: str, text: str) -> dict[str, tuple[str, ...]]:
    out = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("::")
        if len(fields) != 3 or not fields[0].strip():
            raise DataFormatError(src, number, f"expected `id::title::Genre|Genre`, got {len(fields)} field(s)")
        out[fields[0].strip()] = tuple(g for g in fields[2].strip().split("|") if g)
    return out


def _movielens_100k(src: str, text: str) -> dict[str, tuple[str, ...]]:
    out = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("|")
        flags = fields[-ML100K_GENRES:]
        if len(fields) < ML100K_GENRES + 5 or any(flag not in ("0", "1") for flag in flags):
            raise DataFormatError(src, number, f"expected `id|title|date|video date|url` and {ML100K_GENRES} genre flags of 0 or 1")
        out[fields[0].strip()] = tuple(f"genre-{g}" for g, flag in enumerate(flags) if flag == "1")
    return out

"""`server catalogue`: the item catalogue from an interactions file, most popular item first.

The catalogue is what a run's model indexes and what every device holds (line i = item
i). Built from the operator's own interaction log (or any file listing every item), it
is ordered by how often each item occurs, ties in order of first appearance. That order
is useful twice: a device that has no model yet ranks by it (client/recommend.py: the
popularity ranking, at no privacy cost, since the catalogue is public), and the
popularity baseline of the same data (leave-one-out by time, test split, full-catalogue
ranking, as every other figure here) is written beside the catalogue, so `server status`
and `server report` show it next to the federated model. That baseline is measured on the
operator's data, not on the devices' histories, and says so.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from fedinterest.common.catalogue import write_catalogue
from fedinterest.common.column_values import ColumnMap
from fedinterest.common.errors import FedinterestError
from fedinterest.common.interaction_loader import load_interactions
from fedinterest.common.serialization import atomic_write_text

POPULARITY_SUFFIX = ".popularity.json"


class CatalogueExistsError(FedinterestError, FileExistsError):
    """The catalogue to write exists already: a catalogue is never overwritten."""


def popularity_file(catalogue: Path) -> Path:
    """The popularity baseline written beside a catalogue built here (`catalogue.txt.popularity.json`)."""
    return catalogue.with_name(catalogue.name + POPULARITY_SUFFIX)


def build_catalogue(source: Path, out: Path, *, fmt: str, columns: ColumnMap = ColumnMap()) -> dict[str, Any]:
    """Write `out` (items by descending count) and its popularity baseline beside it; what was written."""
    from fedinterest.common.interactions import to_sequences
    from fedinterest.common.metrics import summarize
    from fedinterest.common.popularity import popularity_ranks
    from fedinterest.common.split import leave_one_out

    out = Path(out)
    if out.exists():
        raise CatalogueExistsError(f"{out}: already exists; a catalogue is never overwritten (a run's model indexes it)")
    table = load_interactions(source, format=fmt, columns=columns)  # DataFormatError names file and line
    counts = Counter(table.items)
    first = {item: i for i, item in reversed(list(enumerate(table.items)))}
    ordered = sorted(counts, key=lambda item: (-counts[item], first[item]))
    # Popularity counts every interaction; the baseline's leave-one-out keeps each user's first
    # interaction with an item (a repeat as the held-out target would be an item already seen).
    first_of_pair = np.fromiter(_first_occurrences(zip(table.users, table.items)), dtype=np.bool_, count=len(table.items))
    split = leave_one_out(to_sequences(table.take(first_of_pair), str(source)))
    baseline = summarize(popularity_ranks(split, "test")) if split.users else None
    facts = {
        "source": str(Path(source).resolve()),
        "source_sha256": hashlib.sha256(Path(source).read_bytes()).hexdigest(),
        "interactions": len(table.items),
        "items": len(ordered),
        "users_evaluated": len(split.users),
        "popularity_test": baseline,
        "protocol": "popularity baseline on this source file: leave-one-out by time (first interaction of each user with an "
        "item), test target, full-catalogue ranking, the user's earlier items excluded; measured on the operator's data, not on the devices",
    }
    write_catalogue(out, ordered)
    atomic_write_text(popularity_file(out), json.dumps(facts, indent=2) + "\n")
    return {"catalogue": str(out), "popularity": str(popularity_file(out)), **facts}


def read_popularity(catalogue: Path) -> dict[str, Any] | None:
    """The popularity baseline beside a deployment's catalogue, None when it was not built here."""
    path = popularity_file(catalogue)
    if not path.is_file():
        return None
    facts = json.loads(path.read_text(encoding="utf-8"))
    return {k: facts.get(k) for k in ("source", "users_evaluated", "popularity_test", "protocol")}


def _first_occurrences(pairs: Iterable[tuple[str, str]]) -> Iterator[bool]:
    """For each (user, item) pair in order, whether it is that pair's first occurrence."""
    seen: set[tuple[str, str]] = set()
    for pair in pairs:
        yield pair not in seen
        seen.add(pair)

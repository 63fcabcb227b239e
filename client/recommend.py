"""Ranking the whole catalogue for the device's user, locally, from the latest model.

The user's history (by raw item id) is mapped to the model's catalogue; items the
model does not know are left out of the input. Every item already in the history is
excluded from the result. A received global model is first adapted to the history on a
copy (client/personalization.py; `personalization` steps 0 turns it off). Nothing here
touches the network.

Before the device has any model (no bundle installed, no round taken part in), it ranks
by catalogue order: the operator's catalogue lists the most popular items first when it
is built with `fedinterest server catalogue` (docs/operator.md), so this is the
popularity ranking, computed from nothing on the device. The result says so
(`model.kind = "fallback"`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedinterest.client.device_store import DeviceStore
from fedinterest.client.local_models import LoadedModel, NoModelError, load_latest
from fedinterest.client.personalization import PersonalizationSettings, personalize
from fedinterest.common.catalogue import Catalogue
from fedinterest.common.constants import PAD_ID

FALLBACK = "fallback"


class CatalogueOrderRanker:
    """Scores items by catalogue position: item 1 highest (PAD column -inf); the history is not used."""

    def __init__(self, num_items: int) -> None:
        self._scores = -np.arange(num_items + 1, dtype=np.float32)
        self._scores[PAD_ID] = -np.inf

    def scores(self, history: np.ndarray) -> np.ndarray:
        return self._scores.copy()


def fallback_model(catalogue: Catalogue) -> LoadedModel:
    """The ranking of a device without a model: catalogue order (the catalogue's popularity order)."""
    description = {
        "kind": FALLBACK, "sha256": "", "ranking": "catalogue order (the most popular items first, when the operator built "
        "the catalogue with `fedinterest server catalogue`); no model has reached this device yet",
    }
    return LoadedModel(CatalogueOrderRanker(len(catalogue)), catalogue, model_id=0, description=description)


def load_or_fallback(store: DeviceStore) -> LoadedModel:
    """The latest model, or the catalogue-order fallback when the device has none."""
    try:
        return load_latest(store)
    except NoModelError:
        return fallback_model(store.catalogue())


@dataclass(frozen=True)
class Recommendation:
    """The top items (raw id, score) and which model and how much history produced them."""

    items: list[tuple[str, float]]
    model: dict
    history_used: int  # history items the model's catalogue knows (its input)
    history_unknown: int  # history items it does not know


def recommend(
    store: DeviceStore, k: int = 10, loaded: LoadedModel | None = None, *, personalization: PersonalizationSettings | None = None,
) -> Recommendation:
    """The k best unseen catalogue items for the device's user.

    `loaded` reuses an already loaded model; `personalization` defaults to PersonalizationSettings() (client/personalization.py).
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    settings = PersonalizationSettings() if personalization is None else personalization
    loaded = loaded or load_or_fallback(store)
    history = store.history(loaded.catalogue)
    loaded = personalize(loaded, history.indices, settings)
    return rank_unseen(loaded, history.indices, k, history_unknown=history.unknown)


def rank_unseen(loaded: LoadedModel, history: np.ndarray, k: int, *, history_unknown: int = 0) -> Recommendation:
    """Top k of `loaded`'s scores after `history`, every history item excluded; fewer when fewer are unseen."""
    scores = loaded.ranker.scores(history)
    scores[history] = -np.inf
    candidates = int(np.isfinite(scores).sum())
    k = min(k, candidates)
    top = np.argpartition(-scores, k - 1)[:k] if k else np.zeros(0, dtype=np.int64)
    top = top[np.argsort(-scores[top], kind="stable")]
    items = [(loaded.catalogue.item(int(i)), float(scores[i])) for i in top]
    return Recommendation(items, loaded.description, len(history), history_unknown)

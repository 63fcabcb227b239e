"""The models a device ranks with: kept in its store, loaded as rankers.

Two kinds (client/device_store.py, `store_models`): an installed bundle (common/bundle.py,
ranked with onnxruntime) and the latest global model the device received in a train
or evaluate message (safetensors weights plus their ModelConfig, ranked with the model
code). The most recently received one is used.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from fedinterest.client.device_store import META_BUDGET, META_DELTA, DeviceStore, StoredModel
from fedinterest.common.bundle import read_bundle_bytes
from fedinterest.common.catalogue import Catalogue
from fedinterest.common.constants import PAD_ID
from fedinterest.common.errors import FedinterestError
from fedinterest.common.examples import history_batch
from fedinterest.common.model import InterestModel, ModelConfig


class NoModelError(FedinterestError, LookupError):
    """The device has neither an installed bundle nor a received global model."""


class Ranker(Protocol):
    """Maps a history of item indices to (num_items + 1,) scores, PAD column -inf."""

    def scores(self, history: np.ndarray) -> np.ndarray: ...


class TorchRanker:
    """Ranks with the model code (a received global model), eval mode, no gradients."""

    def __init__(self, model: InterestModel) -> None:
        self.model = model.eval()

    @torch.no_grad()
    def scores(self, history: np.ndarray) -> np.ndarray:
        """(num_items + 1,) float32 scores after `history`; PAD column -inf."""
        items = history_batch([np.asarray(history, dtype=np.int64)], self.model.config.max_len)
        scores = self.model.score_last(items)[0].numpy().copy()
        scores[PAD_ID] = -np.inf
        return scores


@dataclass(frozen=True)
class LoadedModel:
    """A ranker with the catalogue its indices refer to and a description for reports."""

    ranker: Ranker
    catalogue: Catalogue
    model_id: int
    description: dict


def save_global_model(
    store_path: Path, model: InterestModel, *, run_id: int, server_round: int | None, message_type: str,
    delta: float, epsilon_budget: float,
) -> None:
    """Keep the global model a message carried as the device's latest model, and the run's privacy settings."""
    state = {name: value.detach().contiguous() for name, value in model.state_dict().items()}
    meta = {"model_config": asdict(model.config), "run_id": str(run_id), "server_round": server_round, "message_type": message_type}
    with DeviceStore(store_path) as store:
        store.save_model("global", save_safetensors(state), meta)
        store.set_meta(META_DELTA, repr(float(delta)))
        store.set_meta(META_BUDGET, repr(float(epsilon_budget)))


def load_latest(store: DeviceStore) -> LoadedModel:
    """The device's most recently received model as a ranker; NoModelError when it has none."""
    stored = store.latest_model()
    if stored is None:
        raise NoModelError(
            f"{store.path}: the device has no model yet: install a bundle (`fedinterest device install-bundle`) "
            "or take part in a federated round (`fedinterest device start`)"
        )
    return _load(stored, store)


def _load(stored: StoredModel, store: DeviceStore) -> LoadedModel:
    if stored.kind == "bundle":
        bundle = read_bundle_bytes(stored.payload, source=f"{store.path}:bundle {stored.model_id}", expected_sha256=stored.sha256)
        description = {"kind": "bundle", "sha256": stored.sha256, "card": bundle.card, "received_at": stored.received_at}
        return LoadedModel(bundle.ranker, bundle.catalogue, stored.model_id, description)
    model = InterestModel(ModelConfig(**stored.meta["model_config"]))
    model.load_state_dict(load_safetensors(stored.payload))
    catalogue = store.catalogue()
    if len(catalogue) != model.config.num_items:
        raise ValueError(f"{store.path}: the stored global model has {model.config.num_items} items, the catalogue {len(catalogue)}")
    description = {
        "kind": "global", "sha256": stored.sha256, "run_id": stored.meta.get("run_id"),
        "server_round": stored.meta.get("server_round"), "message_type": stored.meta.get("message_type"),
        "received_at": stored.received_at,
    }
    return LoadedModel(TorchRanker(model), catalogue, stored.model_id, description)


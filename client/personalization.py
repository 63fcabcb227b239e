"""Personalization on the device: adapt a copy of the global model to the user's own history.

Before ranking, the device takes a few Adam steps on a *copy* of the received global
model, over the user's own (item, next item) windows (cut as training cuts them,
`common.examples.training_windows`; on a device, from its whole history), and ranks with the copy. The global model, the
model kept in the device store and everything a train or evaluate reply carries are
untouched: the copy never leaves the device, so it spends no privacy budget and needs
no accountant (docs/privacy.md, docs/device.md).

The adaptation runs with dropout off (eval mode), like the ranking after it: with a
handful of steps on one user's few windows dropout regularises nothing, and without it
the same history and model always give the same ranking, with no random numbers drawn
(so nothing here can shift the random stream a training round draws from either).

Defaults (DEFAULT_STEPS, DEFAULT_LR) were chosen on the validation item of Amazon Toys'
user-level-DP global model (benchmarks/personalization.py, docs/benchmarks.md
"personalization").
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from fedinterest.client.local_models import LoadedModel, TorchRanker

# The settings live apart, without torch, so the device CLI can name its defaults at import.
from fedinterest.client.personalization_settings import DEFAULT_LR, DEFAULT_STEPS, MAX_STEPS, PersonalizationSettings  # noqa: E402,F401
from fedinterest.common.examples import training_windows, trim_padding
from fedinterest.common.model import InterestModel, packed_sequence_loss


def personalized_model(model: InterestModel, history: np.ndarray, settings: PersonalizationSettings) -> InterestModel:
    """A copy of `model` adapted to `history` (item indices, oldest first), in eval mode, without gradients.

    `model` itself is never modified. A history of fewer than two items has no window
    (no (item, next item) pair) and gets an unadapted copy.
    """
    for _, adapted in adaptation_path(model, history, settings):  # noqa: B007 - walks the path to its end; the last copy is used below
        pass
    for param in adapted.parameters():
        param.requires_grad_(False)
    return adapted


def adaptation_path(model: InterestModel, history: np.ndarray, settings: PersonalizationSettings) -> Iterator[tuple[int, InterestModel]]:
    """(steps taken, the copy) before the first step and after each: the benchmark ranks along one path
    instead of adapting again from scratch for every step count. The same copy is yielded each time."""
    history = np.asarray(history)
    if history.ndim != 1 or (history.size and not np.issubdtype(history.dtype, np.integer)):
        raise ValueError(f"history must be a 1-D array of item indices, got shape {history.shape} dtype {history.dtype}")
    if history.size and (history.min() < 1 or history.max() > model.config.num_items):
        raise ValueError(f"history holds item indices outside the model's catalogue 1..{model.config.num_items}")
    adapted = _copy_parameters(model)
    yield 0, adapted
    inputs, targets = training_windows(history.astype(np.int64), model.config.max_len)
    if not len(inputs):
        return
    items, next_items = trim_padding(torch.from_numpy(inputs), torch.from_numpy(targets))
    optimizer = torch.optim.Adam(adapted.parameters(), lr=settings.lr)
    for step in range(1, settings.steps + 1):
        optimizer.zero_grad(set_to_none=True)
        # The packed loss has the dense loss's value and scores only real positions;
        # no per-example gradients are needed (no DP: nothing is released).
        packed_sequence_loss(adapted, items, next_items).backward()
        optimizer.step()
        yield step, adapted


def _copy_parameters(model: InterestModel) -> InterestModel:
    """A copy with its own storage for every parameter. Shared, because never written to: the buffers
    (the constant item -> attribute tables; torch cannot deep-copy their sparse CSR one) and the frozen
    config (copying its per-item attribute rows took most of the time)."""
    shared: dict[int, Any] = {id(buffer): buffer for buffer in model.buffers()}
    shared[id(model.config)] = model.config
    return copy.deepcopy(model, memo=shared).eval()


def personalize(loaded: LoadedModel, history: np.ndarray, settings: PersonalizationSettings) -> LoadedModel:
    """`loaded` with its ranker replaced by one adapted to `history`; the description says what was done.

    Only a received global model (ranked with the model code) can be adapted: an installed
    bundle is an ONNX graph without trainable weights, so it ranks unadapted, and the
    description says so.
    """
    if settings.steps == 0:
        return replace(loaded, description={**loaded.description, "personalization": {"steps": 0}})
    if not isinstance(loaded.ranker, TorchRanker):
        note = {"steps": 0, "note": f"a {loaded.description.get('kind', 'bundle')} cannot be adapted on the device; ranked unadapted"}
        return replace(loaded, description={**loaded.description, "personalization": note})
    adapted = personalized_model(loaded.ranker.model, history, settings)
    applied = {"steps": settings.steps, "lr": settings.lr}
    return replace(loaded, ranker=TorchRanker(adapted), description={**loaded.description, "personalization": applied})

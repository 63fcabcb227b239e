"""The local training loop shared by the centralized baseline and the device."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

import torch

from fedinterest.common.model import InterestModel

LossFn = Callable[[InterestModel, torch.Tensor, torch.Tensor], torch.Tensor]

# The model trained: an InterestModel, or the Opacus module wrapping one on the device.
M = TypeVar("M", bound=torch.nn.Module)


def train_epoch(
    model: M,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[M, torch.Tensor, torch.Tensor], torch.Tensor],
    after_step: Callable[[], None] | None = None,
) -> tuple[float, int]:
    """One pass over `batches`; returns the example-weighted mean loss and the step count."""
    model.train()
    total, examples, steps = 0.0, 0, 0
    for items, targets in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model, items, targets)
        # An empty batch (Poisson sampling can draw one) still goes through forward and
        # backward: Opacus's optimizer needs the zero-length per-sample gradients this
        # leaves, and its step is then the noise-only update the accountant counts. Its
        # loss is a mean over nothing (NaN); its gradients are zero, and it is not counted.
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()
        steps += 1
        if len(items):
            total += float(loss.detach()) * len(items)
            examples += len(items)
    return (total / examples if examples else float("nan")), steps

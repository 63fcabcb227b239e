"""The local training loop shared by the centralized baseline and the device."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from fedinterest.common.model import InterestModel

LossFn = Callable[[InterestModel, torch.Tensor, torch.Tensor], torch.Tensor]


def train_epoch(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn,
) -> tuple[float, int]:
    """One pass over `batches`; returns the example-weighted mean loss and the step count."""
    model.train()
    total, examples, steps = 0.0, 0, 0
    for items, targets in batches:
        if len(items) == 0:
            # Poisson sampling can draw an empty batch; Opacus still expects a step.
            optimizer.zero_grad(set_to_none=True)
            optimizer.step()
            steps += 1
            continue
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model, items, targets)
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * len(items)
        examples += len(items)
        steps += 1
    return (total / examples if examples else float("nan")), steps

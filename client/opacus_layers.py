"""Opacus's per-sample gradients for the model's own layer (common/model.py `ItemBias`).

Registered with Opacus's own registry, the way Opacus adds its layers: a sample's
gradient of a bias added to every position's catalogue scores is the sum of its
positions' output gradients. Imported by the device's training code before any
`make_private`, so Opacus covers every trainable parameter of every model variant.
"""

from __future__ import annotations

import torch
from opacus.grad_sample import register_grad_sampler
from opacus.utils.tensor_utils import sum_over_all_but_batch_and_last_n

from fedinterest.common.model import ItemBias


@register_grad_sampler(ItemBias)
def item_bias_grad_sample(layer: ItemBias, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict[torch.nn.Parameter, torch.Tensor]:
    """(B, ..., V) backprops -> (B, V) per-sample gradients of the bias."""
    return {layer.bias: sum_over_all_but_batch_and_last_n(backprops, 1)} if layer.bias.requires_grad else {}

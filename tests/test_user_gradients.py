"""The batched FedSGD updates of client/user_gradients.py against one autograd pass per user."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedinterest.client.user_gradients import fedsgd_user_updates
from fedinterest.common.examples import training_windows
from fedinterest.common.model import InterestModel, ModelConfig, sequence_loss

ITEMS, MAX_LEN = 30, 5


# Every item has 1-3 of 7 public attributes (common/model.py, item_vectors "attributes").
ATTRIBUTES = ((),) + tuple(tuple(sorted({1 + i % 7, 1 + (i * 3) % 7, 1 + (i // 5) % 7}))[: 1 + i % 3] for i in range(1, ITEMS + 1))
VARIANTS = {
    "free": {},
    "tied": dict(tie_item_vectors=True),
    "attributes": dict(item_vectors="attributes", item_attributes=ATTRIBUTES),
    "attributes-tied": dict(item_vectors="attributes", item_attributes=ATTRIBUTES, tie_item_vectors=True),
}


def _model(seed: int = 0, variant: str = "free") -> InterestModel:
    torch.manual_seed(seed)
    model = InterestModel(ModelConfig(num_items=ITEMS, max_len=MAX_LEN, dim=8, num_blocks=2, num_heads=2, dropout=0.0, **VARIANTS[variant]))
    if model.item_bias is not None:
        with torch.no_grad():
            model.item_bias.bias.normal_(0, 0.5)  # a bias that matters, so its gradient is tested
    return model


def _histories(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    # 1 item (no window), a short user, one window exactly, several windows (the unit is the user).
    lengths = [1, 3, 6, 12, 17, 2, 9, 4]
    return [rng.choice(np.arange(1, ITEMS + 1), size=n, replace=False) for n in lengths]


def _loop(model: InterestModel, histories: list[np.ndarray], lr: float) -> tuple[list[dict[str, torch.Tensor]], list[int]]:
    """Each user's update -lr * grad of its own loss, the way local training computes it."""
    updates, windows = [], []
    model.train()
    for history in histories:
        inputs, targets = training_windows(np.asarray(history), MAX_LEN)
        windows.append(len(inputs))
        model.zero_grad()
        if len(inputs) == 0:
            updates.append({n: torch.zeros_like(p) for n, p in model.named_parameters()})
            continue
        sequence_loss(model(torch.from_numpy(inputs)), torch.from_numpy(targets)).backward()
        updates.append({n: -lr * p.grad.clone() for n, p in model.named_parameters()})
    model.zero_grad()
    return updates, windows


def _norm(update: dict[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum(v.double().square().sum() for v in update.values())))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("clip", [0.05, 0.5, 100.0])
def test_clipped_sum_equals_clipping_each_user_alone(clip: float, variant: str) -> None:
    model, histories, lr = _model(variant=variant), _histories(), 0.7
    updates, _ = _loop(model, histories, lr)
    result = fedsgd_user_updates(model, histories, lr=lr, clip_norm=clip, chunk_rows=4)
    norms = [_norm(u) for u in updates]
    np.testing.assert_allclose(result.norms.numpy(), norms, rtol=1e-4, atol=1e-7)
    for name in result.total:
        expected = sum(u[name] * min(1.0, clip / n) if n > 0 else u[name] for u, n in zip(updates, norms))
        torch.testing.assert_close(result.total[name], expected, rtol=1e-4, atol=1e-6, msg=name)
    # The small clip norm really clips (so the test would catch a missing scale).
    assert clip > 1 or sum(n > clip for n in norms) >= 3


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_weighted_sum_equals_example_weighted_updates(variant: str) -> None:
    model, histories, lr = _model(1, variant), _histories(1), 1.0
    updates, windows = _loop(model, histories, lr)
    result = fedsgd_user_updates(model, histories, lr=lr, chunk_rows=3)
    assert result.windows.tolist() == windows
    assert result.norms is None
    for name in result.total:
        expected = sum(u[name] * w for u, w in zip(updates, windows))
        torch.testing.assert_close(result.total[name], expected, rtol=1e-4, atol=1e-6, msg=name)


def test_losses_are_each_users_loss_and_the_model_is_unchanged() -> None:
    model, histories = _model(2), _histories(2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = fedsgd_user_updates(model, histories, lr=1.0, clip_norm=1.0)
    for index, history in enumerate(histories):
        inputs, targets = training_windows(np.asarray(history), MAX_LEN)
        with torch.no_grad():
            expected = float(sequence_loss(model(torch.from_numpy(inputs)), torch.from_numpy(targets))) if len(inputs) else 0.0
        assert result.losses[index].item() == pytest.approx(expected, rel=1e-5, abs=1e-7)
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]) and param.requires_grad and param.grad is None

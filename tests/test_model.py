"""Model behaviour that does not involve Opacus."""

from __future__ import annotations

import pytest
import torch

from fedinterest.common.constants import PAD_ID
from fedinterest.common.model import InterestModel, ModelConfig, packed_sequence_loss, sequence_loss

CONFIG = ModelConfig(num_items=20, max_len=6, dim=8, num_blocks=1, num_heads=2, dropout=0.0)


def test_packed_loss_equals_dense_loss_and_its_gradient() -> None:
    torch.manual_seed(0)
    model = InterestModel(CONFIG)
    items = torch.tensor([[0, 0, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6], [0, 0, 0, 0, 0, 7]])
    targets = torch.tensor([[0, 0, 4, 5, 6, 7], [2, 3, 4, 5, 6, 7], [0, 0, 0, 0, 0, 0]])
    dense = sequence_loss(model(items), targets)
    dense.backward()
    dense_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    packed = packed_sequence_loss(model, items, targets)
    packed.backward()
    torch.testing.assert_close(packed, dense)
    for g_dense, p in zip(dense_grads, model.parameters()):
        torch.testing.assert_close(p.grad, g_dense, rtol=1e-5, atol=1e-7)


def test_causal_no_future_leak() -> None:
    """The score after position t does not depend on items after t."""
    torch.manual_seed(0)
    model = InterestModel(CONFIG).eval()
    a = torch.tensor([[0, 1, 2, 3, 4, 5]])
    b = torch.tensor([[0, 1, 2, 3, 9, 11]])
    torch.testing.assert_close(model(a)[:, :4], model(b)[:, :4])
    assert not torch.allclose(model(a)[:, 5], model(b)[:, 5])


def test_left_padding_does_not_change_the_prediction() -> None:
    torch.manual_seed(0)
    model = InterestModel(CONFIG).eval()
    short = torch.tensor([[3, 4, 5]])
    padded = torch.tensor([[PAD_ID, PAD_ID, PAD_ID, 3, 4, 5]])
    torch.testing.assert_close(model.score_last(short), model.score_last(padded), rtol=1e-5, atol=1e-6)


def test_history_longer_than_max_len_is_refused() -> None:
    model = InterestModel(CONFIG)
    with pytest.raises(ValueError, match="exceeds max_len=6"):
        model(torch.ones(1, 7, dtype=torch.long))


@pytest.mark.parametrize(
    "field,value", [("num_items", 0), ("max_len", 1), ("num_heads", 3), ("dropout", 1.0), ("num_blocks", 0)]
)
def test_invalid_config_is_named(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        ModelConfig(**{**CONFIG.__dict__, field: value})


def test_sampled_loss_matches_a_manual_computation() -> None:
    from fedinterest.common.model import sampled_sequence_loss

    torch.manual_seed(0)
    model = InterestModel(CONFIG)
    items = torch.tensor([[0, 3, 4], [1, 2, 3]])
    targets = torch.tensor([[0, 4, 5], [2, 3, 4]])
    torch.manual_seed(7)
    loss = sampled_sequence_loss(model, items, targets, num_negatives=6)
    torch.manual_seed(7)
    negatives = torch.randint(1, CONFIG.num_items + 1, (6,))
    hidden = model.encode(items)
    per_example = []
    for b in range(2):
        terms = []
        for t in range(3):
            if targets[b, t] == PAD_ID:
                continue
            scores = model.head(hidden[b, t])
            competing = [scores[targets[b, t]]] + [scores[n] for n in negatives if n != targets[b, t]]
            terms.append(-torch.log_softmax(torch.stack(competing), dim=0)[0])
        per_example.append(torch.stack(terms).mean())
    torch.testing.assert_close(loss, torch.stack(per_example).mean())

"""The model is fit for Opacus: validator passes, per-sample gradients are exact, padding is inert."""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator

from fedinterest.common.constants import PAD_ID
from fedinterest.common.model import InterestModel, ModelConfig, sequence_loss

CONFIG = ModelConfig(num_items=30, max_len=8, dim=16, num_blocks=2, num_heads=2, dropout=0.0)


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(1, CONFIG.num_items + 1, (5, CONFIG.max_len), generator=g)
    targets = torch.randint(1, CONFIG.num_items + 1, (5, CONFIG.max_len), generator=g)
    # Different amounts of left padding per example, as real windows have.
    for row, pad in enumerate([0, 1, 3, 5, 7]):
        items[row, :pad] = PAD_ID
        targets[row, :pad] = PAD_ID
    return items, targets


def test_module_validator_finds_nothing() -> None:
    model = InterestModel(CONFIG)
    assert ModuleValidator.validate(model, strict=False) == []


def test_every_parameter_is_covered_by_per_sample_gradients() -> None:
    model = GradSampleModule(InterestModel(CONFIG))
    items, targets = _batch()
    sequence_loss(model(items), targets).backward()
    for name, param in model.named_parameters():
        assert param.grad_sample is not None, f"no per-sample gradient for {name}"
        assert param.grad_sample.shape == (items.shape[0], *param.shape)


@pytest.mark.parametrize("mode", ["hooks", "ew"])
def test_per_sample_gradients_equal_one_example_at_a_time(mode: str) -> None:
    torch.manual_seed(0)
    reference = InterestModel(CONFIG)
    model = InterestModel(CONFIG)
    model.load_state_dict(reference.state_dict())
    items, targets = _batch()

    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", force_functorch=False) if mode == "hooks" else None
    if mode == "ew":
        from opacus.grad_sample import GradSampleModuleExpandedWeights

        gsm = GradSampleModuleExpandedWeights(model, batch_first=True, loss_reduction="mean")
    sequence_loss(gsm(items), targets).backward()
    per_sample = {n.removeprefix("_module."): p.grad_sample.clone() for n, p in gsm.named_parameters()}

    batch = items.shape[0]
    for b in range(batch):
        reference.zero_grad()
        # With loss_reduction="mean" Opacus undoes the batch mean: grad_sample[b] is the
        # gradient of example b's own loss.
        sequence_loss(reference(items[b : b + 1]), targets[b : b + 1]).backward()
        for name, param in reference.named_parameters():
            torch.testing.assert_close(per_sample[name][b], param.grad, rtol=1e-4, atol=1e-6, msg=f"{name}, example {b}")


def test_padding_contributes_nothing() -> None:
    """Adding more left padding changes neither outputs at real positions nor any gradient."""
    torch.manual_seed(1)
    model = GradSampleModule(InterestModel(CONFIG))
    items = torch.tensor([[0, 0, 0, 4, 5, 6, 7, 8]])
    targets = torch.tensor([[0, 0, 0, 5, 6, 7, 8, 9]])
    sequence_loss(model(items), targets).backward()
    grads = {n: p.grad_sample.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.grad_sample = None
    # Same real items, but a different padding token *value* at padded positions would be
    # wrong input; instead compare against a short sequence padded further on a longer window.
    wide = InterestModel(ModelConfig(**{**CONFIG.__dict__, "max_len": 12}))
    state = model._module.state_dict()
    wide_state = wide.state_dict()
    for key, value in state.items():
        if key == "pos_emb.weight":
            wide_state[key][: value.shape[0]] = value
        else:
            wide_state[key] = value
    wide.load_state_dict(wide_state)
    wide_gsm = GradSampleModule(wide)
    wide_items = torch.cat([torch.zeros(1, 4, dtype=torch.long), items], dim=1)
    wide_targets = torch.cat([torch.zeros(1, 4, dtype=torch.long), targets], dim=1)
    sequence_loss(wide_gsm(wide_items), wide_targets).backward()
    for name, param in wide_gsm.named_parameters():
        short_name = name.removeprefix("_module.")
        if short_name == "pos_emb.weight":
            torch.testing.assert_close(param.grad_sample[0, :8], grads["_module." + short_name][0], rtol=1e-4, atol=1e-7)
            assert torch.count_nonzero(param.grad_sample[0, 8:]) == 0
        else:
            torch.testing.assert_close(param.grad_sample[0], grads["_module." + short_name][0], rtol=1e-4, atol=1e-7)
    # The padding row of the item table never receives gradient.
    assert torch.count_nonzero(grads["_module.item_emb.weight"][0, PAD_ID]) == 0


# --- the item-vector variants: tied head, attribute vectors (common/model.py) --------------

import fedinterest.client.opacus_layers  # noqa: E402,F401 -- registers ItemBias with Opacus

# Every item has 1-3 of 7 attributes; items 29 and 30 share item 28's attributes.
ATTRIBUTES = ((),) + tuple(tuple(sorted({1 + i % 7, 1 + (i * 3) % 7, 1 + (i // 5) % 7}))[: 1 + i % 3] for i in range(1, 28)) + ((2, 5),) * 3
VARIANTS = {
    "tied": dict(tie_item_vectors=True),
    "attributes": dict(item_vectors="attributes", item_attributes=ATTRIBUTES),
    "attributes-tied": dict(item_vectors="attributes", item_attributes=ATTRIBUTES, tie_item_vectors=True),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_item_vector_variants_get_exact_per_sample_gradients(variant: str) -> None:
    config = ModelConfig(**{**CONFIG.__dict__, **VARIANTS[variant]})
    torch.manual_seed(0)
    reference, model = InterestModel(config), InterestModel(config)
    model.load_state_dict(reference.state_dict())
    assert ModuleValidator.validate(model, strict=False) == []
    items, targets = _batch()
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    sequence_loss(gsm(items), targets).backward()
    per_sample = {n.removeprefix("_module."): p.grad_sample.clone() for n, p in gsm.named_parameters()}
    assert set(per_sample) == {n for n, _ in reference.named_parameters()}
    for b in range(items.shape[0]):
        reference.zero_grad()
        sequence_loss(reference(items[b : b + 1]), targets[b : b + 1]).backward()
        for name, param in reference.named_parameters():
            # A tied table's gradient is the sum of its uses as embedding and as head: Opacus adds both up.
            torch.testing.assert_close(per_sample[name][b], param.grad, rtol=1e-4, atol=1e-6, msg=f"{variant} {name}, example {b}")


def test_a_tied_head_is_one_parameter_kept_once_in_the_state_dict() -> None:
    model = InterestModel(ModelConfig(**{**CONFIG.__dict__, "tie_item_vectors": True}))
    assert model.head.weight is model.item_emb.weight
    state = model.state_dict()
    assert "head.weight" not in state and "item_emb.weight" in state and "head.bias" in state
    other = InterestModel(ModelConfig(**{**CONFIG.__dict__, "tie_item_vectors": True}))
    other.load_state_dict(state)
    assert torch.equal(other.head.weight, state["item_emb.weight"]) and other.head.weight is other.item_emb.weight


def test_attribute_vectors_score_items_by_their_attributes_mean() -> None:
    config = ModelConfig(**{**CONFIG.__dict__, **VARIANTS["attributes"]})
    model = InterestModel(config).eval()
    with torch.no_grad():
        model.item_bias.bias.normal_()
        hidden = torch.randn(3, config.dim)
        scores = model.scores(hidden)
        for item in (1, 17, 30):
            attrs = list(ATTRIBUTES[item])
            expected = (hidden @ model.head.weight[attrs].T).mean(dim=1) + model.item_bias.bias[item]
            torch.testing.assert_close(scores[:, item], expected, rtol=1e-5, atol=1e-6)
        # Items 29 and 30 share their attributes: only the per-item bias tells them apart.
        torch.testing.assert_close(scores[:, 29] - model.item_bias.bias[29], scores[:, 30] - model.item_bias.bias[30])
    params = sum(p.numel() for p in model.parameters())
    free = sum(p.numel() for p in InterestModel(CONFIG).parameters())
    assert params < free  # 8 attribute rows instead of 31 item rows, in and out


def test_attribute_configs_are_checked() -> None:
    with pytest.raises(ValueError, match="one row per item"):
        ModelConfig(**{**CONFIG.__dict__, "item_vectors": "attributes", "item_attributes": ATTRIBUTES[:-1]})
    with pytest.raises(ValueError, match="items \\[3\\] have none"):
        ModelConfig(**{**CONFIG.__dict__, "item_vectors": "attributes", "item_attributes": ATTRIBUTES[:3] + ((),) + ATTRIBUTES[4:]})
    with pytest.raises(ValueError, match="only for item_vectors"):
        ModelConfig(**{**CONFIG.__dict__, "item_attributes": ATTRIBUTES})

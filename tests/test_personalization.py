"""Personalization on the device: it changes the device's own ranking, never the global model or a reply."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from device_helpers import TINY_RUN, make_device, message, store_context, tiny_run, user_rows, write_csv
from typer.testing import CliRunner

from fedinterest.client.app import app as client_app
from fedinterest.client.device_cli import app as device_app
from fedinterest.client.ingest import ingest_file
from fedinterest.client.local_models import load_latest, save_global_model
from fedinterest.client.personalization import PersonalizationSettings, personalize, personalized_model
from fedinterest.client.recommend import recommend
from fedinterest.common import wire
from fedinterest.common.examples import history_batch, training_windows
from fedinterest.common.model import InterestModel, ModelConfig, sequence_loss

NUM_ITEMS = 30
HISTORY = [f"m{i}" for i in (3, 9, 1, 22, 17, 5, 8, 30, 2, 11, 14, 6, 25, 19, 27, 4, 21, 16, 7)]
# Every item has 1-3 of 7 attributes (as tests/test_model_dp.py builds them).
ATTRIBUTES = ((),) + tuple(tuple(sorted({1 + i % 7, 1 + (i * 3) % 7, 1 + (i // 5) % 7}))[: 1 + i % 3] for i in range(1, NUM_ITEMS + 1))
VARIANTS = {
    "free": {},
    "tied": dict(tie_item_vectors=True),
    "attributes": dict(item_vectors="attributes", item_attributes=ATTRIBUTES),
}
# Large enough that a tiny model's ranking visibly moves in a few steps.
STRONG = PersonalizationSettings(steps=10, lr=0.05)


def _model(variant: str, seed: int = 0) -> InterestModel:
    torch.manual_seed(seed)
    config = ModelConfig(num_items=NUM_ITEMS, **{k: v for k, v in TINY_RUN.items() if k != "batch_size"}, **VARIANTS[variant])
    return InterestModel(config).eval()


def _scores(model: InterestModel, history: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return model.score_last(history_batch([history], model.config.max_len))[0]


def _history_loss(model: InterestModel, history: np.ndarray) -> float:
    inputs, targets = training_windows(history, model.config.max_len)
    with torch.no_grad():
        return float(sequence_loss(model(torch.from_numpy(inputs)), torch.from_numpy(targets)))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_the_adapted_copy_ranks_differently_and_the_global_model_is_bit_identical(variant: str) -> None:
    model = _model(variant)
    history = np.array([3, 9, 1, 22, 17, 5, 8, 30, 2, 11], dtype=np.int64)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    global_scores = _scores(model, history)

    adapted = personalized_model(model, history, STRONG)

    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[name], before[name]) for name in before), "personalization wrote to the global model"
    assert all(p.requires_grad for p in model.parameters()) and not model.training
    assert not adapted.training and not any(p.requires_grad for p in adapted.parameters())
    adapted_scores = _scores(adapted, history)
    assert not torch.allclose(adapted_scores, global_scores)
    # Adapted towards the user's own sequence: its (item, next item) pairs are likelier than under the global model.
    assert _history_loss(adapted, history) < _history_loss(model, history)
    assert torch.equal(_scores(model, history), global_scores)
    # Deterministic: the same model and history give the same adapted ranking (no dropout, no random draws).
    assert torch.equal(_scores(personalized_model(model, history, STRONG), history), adapted_scores)


def test_zero_steps_or_no_window_ranks_as_the_global_model() -> None:
    model = _model("free")
    history = np.array([3, 9, 1, 22], dtype=np.int64)
    assert torch.equal(_scores(personalized_model(model, history, PersonalizationSettings(steps=0)), history), _scores(model, history))
    single = np.array([5], dtype=np.int64)  # one item: no (item, next item) pair to adapt on
    assert torch.equal(_scores(personalized_model(model, single, STRONG), single), _scores(model, single))


def _device(tmp_path: Path, name: str):
    device = make_device(tmp_path, num_items=NUM_ITEMS, name=name)
    with device.store() as store:
        ingest_file(store, write_csv(tmp_path / f"{name}.csv", user_rows("u1", HISTORY)))
    return device


def _train_reply(device, run, model: InterestModel, server_round: int):
    reply = client_app(message("train", model, {wire.SERVER_ROUND: server_round}), store_context(device.store_path, run))
    assert not reply.has_error(), reply.error
    return reply.content


def _stored_model(device) -> tuple[str, bytes]:
    with device.store() as store:
        stored = store.latest_model()
        return stored.sha256, stored.payload


def test_a_train_reply_is_identical_whether_the_device_personalizes_or_not(tmp_path: Path) -> None:
    """Two devices with the same user: one ranks personalized between rounds, one does not. What they
    send (arrays, every metric), what they keep as the received model and their privacy ledgers agree."""
    # research-noise-seed: DP noise and sampling reproducible (research only), so that the two devices'
    # replies can be compared bit for bit; everything else is the real device path (store, policy, ledger).
    run = tiny_run(NUM_ITEMS, noise_multiplier=1.0, epsilon_budget=100.0, research_noise_seed=3)
    personalizing, plain = _device(tmp_path, "personalizing"), _device(tmp_path, "plain")
    torch.manual_seed(0)
    first_global = InterestModel(run.model_config(NUM_ITEMS))
    replies = {}
    for name, device, settings in (("personalizing", personalizing, STRONG), ("plain", plain, PersonalizationSettings(steps=0))):
        first = _train_reply(device, run, first_global, server_round=1)
        sha_before, payload_before = _stored_model(device)
        with device.store() as store:
            ranked = [recommend(store, 5, personalization=settings) for _ in range(2)]
        assert _stored_model(device) == (sha_before, payload_before), "personalization changed the stored global model"
        second_global = InterestModel(run.model_config(NUM_ITEMS))
        second_global.load_state_dict(first[wire.ARRAYS].to_torch_state_dict())
        second = _train_reply(device, run, second_global, server_round=2)
        replies[name] = (first, second, ranked, _stored_model(device))

    personal_ranking, plain_ranking = replies["personalizing"][2][0], replies["plain"][2][0]
    assert personal_ranking.items != plain_ranking.items, "the personalized ranking should differ (else the test proves nothing)"
    assert personal_ranking.model["personalization"] == {"steps": STRONG.steps, "lr": STRONG.lr}
    for index in (0, 1):
        sent, reference = replies["personalizing"][index], replies["plain"][index]
        assert list(sent.array_records) == list(reference.array_records) == [wire.ARRAYS]
        arrays, expected = sent[wire.ARRAYS].to_numpy_ndarrays(), reference[wire.ARRAYS].to_numpy_ndarrays()
        assert len(arrays) == len(expected) and all(np.array_equal(a, b) for a, b in zip(arrays, expected))
        assert dict(sent[wire.METRICS]) == dict(reference[wire.METRICS])
    assert replies["personalizing"][3] == replies["plain"][3]  # the received model kept for ranking


def test_recommend_adapts_a_copy_and_leaves_the_stored_model_alone(tmp_path: Path) -> None:
    device = _device(tmp_path, "device")
    model = _model("free")
    save_global_model(device.store_path, model, run_id=1, server_round=1, message_type="train", delta=1e-5, epsilon_budget=8.0)
    with device.store() as store:
        loaded = load_latest(store)
        history = store.history(loaded.catalogue).indices
        adapted = personalize(loaded, history, STRONG)
        reloaded = load_latest(store)
    assert adapted.ranker.model is not loaded.ranker.model
    assert np.array_equal(loaded.ranker.scores(history), reloaded.ranker.scores(history))
    assert not np.array_equal(adapted.ranker.scores(history), loaded.ranker.scores(history))


@pytest.mark.parametrize("bad", [{"steps": -1}, {"steps": 2.5}, {"steps": True}, {"steps": 10**6}, {"lr": 0.0}, {"lr": float("nan")}])
def test_bad_settings_are_clear_errors(bad: dict) -> None:
    with pytest.raises(ValueError, match="personalization (steps|learning rate)"):
        PersonalizationSettings(**bad)


def test_the_cli_refuses_negative_steps_with_a_clear_error(tmp_path: Path) -> None:
    device = _device(tmp_path, "device")
    result = CliRunner().invoke(device_app, ["recommend", "--dir", str(device.root), "--personalize-steps", "-1"])
    assert result.exit_code == 2
    assert "personalization steps must be an integer from 0 (off)" in result.output + (result.stderr or "")


def test_a_history_outside_the_catalogue_is_refused() -> None:
    with pytest.raises(ValueError, match="outside the model's catalogue"):
        personalized_model(_model("free"), np.array([1, NUM_ITEMS + 1]), STRONG)

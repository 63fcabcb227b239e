"""The device side with real Opacus and a real ClientApp: DP invariants, accounting, refusal, replies."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import DEFAULT_TTL, ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict
from opacus.accountants import RDPAccountant
from torch.utils.data import DataLoader, TensorDataset

from fedinterest.client.app import app
from fedinterest.client.data_source import load_device_data
from fedinterest.client.ledger import PrivacyLedger
from fedinterest.client.local_evaluation import evaluate_locally
from fedinterest.client.local_training import _poisson_loader, _prepare_private, _prepare_sampling, train_locally
from fedinterest.common import wire
from fedinterest.common.datasets import DatasetSpec, load_split
from fedinterest.common.evaluation import model_ranks
from fedinterest.common.examples import stack_windows, training_windows
from fedinterest.common.metrics import hit_rate, ndcg
from fedinterest.common.model import InterestModel, ModelConfig, sequence_loss
from fedinterest.common.run_config import RunConfig
from fedinterest.common.split import UserSplit
from fedinterest.common.synthetic import SyntheticConfig
from fedinterest.common.training import train_epoch

torch.set_num_threads(1)
DELTA = 1e-5
LOSS = lambda m, x, y: sequence_loss(m(x), y)  # noqa: E731


@pytest.fixture(scope="module")
def split():
    return load_split(DatasetSpec(synthetic=SyntheticConfig(num_users=20, num_items=60, min_length=8, max_length=15, seed=0)))


@pytest.fixture(scope="module")
def windows(split) -> tuple[torch.Tensor, torch.Tensor]:
    """About ten windows of several users, with different amounts of padding."""
    return stack_windows([u.train for u in split.users[:8]], 10)


def _model(num_items: int, seed: int = 0) -> InterestModel:
    torch.manual_seed(seed)
    return InterestModel(ModelConfig(num_items=num_items, max_len=10, dim=8, num_blocks=1, dropout=0.0))


def _run(**overrides) -> RunConfig:
    base = dict(max_len=10, dim=8, num_blocks=1, dropout=0.0, batch_size=1, local_epochs=1, delta=DELTA)
    return RunConfig(**{**base, **overrides})


def _two_window_user(split) -> UserSplit:
    user = next(u for u in split.users if len(training_windows(u.train, 10)[0]) == 2)
    return user


def _fixed(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> DataLoader:
    """Fixed batches in order (unit tests of the DP step; training samples with Poisson)."""
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


# --- DP invariants (Opacus's own test style) -------------------------------------------


def test_no_noise_no_clipping_equals_plain_training(split, windows) -> None:
    x, y = windows
    plain, private = _model(split.num_items), _model(split.num_items)
    optimizer = torch.optim.Adam(plain.parameters(), lr=1e-3)
    train_epoch(plain, [(x, y)], optimizer, LOSS)

    prepared = _prepare_private(
        model=private, loader=_fixed(x, y, len(x)), expected_batch_size=len(x), lr=1e-3, noise_multiplier=0.0,
        max_grad_norm=1e6, generator=None,
    )
    _, steps = train_epoch(prepared.module, prepared.loader, prepared.optimizer, LOSS)
    assert steps == 1
    before = _model(split.num_items).state_dict()
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(private.state_dict()[name], value, rtol=0, atol=1e-6, msg=name)
    assert any(not torch.equal(plain.state_dict()[n], before[n]) for n in before)


def test_per_window_gradients_are_clipped(split, windows) -> None:
    x, y = windows
    clip = 1e-3
    # One window: the update is that window's gradient scaled to norm `clip`.
    reference = _model(split.num_items)
    LOSS(reference, x[:1], y[:1]).backward()
    raw = _flat(p.grad for p in reference.parameters())
    assert raw.norm() > 10 * clip  # clipping really bites

    model = _model(split.num_items)
    prepared = _prepare_private(
        model=model, loader=_fixed(x[:1], y[:1], 1), expected_batch_size=1, lr=1e-3, noise_multiplier=0.0,
        max_grad_norm=clip, generator=None,
    )
    train_epoch(prepared.module, prepared.loader, prepared.optimizer, LOSS)
    clipped = _flat(p.grad for p in prepared.optimizer.params)
    assert clipped.norm() == pytest.approx(clip, rel=1e-3)
    torch.testing.assert_close(clipped / clipped.norm(), raw / raw.norm(), rtol=0, atol=1e-5)

    # A batch: every window contributes at most `clip`, so the mean update is at most `clip`.
    model = _model(split.num_items)
    prepared = _prepare_private(
        model=model, loader=_fixed(x, y, len(x)), expected_batch_size=len(x), lr=1e-3, noise_multiplier=0.0,
        max_grad_norm=clip, generator=None,
    )
    train_epoch(prepared.module, prepared.loader, prepared.optimizer, LOSS)
    per_window = torch.stack([p.grad_sample.reshape(len(x), -1).norm(dim=1) for p in prepared.optimizer.params], 1).norm(dim=1)
    assert (per_window > clip).all()
    update = _flat(p.grad for p in prepared.optimizer.params)
    assert update.norm() <= clip * (1 + 1e-4)
    summed = _flat(p.summed_grad for p in prepared.optimizer.params)
    assert summed.norm() <= len(x) * clip * (1 + 1e-4)


def test_noise_has_the_configured_scale_on_every_parameter(split, windows) -> None:
    x, y = windows
    sigma, clip = 2.0, 0.5
    model = _model(split.num_items)
    prepared = _prepare_private(
        model=model, loader=_fixed(x, y, len(x)), expected_batch_size=len(x), lr=1e-3, noise_multiplier=sigma,
        max_grad_norm=clip, generator=torch.Generator().manual_seed(0),
    )
    # Zero gradient signal: whatever reaches the optimizer is Opacus's noise, scaled by 1/B.
    train_epoch(prepared.module, prepared.loader, prepared.optimizer, lambda m, a, b: 0.0 * LOSS(m, a, b))
    noise = _flat(p.grad for p in prepared.optimizer.params)
    expected = sigma * clip / prepared.optimizer.expected_batch_size
    assert prepared.optimizer.expected_batch_size == len(x)
    assert noise.numel() > 1500
    assert noise.std().item() == pytest.approx(expected, rel=0.1)
    assert abs(noise.mean().item()) < 4 * expected / math.sqrt(noise.numel())
    # Every row of the item table is noised, touched or not.
    item_rows = prepared.module._module.item_emb.weight.grad
    assert (item_rows.abs().sum(dim=1) > 0).all()


def test_sgd_steps_by_the_learning_rate_times_the_private_gradient(split, windows) -> None:
    x, y = windows
    lr = 0.5
    results = {}
    for name in ("sgd", "adam"):
        model = _model(split.num_items)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        prepared = _prepare_private(
            model=model, loader=_fixed(x, y, len(x)), expected_batch_size=len(x), lr=lr, optimizer=name, noise_multiplier=1.0,
            max_grad_norm=1.0, generator=torch.Generator().manual_seed(0),
        )
        train_epoch(prepared.module, prepared.loader, prepared.optimizer, LOSS)
        step = _flat(p.detach() - before[n] for n, p in model.named_parameters())
        results[name] = (step, _flat(p.grad for p in prepared.optimizer.params))
    step, private_grad = results["sgd"]
    torch.testing.assert_close(step, -lr * private_grad, rtol=1e-5, atol=1e-7)
    # Adam's first step moves every noised coordinate by about the whole learning rate.
    step, private_grad = results["adam"]
    assert step.abs().median().item() == pytest.approx(lr, rel=0.01)
    assert (-lr * private_grad).abs().median().item() < lr / 5


def test_an_unknown_local_optimizer_is_refused() -> None:
    with pytest.raises(ValueError, match="local-optimizer must be one of adam, sgd"):
        _run(local_optimizer="rmsprop")


def test_an_empty_poisson_batch_is_a_noise_only_step(split, windows) -> None:
    x, y = windows
    model = _model(split.num_items)
    sampling = _prepare_sampling(num_windows=len(x), batch_size=4, local_epochs=1)
    prepared = _prepare_private(
        model=model, loader=_poisson_loader(TensorDataset(x, y), sampling, max_len=10, generator=torch.Generator().manual_seed(0)),
        expected_batch_size=sampling.expected_batch_size, lr=1e-3, noise_multiplier=1.0,
        max_grad_norm=1.0, generator=torch.Generator().manual_seed(0),
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    empty = (x[:0], y[:0])
    loss, steps = train_epoch(prepared.module, [empty, (x[:2], y[:2]), empty], prepared.optimizer, LOSS)
    assert steps == 3 and math.isfinite(loss)
    assert prepared.engine.accountant.history == [(1.0, sampling.sample_rate, 3)]
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())


# --- the front door: accounting, refusal, modes ----------------------------------------


def test_epsilon_is_opacus_rdp_and_grows_with_rounds(split) -> None:
    user = _two_window_user(split)
    run = _run(noise_multiplier=1.0, epsilon_budget=20.0, dp_windows=2)  # batch 1: q = 0.5, 2 steps a round
    ledger = PrivacyLedger(":memory:")
    model = _model(split.num_items)
    figures = []
    for server_round in (1, 2, 3):
        result = train_locally(model=model, train_history=user.train, run=run, ledger=ledger, run_id=1, server_round=server_round)
        assert not result.refused and result.num_examples == 1 and result.state_dict is not None  # weight 1: W stays private
        figures.append(result.epsilon)
    accountant = RDPAccountant()
    accountant.history = [(1.0, 0.5, 6)]
    assert figures[-1] == pytest.approx(accountant.get_epsilon(DELTA), rel=1e-9)
    assert figures == pytest.approx([5.3770215, 7.4097336, 8.9817377], rel=1e-6)
    assert ledger.history() == [(1.0, 0.5, 2)] * 3


def test_a_device_at_its_budget_refuses_without_training(split) -> None:
    user = _two_window_user(split)
    run = _run(noise_multiplier=1.0, epsilon_budget=6.0, dp_windows=2)  # round 1: 5.38, round 2 would be 7.41
    ledger = PrivacyLedger(":memory:")
    model = _model(split.num_items)
    first = train_locally(model=model, train_history=user.train, run=run, ledger=ledger, run_id=1, server_round=1)
    assert not first.refused
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    second = train_locally(model=model, train_history=user.train, run=run, ledger=ledger, run_id=1, server_round=2)
    assert second.refused and second.state_dict is None and second.num_examples == 0 and second.train_loss == 0.0
    assert second.epsilon == pytest.approx(first.epsilon) == pytest.approx(5.3770215, rel=1e-6)
    assert len(ledger.entries()) == 1
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_a_retried_round_is_not_trained_or_charged_twice(split) -> None:
    user = _two_window_user(split)
    run = _run(noise_multiplier=1.0)
    ledger = PrivacyLedger(":memory:")
    model = _model(split.num_items)
    first = train_locally(model=model, train_history=user.train, run=run, ledger=ledger, run_id=1, server_round=4)
    again = train_locally(model=model, train_history=user.train, run=run, ledger=ledger, run_id=1, server_round=4)
    assert again.refused and again.state_dict is None and again.epsilon == first.epsilon
    assert len(ledger.entries()) == 1


def test_a_device_without_windows_replies_empty_without_dp(split) -> None:
    user = UserSplit(user=0, train=np.array([5]), valid=6, test=7)
    run = _run(noise_multiplier=0.0)
    result = train_locally(model=_model(split.num_items), train_history=user.train, run=run, ledger=PrivacyLedger(":memory:"), run_id=1, server_round=1)
    assert (result.state_dict, result.num_examples, result.train_loss, result.epsilon, result.refused) == (None, 0, 0.0, 0.0, False)


def test_dp_off_trains_plainly_and_reports_infinite_epsilon(split) -> None:
    user = _two_window_user(split)
    ledger = PrivacyLedger(":memory:")
    model = _model(split.num_items)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train_locally(model=model, train_history=user.train, run=_run(noise_multiplier=0.0), ledger=ledger, run_id=1, server_round=1)
    assert not result.refused and result.epsilon == float("inf") and result.num_examples == 2
    assert set(result.state_dict) == set(before)  # plain names, no Opacus prefix
    assert any(not torch.equal(result.state_dict[k], before[k]) for k in before)
    # The ledger remembers that this device's data has no guarantee any more.
    assert ledger.epsilon(DELTA) == float("inf")


@pytest.mark.parametrize("noise_multiplier", [0.0, 1.0])
def test_fedprox_proximal_step_pulls_towards_the_global_weights(split, noise_multiplier: float) -> None:
    """With lr * mu = 1 the proximal step undoes every local step; with mu = 0 nothing pulls back."""
    user = _two_window_user(split)
    run = _run(noise_multiplier=noise_multiplier, local_lr=0.01)
    model = _model(split.num_items)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pulled = train_locally(model=model, train_history=user.train, run=run, ledger=PrivacyLedger(":memory:"), run_id=1, server_round=1, proximal_mu=100.0)
    for name, value in before.items():
        torch.testing.assert_close(pulled.state_dict[name], value)
    free = train_locally(model=_model(split.num_items), train_history=user.train, run=run, ledger=PrivacyLedger(":memory:"), run_id=1, server_round=1, proximal_mu=0.0)
    assert any(not torch.equal(free.state_dict[k], before[k]) for k in before)
    with pytest.raises(ValueError, match="proximal_mu"):
        train_locally(model=_model(split.num_items), train_history=user.train, run=run, ledger=PrivacyLedger(":memory:"), run_id=1, server_round=1, proximal_mu=-1.0)


def test_state_dict_has_plain_names_and_opacus_hooks_are_gone(split) -> None:
    user = _two_window_user(split)
    model = _model(split.num_items)
    result = train_locally(model=model, train_history=user.train, run=_run(), ledger=PrivacyLedger(":memory:"), run_id=1, server_round=1)
    assert set(result.state_dict) == set(_model(split.num_items).state_dict())
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    _model(split.num_items).load_state_dict(result.state_dict)


# --- the ClientApp, called with real Flower messages -----------------------------------

HANDLER_RUN = dict(synthetic_users=20, synthetic_items=160, max_len=10, dim=8, num_blocks=1, dropout=0.0, batch_size=4)


def _context(run: RunConfig, partition: int = 0, state: RecordDict | None = None) -> Context:
    return Context(
        run_id=7, node_id=100 + partition, node_config={"partition-id": partition, "num-partitions": 20},
        state=state if state is not None else RecordDict(), run_config=run.to_flower(),
    )


def _message(kind: str, model: InterestModel, config: dict) -> Message:
    metadata = Metadata(
        run_id=7, message_id=f"{kind}-{time.monotonic_ns()}", src_node_id=1, dst_node_id=100, reply_to_message_id="",
        group_id="1", created_at=time.time(), ttl=DEFAULT_TTL, message_type=kind,
    )
    content = RecordDict({wire.ARRAYS: ArrayRecord(model.state_dict()), wire.CONFIG: ConfigRecord(config)})
    return Message(content, metadata=metadata)


def _global_model(run: RunConfig) -> InterestModel:
    num_items = load_device_data({"partition-id": 0}, run).num_items
    torch.manual_seed(0)
    return InterestModel(run.model_config(num_items))


def test_train_reply_holds_exactly_the_model_and_the_wire_metrics(tmp_path: Path) -> None:
    run = RunConfig(**HANDLER_RUN, run_dir=str(tmp_path))
    model = _global_model(run)
    reply = app(_message("train", model, {wire.SERVER_ROUND: 1}), _context(run))
    assert not reply.has_error()
    content = reply.content
    assert list(content.array_records) == [wire.ARRAYS] and list(content.metric_records) == [wire.METRICS]
    assert not content.config_records
    metrics = content.metric_records[wire.METRICS]
    assert tuple(metrics) == wire.TRAIN_REPLY_METRICS
    assert metrics[wire.REFUSED] == 0 and metrics[wire.NUM_USERS] == 1 and metrics[wire.NUM_EXAMPLES] >= 1 and 0 < metrics[wire.EPSILON][0] < run.epsilon_budget
    new_state = content.array_records[wire.ARRAYS].to_torch_state_dict()
    assert set(new_state) == set(model.state_dict())
    assert (tmp_path / "devices" / "partition-0.sqlite").is_file()


def test_train_handler_refuses_at_budget_with_metrics_only() -> None:
    run = RunConfig(**HANDLER_RUN, epsilon_budget=0.5)  # one round of DP-SGD costs more than this
    reply = app(_message("train", _global_model(run), {wire.SERVER_ROUND: 1}), _context(run))
    assert not reply.has_error()
    assert not reply.content.array_records
    metrics = reply.content.metric_records[wire.METRICS]
    assert tuple(metrics) == wire.TRAIN_REPLY_METRICS
    assert dict(metrics) == {wire.NUM_EXAMPLES: 0, wire.NUM_USERS: 0, wire.EPSILON: [0.0], wire.REFUSED: 1}


def test_in_memory_ledger_survives_rounds_in_context_state() -> None:
    run = RunConfig(**HANDLER_RUN)  # no run_dir: the ledger lives in Context.state
    model = _global_model(run)
    context = _context(run, partition=1)
    epsilons = []
    for server_round in (1, 2):
        reply = app(_message("train", model, {wire.SERVER_ROUND: server_round}), context)
        epsilons.append(reply.content.metric_records[wire.METRICS][wire.EPSILON][0])
    assert 0 < epsilons[0] < epsilons[1]


@pytest.mark.parametrize("stage", ["valid", "test", None])
def test_evaluate_reply_equals_model_ranks(stage: str | None) -> None:
    run = RunConfig(**HANDLER_RUN, share_metrics=True)
    model = _global_model(run)
    config = {} if stage is None else {wire.STAGE: stage}
    reply = app(_message("evaluate", model, config), _context(run, partition=2))
    assert not reply.content.array_records and not reply.content.config_records
    metrics = reply.content.metric_records[wire.METRICS]
    assert tuple(metrics) == wire.EVAL_REPLY_METRICS + wire.SHARED_EVAL_METRICS
    user = load_device_data({"partition-id": 2}, run).user
    ranks = model_ranks(model, [user], stage or "test")
    assert metrics[wire.NUM_EXAMPLES] == 1
    assert metrics[wire.HIT_RATE_10] == float(hit_rate(ranks, 10)[0])
    assert metrics[wire.NDCG_10] == float(ndcg(ranks, 10)[0])


def test_local_evaluation_matches_server_side_ranks_for_every_user(split) -> None:
    model = _model(split.num_items, seed=3)
    ranks = model_ranks(model, split.users, "test")
    assert [evaluate_locally(model=model, user=u, stage="test").rank for u in split.users] == ranks.tolist()
    with pytest.raises(ValueError, match="stage"):
        evaluate_locally(model=model, user=split.users[0], stage="train")


# --- the device's data -----------------------------------------------------------------


def test_data_source_errors_are_clear() -> None:
    run = RunConfig(**HANDLER_RUN)
    with pytest.raises(ValueError, match="x.sqlite: no device store here"):  # history-db mode: tests/test_device_store.py
        load_device_data({"history-db": "/tmp/x.sqlite"}, run)
    with pytest.raises(ValueError, match=r"it has \['num-partitions', 'other'\]"):
        load_device_data({"num-partitions": 3, "other": 1}, run)
    with pytest.raises(ValueError, match="partition-id 20 is out of range.*20 users"):
        load_device_data({"partition-id": 20}, run)
    device = load_device_data({"partition-id": 19}, RunConfig(**HANDLER_RUN, run_dir="/tmp/run"))
    assert device.ledger_path == Path("/tmp/run/devices/partition-19.sqlite")

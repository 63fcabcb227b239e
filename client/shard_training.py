"""One round of a node's sampled users, each trained as the independent device it stands for.

A real device holds one user; a simulated node holds a shard (client/data_source.py).
Every sampled user gets its own update from the same global model, its own clipping
(user-level DP: each update clipped to user-clip-norm before it is combined) and its
own ledger entry; the node then replies with what a mean strategy needs: the global
model plus the combined update of the users that trained, with their count and windows.

Two ways to compute the updates, one result:
- FedSGD (one plain SGD step over all of a user's windows: local-optimizer sgd,
  local-epochs 1, batch-size covering every window, no on-device DP-SGD, no FedProx):
  every user at once in one batched pass (client/user_gradients.py);
- anything else (several steps, Adam, on-device DP-SGD): `train_locally` user by user.
`tests/test_shard_training.py` checks that the batched pass equals the loop.

Randomness: without on-device DP, dropout and batch order come from (run seed, round,
shard), so a run is reproducible; DP noise comes from OS entropy unless the research-only
run-config research-noise-seed is set.
"""

from __future__ import annotations

import copy
import math
import secrets
from dataclasses import dataclass

import numpy as np
import torch

from fedinterest.client.data_source import DeviceData
from fedinterest.client.ledger import Charge, LedgerEntry, PrivacyLedger
from fedinterest.client.local_training import train_locally
from fedinterest.client.user_gradients import fedsgd_user_updates
from fedinterest.common.model import InterestModel
from fedinterest.common.run_config import RunConfig

NO_HISTORY = np.zeros(0, dtype=np.int64)  # a device too new to train: it replies empty


@dataclass(frozen=True)
class ShardRoundResult:
    """What the sampled users of one node produced in one round."""

    state_dict: dict[str, torch.Tensor] | None  # global + combined update; None when no user trained
    num_users: int  # users whose updates the state combines
    num_examples: int  # their replies' weight: windows without DP-SGD, one a user with it (client/local_training.py)
    train_loss: float  # example-weighted mean of their losses (0.0 when none trained)
    epsilons: list[float]  # every sampled user's cumulative example-level epsilon after the round
    refused: int  # sampled users that declined (privacy budget or a round already charged)
    unclipped: int = 0  # trained users whose update norm was at most the clip norm (user-level DP only)


def train_shard(
    *,
    model: InterestModel,
    device: DeviceData,
    sampled: list[int],
    run: RunConfig,
    ledger: PrivacyLedger,
    run_id: int,
    server_round: int,
    proximal_mu: float = 0.0,
    clip_norm: float | None = None,
) -> ShardRoundResult:
    """Train the users `sampled` (indices into `device.users`) from `model`'s global weights.

    `clip_norm` is the round's user-level clip norm under adaptive clipping (the train
    config's wire.CLIP_NORM); None = the run's user-clip-norm.
    """
    if not sampled or any(not 0 <= i < len(device.users) for i in sampled) or len(set(sampled)) != len(sampled):
        raise ValueError(f"sampled users must be distinct indices into the shard's {len(device.users)} users, got {sampled}")
    generator = _seed_round(run, server_round, device.first_user)
    histories = [user.train if (user := device.users[i]) is not None else NO_HISTORY for i in sampled]
    accounts = [ledger.for_user(device.ledger_user(i)) for i in sampled]
    clip = (clip_norm or run.user_clip_norm) if run.clips_user_updates else None
    if _is_fedsgd(run, proximal_mu, histories):
        return _fedsgd_round(model, histories, accounts, run, run_id, server_round, clip)
    return _loop_round(model, histories, accounts, run, run_id, server_round, proximal_mu, generator, clip)


def refused_round(device: DeviceData, sampled: list[int], ledger: PrivacyLedger, delta: float) -> ShardRoundResult:
    """Every sampled user declines (a device whose own privacy floor refuses the run)."""
    epsilons = [ledger.for_user(device.ledger_user(i)).epsilon(delta) for i in sampled]
    return ShardRoundResult(None, 0, 0, 0.0, epsilons, refused=len(sampled))


def _windows(history: np.ndarray, max_len: int) -> int:
    return math.ceil((len(history) - 1) / max_len) if len(history) >= 2 else 0  # as common.examples.training_windows


def _is_fedsgd(run: RunConfig, proximal_mu: float, histories: list[np.ndarray]) -> bool:
    """Whether every user's round is one plain SGD step over all its windows, without DP-SGD."""
    one_step = all(_windows(h, run.max_len) <= run.batch_size for h in histories)
    return one_step and run.local_optimizer == "sgd" and run.local_epochs == 1 and not run.private and proximal_mu == 0


def _fedsgd_round(
    model: InterestModel, histories: list[np.ndarray], accounts: list[PrivacyLedger], run: RunConfig, run_id: int, server_round: int,
    clip: float | None,
) -> ShardRoundResult:
    """All users' one-step updates in one batched pass; each charged one (noise-free) step first."""
    windows = [_windows(h, run.max_len) for h in histories]
    entries = {a.user: LedgerEntry(run_id, server_round, 0.0, 1.0, 1) for a, w in zip(accounts, windows) if w > 0}
    outcomes = accounts[0].charge(entries, budget=None, delta=run.delta) if entries else {}
    trained = [i for i, a in enumerate(accounts) if outcomes.get(a.user) is Charge.CHARGED]
    refused = sum(1 for o in outcomes.values() if o is not Charge.CHARGED)
    epsilons = [a.epsilon(run.delta) for a in accounts]
    if not trained:
        return ShardRoundResult(None, 0, 0, 0.0, epsilons, refused)
    updates = fedsgd_user_updates(model, [histories[i] for i in trained], lr=run.local_lr, clip_norm=clip)
    user_windows = updates.windows.to(torch.float64)
    # User-level DP weighs every user alike (its update is clipped); FedAvg weighs by windows.
    divisor = float(len(trained)) if clip is not None else float(user_windows.sum())
    state = _plus(model, {name: value / divisor for name, value in updates.total.items()})
    loss = float((updates.losses.to(torch.float64) * user_windows).sum() / user_windows.sum())
    unclipped = 0
    if clip is not None:
        assert updates.norms is not None  # fedsgd_user_updates returns the norms whenever it clips
        unclipped = int((updates.norms <= clip).sum())
    return ShardRoundResult(state, len(trained), int(user_windows.sum()), loss, epsilons, refused, unclipped)


def _loop_round(
    model: InterestModel, histories: list[np.ndarray], accounts: list[PrivacyLedger], run: RunConfig, run_id: int,
    server_round: int, proximal_mu: float, generator: torch.Generator | None, clip: float | None,
) -> ShardRoundResult:
    """`train_locally` user by user, each from the global weights; updates combined as they come."""
    global_state = {name: value.detach().clone() for name, value in model.state_dict().items()}
    total = {name: torch.zeros_like(value, dtype=torch.float64) for name, value in global_state.items()}
    weight, users, windows, loss_sum, refused, unclipped, epsilons = 0.0, 0, 0, 0.0, 0, 0, []
    for history, account in zip(histories, accounts):
        user_model = copy.deepcopy(model)
        result = train_locally(
            model=user_model, train_history=history, run=run, ledger=account, run_id=run_id, server_round=server_round,
            proximal_mu=proximal_mu, generator=generator,
        )
        epsilons.append(result.epsilon)
        refused += int(result.refused)
        if result.state_dict is None:
            continue
        update = {name: result.state_dict[name].to(torch.float64) - global_state[name] for name in global_state}
        if clip is not None:
            unclipped += int(update_norm(update) <= clip)
            update, user_weight = clip_update(update, clip), 1.0
        else:
            user_weight = float(result.num_examples)
        for name in total:
            total[name] += user_weight * update[name]
        weight += user_weight
        users += 1
        windows += result.num_examples
        loss_sum += result.num_examples * result.train_loss
    if users == 0:
        return ShardRoundResult(None, 0, 0, 0.0, epsilons, refused)
    state = {name: (global_state[name] + total[name] / weight).to(global_state[name].dtype) for name in global_state}
    return ShardRoundResult(state, users, windows, loss_sum / windows, epsilons, refused, unclipped)


def clip_update(update: dict[str, torch.Tensor], clip_norm: float) -> dict[str, torch.Tensor]:
    """`update` scaled to L2 norm at most `clip_norm` over all its arrays (user-level DP's clipping)."""
    norm = update_norm(update)
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {name: value * scale for name, value in update.items()}


def update_norm(update: dict[str, torch.Tensor]) -> float:
    """The L2 norm of all of `update`'s arrays together, in float64."""
    return math.sqrt(sum(float(value.double().square().sum()) for value in update.values()))


def _plus(model: InterestModel, update: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's weights plus `update` (buffers, if any, as they are)."""
    return {name: (value.detach() + update[name]).clone() if name in update else value.detach().clone() for name, value in model.state_dict().items()}


def _seed_round(run: RunConfig, server_round: int, first_user: int) -> torch.Generator | None:
    """Seed this round's randomness; the generator for on-device DP noise (None without DP-SGD).

    Without DP-SGD, dropout and batch order follow (seed, round, shard): reproducible. With
    it, the noise must not be predictable: torch's global generator is seeded by whatever
    ran before in the process (older torch releases started every fresh process from one
    fixed seed), so both it and Opacus's noise generator are seeded from OS entropy
    (`secrets`), unless research-noise-seed makes the run reproducible on purpose.
    """
    if run.private and not run.noise_seeded:
        seed = secrets.randbits(63)
    else:
        base = run.research_noise_seed if run.private else run.seed
        seed = int(np.random.SeedSequence([base, server_round, first_user + 1]).generate_state(2, dtype=np.uint64)[0] >> 1)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed ^ 0x5DEECE66D) if run.private else None

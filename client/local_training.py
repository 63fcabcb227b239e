"""One round of local training on the device, with DP-SGD (Opacus) unless DP is off.

The front door is `train_locally`: keyword-only arguments, small `_prepare_*` helpers,
ValueError for bad input, and one result type whatever the mode. The examples are the
user's training windows (`common.examples.training_windows`): one window of up to
`max_len` consecutive (item, next item) pairs is one training example, and that is the
unit layer-1 DP protects (docs/privacy.md). The loss is the dense `sequence_loss`, the
only one whose gradients Opacus can keep per example.

The window count W stays on the device. Opacus's guarantee is for adding or removing
one example at a fixed sample rate, number of steps and denominator; derived from W (as
Opacus's `make_private` derives them from the dataset), all three would change with the
window removed and reveal it, and so would a reply that reports W or sends no model
when W = 0. With DP-SGD every device therefore samples at the rate and takes the steps
Opacus would derive for the public run-config dp-windows N (q = 1 / ceil(N / B),
ceil(N / B) steps an epoch), divides the noised sum by the fixed int(N q), trains (on
noise alone) when it has no window, and reports weight 1 instead of W.

Accounting: the device's ledger holds every round it was charged for. Before training,
the round's entry (noise multiplier, Poisson sample rate, steps) is checked against the
budget and recorded in one ledger transaction (`PrivacyLedger.charge`): if it would take
epsilon (Opacus's RDP accountant) past the run's budget the device does not train (a
refusal, not an error). Charging before training means two overlapping rounds can never
both pass the check; a round that then fails stays charged (over-, never under-charged).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils.data import DataLoader, TensorDataset, default_collate

from fedinterest.client import opacus_layers  # noqa: F401 -- registers ItemBias's per-sample gradient with Opacus
from fedinterest.client.ledger import Charge, LedgerEntry, PrivacyLedger
from fedinterest.common.examples import training_windows
from fedinterest.common.model import InterestModel, sequence_loss
from fedinterest.common.run_config import RunConfig
from fedinterest.common.training import train_epoch

if TYPE_CHECKING:
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer


@dataclass(frozen=True)
class LocalTrainingResult:
    """What one round produced; `state_dict` is None when the device did not train."""

    state_dict: dict[str, torch.Tensor] | None
    # What the reply reports as NUM_EXAMPLES (FedAvg's weight; 0 when not trained): the
    # training windows without DP-SGD, 1 with it (the window count is private).
    num_examples: int
    train_loss: float  # mean over epochs of the example-weighted mean loss; 0.0 when no window was drawn
    epsilon: float  # the device's cumulative epsilon at the run's delta after this round (inf: DP off)
    refused: bool  # the privacy budget (or an already-charged round) kept the device from training


@dataclass(frozen=True)
class _Sampling:
    """Poisson sample rate, optimizer steps and the noised sum's denominator of one round, as Opacus derives them."""

    sample_rate: float
    steps_per_epoch: int
    steps: int
    expected_batch_size: int


@dataclass
class _Prepared:
    """The objects one round trains with; `engine` is None when DP is off."""

    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loader: DataLoader
    engine: PrivacyEngine | None


def train_locally(
    *,
    model: InterestModel,
    train_history: np.ndarray,
    run: RunConfig,
    ledger: PrivacyLedger,
    run_id: int,
    server_round: int,
    generator: torch.Generator | None = None,
    proximal_mu: float = 0.0,
) -> LocalTrainingResult:
    """Train `model` (updated in place) on one user's training windows for one round.

    `run` gives epochs, learning rate, batch size and dp-windows (which size the Poisson
    sampling), noise multiplier (0 turns DP off), clipping norm, delta and epsilon
    budget. `ledger` is charged for (run_id, server_round). `generator` seeds batch
    sampling and the DP noise; leave it None on a real device, because noise the server
    can reproduce protects nothing. `proximal_mu` > 0
    (FedProx) pulls the weights towards the global ones after every step.
    """
    if proximal_mu < 0:
        raise ValueError(f"proximal_mu must be >= 0, got {proximal_mu}")
    _check_round(run_id, server_round)
    if model.config.max_len != run.max_len:
        raise ValueError(f"model max_len {model.config.max_len} differs from the run's max-len {run.max_len}")
    windows = _prepare_windows(train_history, run.max_len)
    epsilon_now = ledger.epsilon(run.delta)
    if run.private:
        # Sized for the public dp-windows, never for this device's own count (module docstring).
        sampling = _prepare_sampling(num_windows=run.dp_windows, batch_size=run.batch_size, local_epochs=run.local_epochs)
    elif windows is None:
        return LocalTrainingResult(None, 0, 0.0, epsilon_now, refused=False)
    else:
        sampling = _prepare_sampling(num_windows=len(windows), batch_size=run.batch_size, local_epochs=run.local_epochs)
    entry = LedgerEntry(run_id, server_round, run.noise_multiplier, sampling.sample_rate, sampling.steps)
    history_before = ledger.history()
    # A retried round (already charged) is refused too: training again would be a second
    # noisy release of the same data.
    charge = ledger.charge({ledger.user: entry}, budget=run.epsilon_budget if run.private else None, delta=run.delta)
    if charge[ledger.user] is not Charge.CHARGED:
        return LocalTrainingResult(None, 0, 0.0, epsilon_now, refused=True)

    if run.private:
        prepared = _prepare_private(
            model=model, loader=_poisson_loader(windows, sampling, max_len=run.max_len, generator=generator),
            expected_batch_size=sampling.expected_batch_size, lr=run.local_lr, optimizer=run.local_optimizer,
            noise_multiplier=run.noise_multiplier, max_grad_norm=run.max_grad_norm, generator=generator,
        )
        assert prepared.engine is not None  # _prepare_private sets it
        prepared.engine.accountant.history = list(history_before)
        _check_sampling(prepared, sampling)
    else:
        assert windows is not None  # without DP, a device without windows returned above
        prepared = _prepare_plain(
            model=model, windows=windows, batch_size=run.batch_size, lr=run.local_lr, optimizer=run.local_optimizer, generator=generator,
        )
    after_step = _proximal_step(model, lr=run.local_lr, mu=proximal_mu) if proximal_mu > 0 else None
    try:
        loss = _train(prepared, local_epochs=run.local_epochs, expected_steps=sampling.steps, after_step=after_step)
    finally:
        if prepared.engine is not None:
            private_module: GradSampleModule = prepared.module  # what make_private returned
            private_module.cleanup()  # removes Opacus's hooks and per-sample attributes from `model`
    epsilon = ledger.epsilon(run.delta) if run.private else float("inf")
    state = {name: value.detach().clone() for name, value in model.state_dict().items()}
    weight = 1 if run.private or windows is None else len(windows)  # without DP windows is set (see above)
    return LocalTrainingResult(state, weight, 0.0 if math.isnan(loss) else loss, epsilon, refused=False)


def _check_round(run_id: int, server_round: int) -> None:
    for name, value in (("run_id", run_id), ("server_round", server_round)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")


def _prepare_windows(train_history: np.ndarray, max_len: int) -> TensorDataset | None:
    """The user's training windows (one window = one DP unit) as a dataset; None if there are none."""
    history = np.asarray(train_history)
    if history.ndim != 1 or not np.issubdtype(history.dtype, np.integer):
        raise ValueError(f"train_history must be a 1-D array of item indices, got shape {history.shape} dtype {history.dtype}")
    inputs, targets = training_windows(history.astype(np.int64), max_len)
    if len(inputs) == 0:
        return None
    return TensorDataset(torch.from_numpy(inputs), torch.from_numpy(targets))


def _prepare_sampling(*, num_windows: int, batch_size: int, local_epochs: int) -> _Sampling:
    """Opacus's own derivation for a dataset of `num_windows`: q = 1 / ceil(N / B) (= min(1, B / N)
    when B divides N), ceil(N / B) steps an epoch, the sum divided by int(N q) (make_private's
    expected batch size)."""
    if num_windows < 1 or batch_size < 1 or local_epochs < 1:
        raise ValueError(f"need at least one window, batch size and epoch; got {num_windows}, {batch_size}, {local_epochs}")
    batches = math.ceil(num_windows / batch_size)  # len(DataLoader(windows, batch_size))
    rate = 1 / batches
    # int(N q) in integers: the float product can fall just below a whole number.
    return _Sampling(sample_rate=rate, steps_per_epoch=batches, steps=batches * local_epochs, expected_batch_size=num_windows // batches)


def _poisson_loader(windows: TensorDataset | None, sampling: _Sampling, *, max_len: int, generator: torch.Generator | None) -> DataLoader:
    """Poisson sampling at the round's fixed rate for exactly `steps_per_epoch` batches an epoch.

    Opacus's own sampler, with the step count given: its default, int(1 / q), is one short
    for some q = 1 / k (k = 93: int(1 / (1 / 93)) = 92), which would no longer be the
    round charged. A device without windows draws an empty batch at every step, which is
    what Poisson sampling of nothing draws: its round is noise alone, as the accountant counts it.
    """
    if windows is None:
        batches: Iterable[list[int]] = [[] for _ in range(sampling.steps_per_epoch)]
        windows = TensorDataset(torch.zeros((0, max_len), dtype=torch.long), torch.zeros((0, max_len), dtype=torch.long))
    else:
        batches = UniformWithReplacementSampler(
            num_samples=len(windows), sample_rate=sampling.sample_rate, generator=generator, steps=sampling.steps_per_epoch,
        )
    empty = tuple(tensor[:0] for tensor in windows.tensors)

    def collate(batch: list) -> tuple[torch.Tensor, ...]:
        return default_collate(batch) if batch else empty

    return DataLoader(windows, batch_sampler=batches, collate_fn=collate)


def _prepare_plain(
    *, model: InterestModel, windows: TensorDataset, batch_size: int, lr: float, optimizer: str = "adam",
    generator: torch.Generator | None,
) -> _Prepared:
    """Non-private training: shuffled fixed-size batches, no clipping, no noise."""
    loader = DataLoader(windows, batch_size=batch_size, shuffle=True, generator=generator)
    return _Prepared(model, _optimizer(model, optimizer, lr), loader, engine=None)


def _prepare_private(
    *,
    model: InterestModel,
    loader: DataLoader,
    expected_batch_size: int,
    lr: float,
    optimizer: str = "adam",
    noise_multiplier: float,
    max_grad_norm: float,
    generator: torch.Generator | None,
) -> _Prepared:
    """DP-SGD via Opacus's make_private over `loader`'s batches: per-window clipping to
    `max_grad_norm`, Gaussian noise, the sum divided by `expected_batch_size`, RDP accountant
    at sample rate 1 / len(loader)."""
    if noise_multiplier < 0 or not max_grad_norm > 0:
        raise ValueError(f"need noise_multiplier >= 0 and max_grad_norm > 0, got {noise_multiplier}, {max_grad_norm}")
    if expected_batch_size < 1:
        raise ValueError(f"expected_batch_size must be at least 1, got {expected_batch_size}")
    with warnings.catch_warnings():
        # Opacus warns that secure_mode (a CSPRNG for the noise) is off; docs/privacy.md says so.
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant="rdp")
    # poisson_sampling=False: `loader` already samples as the round was charged; Opacus's
    # own DPDataLoader would size the rate and the denominator from this device's windows.
    module, dp_optimizer, dp_loader = engine.make_private(
        module=model, optimizer=_optimizer(model, optimizer, lr), data_loader=loader, noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm, poisson_sampling=False, noise_generator=generator,
    )
    # make_private divides by int(len(dataset) / len(loader)), a function of the private
    # window count; the denominator must be the public one the round was sized for.
    dp_optimizer.expected_batch_size = expected_batch_size
    return _Prepared(module, dp_optimizer, dp_loader, engine)


_OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}  # run config local-optimizer


def _optimizer(model: InterestModel, name: str, lr: float) -> torch.optim.Optimizer:
    """The device's optimizer, fresh each round."""
    if name not in _OPTIMIZERS:
        raise ValueError(f"local optimizer must be one of {', '.join(_OPTIMIZERS)}, got {name!r}")
    return _OPTIMIZERS[name](model.parameters(), lr=lr)


def _check_sampling(prepared: _Prepared, sampling: _Sampling) -> None:
    """The entry charged before training must be what Opacus's accountant will count (it takes 1 / len(loader))."""
    if len(prepared.loader) != sampling.steps_per_epoch or 1 / len(prepared.loader) != sampling.sample_rate:
        raise RuntimeError(
            f"Opacus accounts {len(prepared.loader)} steps an epoch at rate {1 / len(prepared.loader)}, "
            f"not the charged {sampling.steps_per_epoch} at {sampling.sample_rate}"
        )
    optimizer: DPOptimizer = prepared.optimizer  # what make_private returned
    if optimizer.expected_batch_size != sampling.expected_batch_size:
        raise RuntimeError(f"Opacus divides by {optimizer.expected_batch_size}, not the public {sampling.expected_batch_size}")


def _proximal_step(model: InterestModel, *, lr: float, mu: float) -> Callable[[], None]:
    """FedProx's proximal term mu/2 * ||w - w_global||^2 as a decoupled step w -= lr * mu * (w - w_global).

    Its gradient depends only on the weights, never on the data, so it is applied after
    the (clipped, noised) DP step: it costs no privacy, and Opacus's per-sample
    gradients, which only see module inputs, could not carry it anyway.
    """
    anchors = [(p, p.detach().clone()) for p in model.parameters() if p.requires_grad]

    @torch.no_grad()
    def step() -> None:
        for param, anchor in anchors:
            param.sub_(lr * mu * (param - anchor))

    return step


def _train(
    prepared: _Prepared, *, local_epochs: int, expected_steps: int, after_step: Callable[[], None] | None = None,
) -> float:
    """Run the epochs; the mean of the epochs' mean losses (NaN if no example was drawn at all)."""
    counted_before = sum(steps for _, _, steps in prepared.engine.accountant.history) if prepared.engine is not None else 0
    steps_done, epoch_losses = 0, []
    for _ in range(local_epochs):
        loss, steps = train_epoch(
            prepared.module, prepared.loader, prepared.optimizer, lambda m, x, y: sequence_loss(m(x), y), after_step
        )
        epoch_losses.append(loss)
        steps_done += steps
    if steps_done != expected_steps:
        raise RuntimeError(f"took {steps_done} optimizer steps, but the round was charged for {expected_steps}")
    if prepared.engine is not None:
        counted = sum(steps for _, _, steps in prepared.engine.accountant.history)
        if counted != counted_before + steps_done:
            raise RuntimeError(f"Opacus's accountant counted {counted - counted_before} steps, the round took {steps_done}")
    # An epoch can draw no example at all under Poisson sampling (its loss is NaN).
    finite = [value for value in epoch_losses if not math.isnan(value)]
    return sum(finite) / len(finite) if finite else float("nan")

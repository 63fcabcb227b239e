"""Before a run is submitted: can the enrolled devices' privacy budgets cover its rounds?

The server never sees a device's history, so it cannot know each device's cost per
round; it can bound it. A device whose training windows fit one batch (at most
`batch-size` windows of `max-len` pairs: every device with up to batch-size x max-len
interactions) trains on all of them at Opacus sample rate q = 1 for `local-epochs`
steps a round, the costliest case of client/local_training.py's derivation
(q = 1 / ceil(W / B), ceil(W / B) steps an epoch). The forecast composes that with
Opacus's RDP accountant, the same one the devices use, and adds what each enrolled
device already reported spending in earlier runs of this deployment (the per-node tally
in the runs' last checkpoints: cumulative epsilon, at those runs' delta). A device may
cap the budget lower still (its privacy policy), so the forecast is optimistic for
those: a warning, never a refusal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedinterest.common.run_config import RunConfig
from fedinterest.common.run_files import DEVICE_EPSILON_MAX
from fedinterest.server import checkpoint as ckpt
from fedinterest.server.deployment import Deployment
from fedinterest.server.enrollment import load_devices


@dataclass(frozen=True)
class Forecast:
    """How many rounds the costliest kind of device can train, and the enrolled devices short of budget."""

    rounds_requested: int
    rounds_full_batch_device: int  # rounds a fresh device whose history fits one batch can train
    epsilon_per_round_first: float  # epsilon of that device after one round
    short: list[tuple[str, float, int]]  # (device name, epsilon already spent, rounds it can still train)

    @property
    def covered(self) -> bool:
        return self.rounds_full_batch_device >= self.rounds_requested and not self.short


def _epsilon(noise: float, steps: int, delta: float) -> float:
    from opacus.accountants import RDPAccountant

    if steps == 0:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = [(noise, 1.0, steps)]
    return float(accountant.get_epsilon(delta=delta))


def rounds_within(config: RunConfig, *, already: float = 0.0, limit: int | None = None) -> int:
    """Rounds a full-batch device (q = 1) can train before its epsilon would pass the budget, up to `limit`."""
    limit = config.num_server_rounds if limit is None else limit
    rounds = 0
    # The sum of what was spent and this run's cost bounds the composed epsilon from above
    # (RDP composition of the two is never worse than adding the epsilons).
    while rounds < limit and already + _epsilon(config.noise_multiplier, (rounds + 1) * config.local_epochs, config.delta) <= config.epsilon_budget:
        rounds += 1
    return rounds


def spent_by_node(deployment: Deployment) -> dict[int, float]:
    """The highest cumulative epsilon each node reported in this deployment's earlier runs."""
    spent: dict[int, float] = {}
    runs = deployment.runs_dir
    for run_dir in sorted(runs.iterdir()) if runs.is_dir() else []:
        try:
            saved = ckpt.latest(run_dir)
        except (ckpt.CheckpointError, OSError, ValueError):
            continue  # an unreadable checkpoint says nothing about budgets; the run's own status names it
        tally = (saved.privacy or {}).get(DEVICE_EPSILON_MAX, {}) if saved else {}
        for node, epsilon in tally.items():
            if str(node).isdigit() and math.isfinite(float(epsilon)):
                spent[int(node)] = max(spent.get(int(node), 0.0), float(epsilon))
    return spent


def forecast(deployment: Deployment, config: RunConfig) -> Forecast | None:
    """The budget forecast of a run about to be submitted; None when the run has no DP (nothing to spend)."""
    if not config.private:
        return None
    spent = spent_by_node(deployment)
    short = []
    for device in load_devices(deployment):
        already = spent.get(device.node_id, 0.0)
        if device.active and already > 0:
            left = rounds_within(config, already=already)
            if left < config.num_server_rounds:
                short.append((device.name, already, left))
    return Forecast(
        rounds_requested=config.num_server_rounds,
        rounds_full_batch_device=rounds_within(config),
        epsilon_per_round_first=_epsilon(config.noise_multiplier, config.local_epochs, config.delta),
        short=short,
    )


def warning_text(result: Forecast, config: RunConfig) -> str | None:
    """One warning naming the rounds that budgets cannot cover and what to change; None when they can."""
    if result.covered:
        return None
    parts = []
    if result.rounds_full_batch_device < result.rounds_requested:
        parts.append(
            f"at noise-multiplier {config.noise_multiplier:g}, local-epochs {config.local_epochs}, delta {config.delta:g} and "
            f"epsilon-budget {config.epsilon_budget:g}, a device whose history fits one batch (up to "
            f"{config.batch_size * config.max_len} interactions) spends epsilon {result.epsilon_per_round_first:.3g} in its "
            f"first round and can train only {result.rounds_full_batch_device} of the {result.rounds_requested} rounds; it refuses the rest"
        )
    for name, already, left in result.short:
        parts.append(f"device {name} already spent epsilon {already:.3g} in earlier runs and can train at most {left} more round(s)")
    return (
        "the devices' privacy budgets cannot cover this run: " + "; ".join(parts)
        + ". Fewer rounds (--set num-server-rounds=N) or more noise (--set noise-multiplier=S) let devices take part in all of them"
    )


def forecast_for(deployment: Deployment, config: RunConfig) -> str | None:
    """The warning for `config` (or None)."""
    result = forecast(deployment, config)
    return None if result is None else warning_text(result, config)

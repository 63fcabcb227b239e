"""Layer 2 of docs/privacy.md: user-level DP-FedAvg, its device sampling and its accountant.

One round is one release of the Gaussian mechanism on a Poisson sample of devices
(McMahan et al. 2018, "Learning differentially private recurrent language models"):

- Sampling: every user of the federation (server/cohort.py: a device, or one user of a
  simulated node's shard) takes part independently with probability
  q = min(1, clients-per-round / users). Poisson sampling is what the
  accountant assumes; Flower's own `sample_nodes` draws a fixed-size sample, for which
  Poisson accounting would be wrong. The draw comes from a per-run secret seed (OS
  entropy, kept in the checkpoint so that a resumed round draws the same devices and
  never written to the logs): amplification by sampling holds only while the sample is
  hidden from whoever sees the models, so it must not follow from the public run seed.
- Clipping: each user's update is scaled down to L2 norm at most C = user-clip-norm over
  all arrays together -- by the device (client/shard_training.py), and again here: a
  reply's update (reply weights - global weights, the mean of its users' clipped updates)
  is clipped to C and counted once per user it speaks for. For an honest node that is a
  no-op; for a device (one user) it is the server's own bound, whatever the device did.
- Aggregate (fixed denominator): new = global + (sum of clipped updates) / E + N(0, (sigma C / E)^2)
  per coordinate, with E = q * nodes, the expected sample size. A fixed denominator is
  what bounds one user's influence by C / E whatever the sample turns out to be; dividing
  by the number of replies instead would let one user move the mean by up to C. Devices
  that refuse, fail, send nothing or are rejected by the update checks add a zero
  update, which is inside the same bound. Every sampled round is released and accounted,
  even with no valid reply (then the release is global + noise): skipping a release
  when too few replied would make the skip itself depend on the users' data.
- Noise: numpy's default_rng (PCG64) seeded from the OS's entropy, never the run seed;
  the research-only run-config research-noise-seed seeds it and the sampling (the run's
  privacy report then says its figures do not hold). PCG64 is not a cryptographically
  secure generator, and the noise is drawn in float64 and cast to the model's float32:
  neither is hardened against attacks on the generator's state or on floating-point
  noise (Mironov 2012); docs/privacy.md says so.
- Accountant: Opacus's PRV accountant (user-accountant "prv", the default: numerical
  composition of privacy-loss distributions, Gopi et al. 2021, reporting its upper
  bound) or its RDP accountant ("rdp"), one Poisson-subsampled Gaussian step (sigma, q)
  per round, under add/remove-one-user adjacency; epsilon is reported at delta =
  user-delta (0 = N^-1.1, N the users at the first round, then fixed). Its history is
  saved with every checkpoint, so a resume continues the same composition.
- Noise multiplier: user-noise-multiplier, or -- with user-target-epsilon > 0 -- the
  smallest sigma (Opacus's get_noise_multiplier, same accountant) for which
  num-server-rounds releases at the first round's q spend that epsilon at delta; fixed
  for the run and kept in the checkpoint.
- Budget: before a round the loop asks `would_exceed` (server/round_callbacks.UserBudgetStop);
  if one more release would pass user-epsilon-budget, the run stops there with the rounds
  done so far.

Why not Flower's DifferentialPrivacyServerSideFixedClipping: it divides the noise by a
fixed `num_sampled_clients` but samples a fixed-size set through the wrapped strategy,
and its built-in accountant (flwr.supercore.privacy_accounting) only allows
"no-amplification" accounting in that wrapper (and needs the dp-accounting package);
with accounting on it refuses a round whose reply count differs from the sample
size, i.e. any round where a device failed or refused, and requires equal weights from
the devices. So the round's wrapper is our own, of the same shape
(server/user_dp_strategy.py): it draws the Poisson sample, takes the replies the loop's
checks let through (server/reply_checks.py), and clips, noises and accounts with this
module; the wrapped strategy sees the one noised model (a server optimizer such as
FedAdam then treats it as its pseudo-gradient: post-processing, no further privacy cost).
"""

from __future__ import annotations

import secrets
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from opacus.accountants import create_accountant
from opacus.accountants.accountant import IAccountant
from opacus.accountants.utils import get_noise_multiplier

from fedinterest.common.run_config import RunConfig
from fedinterest.server.adaptive_clipping import AdaptiveClip
from fedinterest.server.reply_checks import l2_norm

# The accountant's unit and adjacency, stated wherever the figure is reported.
UNIT = "user-level (epsilon, delta)-DP of the sequence of global models (DP-FedAvg, add/remove one user's whole history)"
# delta = N^-1.1 unless user-delta is set: below 1/N, as a delta that allows leaking one user must be.
DELTA_EXPONENT = 1.1
ACCOUNTANTS = ("prv", "rdp")
# Who adds the noise and what the server sees, by run-config aggregation (docs/privacy.md).
MECHANISMS = {
    "plain": "trusted server (central DP): every device's clipped update reaches the server in the clear and the server adds N(0, (sigma C)^2) to their sum",
    "secagg+": "distributed DP with secure aggregation: every device clips its update and adds N(0, (sigma C)^2 / m); Flower's SecAgg+ "
    "reveals to the server only the sum of at least m devices' vectors (m the fewest survivors its threshold lets through), so the sum "
    "carries at least the noise charged; holds against an honest-but-curious server with no device colluding with it (docs/privacy.md)",
}


@dataclass(frozen=True)
class UserDPSettings:
    """The run-config part of layer 2."""

    noise_multiplier: float  # 0 with target_epsilon: calibrated at the start
    clip_norm: float
    delta: float  # 0 = population ** -DELTA_EXPONENT at the first round
    epsilon_budget: float
    clients_per_round: int
    noise_seed: int = 0  # research only (research-noise-seed); 0 = OS entropy
    accountant: str = "prv"
    target_epsilon: float = 0.0  # > 0: calibrate sigma so that `rounds` releases spend this
    rounds: int = 0
    clip_quantile: float = 0.0  # > 0: adaptive clipping (server/adaptive_clipping.py), clip_norm its start
    clip_lr: float = 0.2
    clip_count_stddev: float = 0.0  # 0 = expected users per round / 20
    aggregation: str = "plain"  # the run-config aggregation: who adds the noise (MECHANISMS)


class UserLevelAccountant:
    """The composed privacy loss of the rounds released so far (one Gaussian step per round)."""

    def __init__(
        self, settings: UserDPSettings, *, delta: float, sampling_seed: int, noise_multiplier: float,
        history: list[tuple[float, float, int]] | None = None, adaptive: AdaptiveClip | None = None,
    ) -> None:
        if settings.accountant not in ACCOUNTANTS:
            raise ValueError(f"user-level accountant must be one of {ACCOUNTANTS}, got {settings.accountant!r}")
        if not noise_multiplier > 0:
            raise ValueError(f"the user-level noise multiplier must be positive, got {noise_multiplier}")
        self.settings = settings
        self.delta = delta
        self.sampling_seed = sampling_seed
        self.noise_multiplier = noise_multiplier
        self._accountant = create_accountant(settings.accountant)
        self._accountant.history = [tuple(step) for step in (history or [])]
        self.adaptive = adaptive

    @classmethod
    def start(cls, settings: UserDPSettings, population: int) -> UserLevelAccountant:
        """A fresh accountant for a run whose first round sees `population` users."""
        delta = settings.delta if settings.delta > 0 else max(population, 1) ** -DELTA_EXPONENT
        seed = settings.noise_seed * 2 + 1 if settings.noise_seed else secrets.randbits(63)
        sigma = settings.noise_multiplier
        if settings.target_epsilon > 0:
            sigma = calibrated_noise(settings, delta, min(1.0, settings.clients_per_round / max(population, 1)))
        adaptive = None
        if settings.clip_quantile > 0:
            adaptive = AdaptiveClip.start(
                clip_norm=settings.clip_norm, quantile=settings.clip_quantile, lr=settings.clip_lr, count_stddev=settings.clip_count_stddev,
                noise_multiplier=sigma, expected_size=min(settings.clients_per_round, max(population, 1)),
            )
        return cls(settings, delta=delta, sampling_seed=seed, noise_multiplier=sigma, adaptive=adaptive)

    @classmethod
    def from_json(cls, settings: UserDPSettings, state: dict[str, Any]) -> UserLevelAccountant:
        """Inverse of `to_json` (the checkpoint's privacy["user_level"])."""
        history = [(float(s), float(q), int(n)) for s, q, n in state["history"]]
        sigma = float(state.get("noise_multiplier", settings.noise_multiplier))  # older checkpoints: the run config's
        adaptive = AdaptiveClip.from_json(state["adaptive_clip"]) if state.get("adaptive_clip") else None
        return cls(
            settings, delta=float(state["delta"]), sampling_seed=int(state["sampling_seed"]), noise_multiplier=sigma, history=history, adaptive=adaptive,
        )

    def to_json(self) -> dict[str, Any]:
        """JSON-safe state for the checkpoint manifest (the seed stays server-side, like the weights)."""
        return {
            "delta": self.delta, "sampling_seed": self.sampling_seed, "noise_multiplier": self.noise_multiplier,
            "history": [list(step) for step in self._accountant.history],
            "adaptive_clip": self.adaptive.to_json() if self.adaptive is not None else None,
        }

    @property
    def clip_norm(self) -> float:
        """This round's clip norm: user-clip-norm, or where adaptive clipping has moved it."""
        return self.adaptive.clip_norm if self.adaptive is not None else self.settings.clip_norm

    @property
    def update_noise_multiplier(self) -> float:
        """The noise multiplier on the update sum: sigma, or its share under adaptive clipping (the count takes the rest)."""
        return self.adaptive.update_noise_multiplier if self.adaptive is not None else self.noise_multiplier

    @property
    def rounds(self) -> int:
        """How many releases have been composed."""
        return sum(n for _, _, n in self._accountant.history)

    def epsilon(self) -> float:
        """Epsilon spent so far at `delta` (0 before any release)."""
        return _epsilon(self._accountant, self.delta) if self._accountant.history else 0.0

    def sample_rate(self, population: int) -> float:
        """q for a round with `population` users."""
        return min(1.0, self.settings.clients_per_round / population)

    def epsilon_after(self, population: int, more_rounds: int) -> float:
        """Epsilon if `more_rounds` releases at this population's q followed (nothing is recorded)."""
        projected = create_accountant(self.settings.accountant)
        projected.history = list(self._accountant.history)
        for _ in range(more_rounds):
            projected.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate(population))
        return _epsilon(projected, self.delta) if projected.history else 0.0

    def would_exceed(self, population: int) -> bool:
        """Whether one more release at this population's q would pass the budget."""
        return self.epsilon_after(population, 1) > self.settings.epsilon_budget

    def record_release(self, population: int) -> None:
        """Compose one round's release."""
        self._accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate(population))

    def sample(self, population: int, server_round: int) -> list[int]:
        """The round's Poisson sample of the users 0..population-1 (reproducible from the secret seed and the round)."""
        rng = np.random.default_rng([self.sampling_seed, server_round])
        return np.flatnonzero(rng.random(population) < self.sample_rate(population)).tolist()

    def noise_rng(self, server_round: int) -> np.random.Generator:
        """The round's noise source: PCG64 seeded from OS entropy (not a CSPRNG), or the research-only seed."""
        seed = self.settings.noise_seed
        return np.random.default_rng([seed, server_round]) if seed else np.random.default_rng()

    def summary(self) -> dict[str, Any]:
        """What final.json reports about layer 2."""
        return {
            "unit": UNIT,
            "epsilon": self.epsilon(),
            "delta": self.delta,
            "epsilon_budget": self.settings.epsilon_budget,
            "noise_multiplier": self.noise_multiplier,
            "noise_calibrated_to": self.settings.target_epsilon or None,
            "clip_norm": self.settings.clip_norm,
            "adaptive_clip": (
                {"target_quantile": self.adaptive.quantile, "lr": self.adaptive.lr, "count_stddev": self.adaptive.count_stddev,
                 "update_noise_multiplier": self.adaptive.update_noise_multiplier, "last_clip_norm": self.adaptive.clip_norm}
                if self.adaptive is not None else None
            ),
            "rounds_accounted": self.rounds,
            "sampling": "poisson",
            "accountant": f"opacus {self.settings.accountant}",
            "mechanism": self.settings.aggregation,
            "mechanism_detail": MECHANISMS[self.settings.aggregation],
            "trusts_the_server": self.settings.aggregation == "plain",
        }


def calibrated_noise(settings: UserDPSettings, delta: float, sample_rate: float) -> float:
    """The noise multiplier for which settings.rounds releases at `sample_rate` spend target_epsilon at `delta`."""
    if settings.rounds < 1:
        raise ValueError("calibrating the user-level noise needs the number of rounds")
    with warnings.catch_warnings(), np.errstate(divide="ignore"):  # PRV's log(1 - q) at q = 1 is -inf by design
        warnings.simplefilter("ignore", UserWarning)
        return float(get_noise_multiplier(
            target_epsilon=settings.target_epsilon, target_delta=delta, sample_rate=sample_rate, steps=settings.rounds,
            accountant=settings.accountant, epsilon_tolerance=0.005,
        ))


def _epsilon(accountant: IAccountant, delta: float) -> float:
    with warnings.catch_warnings(), np.errstate(divide="ignore"):  # PRV's log(1 - q) at q = 1 is -inf by design
        # "Optimal order is the largest alpha": the bound stays valid, only looser.
        warnings.simplefilter("ignore", UserWarning)
        return float(accountant.get_epsilon(delta))


def clip_update(update: dict[str, np.ndarray], clip_norm: float) -> tuple[dict[str, np.ndarray], float]:
    """`update` scaled to L2 norm at most `clip_norm` over all arrays; also its norm before."""
    norm = l2_norm(update.values())
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {k: v * scale for k, v in update.items()}, norm


def noised_mean_update(
    global_arrays: dict[str, np.ndarray],
    replies: list[tuple[dict[str, np.ndarray], int]],
    *,
    clip_norm: float,
    noise_multiplier: float,
    expected_size: float,
    rng: np.random.Generator | None = None,
) -> tuple[dict[str, np.ndarray], list[float]]:
    """The DP-FedAvg model: global + sum of clipped updates / E + Gaussian noise (std sigma C / E).

    `replies` are (arrays, users): the reply's model, the global one plus the mean of its
    users' clipped updates. Returns the new arrays (in the global arrays' dtypes) and each
    reply's update norm before clipping (for the logs). `rng` defaults to OS entropy.
    """
    rng = rng or np.random.default_rng()
    total = {k: np.zeros(v.shape, dtype=np.float64) for k, v in global_arrays.items()}
    norms = []
    for arrays, users in replies:
        clipped, norm = clip_update({k: arrays[k].astype(np.float64) - global_arrays[k] for k in global_arrays}, clip_norm)
        norms.append(norm)
        for k in total:
            total[k] += users * clipped[k]
    std = noise_multiplier * clip_norm / expected_size
    new = {
        k: (global_arrays[k] + total[k] / expected_size + rng.normal(0.0, std, size=v.shape)).astype(v.dtype)
        for k, v in global_arrays.items()
    }
    return new, norms


def settings_of(config: RunConfig) -> UserDPSettings:
    """Layer 2's settings from the run config."""
    return UserDPSettings(
        noise_multiplier=config.user_noise_multiplier,
        clip_norm=config.user_clip_norm,
        delta=config.user_delta,
        epsilon_budget=config.user_epsilon_budget,
        clients_per_round=config.clients_per_round,
        noise_seed=config.research_noise_seed,
        accountant=config.user_accountant,
        target_epsilon=config.user_target_epsilon,
        rounds=config.num_server_rounds + (1 if config.popularity_prior else 0),  # the prior's release is one more step
        clip_quantile=config.user_clip_quantile,
        clip_lr=config.user_clip_lr,
        clip_count_stddev=config.user_clip_count_stddev,
        aggregation=config.aggregation,
    )

"""Adaptive clipping for layer 2 (Andrew, Thakkar, McMahan & Ramaswamy, NeurIPS 2021).

Instead of a fixed user-clip-norm C, the server moves C each round toward the
user-clip-quantile gamma of the users' update norms (before clipping):

- every sampled user's node reports how many of its users' updates had norm <= C
  (wire.UNCLIPPED_USERS); the server sums (b_i - 1/2) over the users that trained,
  adds N(0, sigma_b^2), divides by the expected cohort E and adds 1/2: the noised
  fraction b~ of unclipped updates;
- then C <- C * exp(-eta (b~ - gamma)) (the paper's geometric update, eta = user-clip-lr).

Privacy: one user moves the centred count by at most 1/2, and the update sum by at most
C. Releasing both with noise stds (z_u C) and sigma_b is one Gaussian mechanism of
multiplier z with z^-2 = z_u^-2 + (2 sigma_b)^-2 (the paper's Theorem 1). So the
accountant keeps the calibrated z, and the update's noise uses the larger z_u that
Flower's `compute_adaptive_noise_params` derives (its default sigma_b = E / 20, the
paper's). The new C is a function of released values only: post-processing.

Two departures from Flower's DifferentialPrivacy*AdaptiveClipping, both to follow the
paper: Flower counts *clipped* updates into the step `exp(-eta (clipped - gamma))`, which
shrinks C when most updates are clipped (the paper counts unclipped ones, so C grows
then); and Flower does not centre the bits, so one user moves its count by 1, not the
1/2 its noise formula assumes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from flwr.supercore.differential_privacy import compute_adaptive_noise_params


@dataclass
class AdaptiveClip:
    """The clip norm of the next round and the noise it takes (state kept in the checkpoint)."""

    clip_norm: float
    quantile: float  # gamma: the target fraction of updates left unclipped
    lr: float  # eta
    count_stddev: float  # sigma_b, in users
    update_noise_multiplier: float  # z_u >= z: the update's share of the calibrated noise

    @classmethod
    def start(
        cls, *, clip_norm: float, quantile: float, lr: float, count_stddev: float, noise_multiplier: float, expected_size: float,
    ) -> AdaptiveClip:
        """The first round's state: clip norm `clip_norm`, noise split for the calibrated `noise_multiplier`."""
        if not 0 < quantile < 1:
            raise ValueError(f"the target quantile must be in (0, 1), got {quantile}")
        try:
            stddev, update_noise = compute_adaptive_noise_params(noise_multiplier, expected_size, count_stddev or None)
        except ValueError as err:  # Flower's message names its own arguments; say which run-config keys to change
            raise ValueError(
                f"adaptive clipping cannot split noise multiplier {noise_multiplier:.4g} with a count noise std of "
                f"{count_stddev or expected_size / 20:g} users (it must exceed half the multiplier): raise user-clip-count-stddev "
                f"or clients-per-round"
            ) from err
        return cls(clip_norm=clip_norm, quantile=quantile, lr=lr, count_stddev=float(stddev), update_noise_multiplier=float(update_noise))

    def step(self, counts: list[tuple[int, int]], expected_size: float, rng: np.random.Generator) -> float:
        """Move the clip norm after a round; `counts` are (unclipped users, trained users) per valid reply.

        Returns the noised fraction of unclipped updates (what the logs may show: it is released).
        """
        centred = sum(unclipped - users / 2 for unclipped, users in counts)
        fraction = (centred + rng.normal(0.0, self.count_stddev)) / expected_size + 0.5
        self.clip_norm *= math.exp(-self.lr * (fraction - self.quantile))
        return fraction

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, state: dict[str, Any]) -> AdaptiveClip:
        return cls(**{key: float(value) for key, value in state.items()})

"""The parameters of one SecAgg+ round, fixed before it starts, and what they guarantee.

Flower's SecAgg+ (SecAggPlusWorkflow / secaggplus_mod) sums integer vectors modulo
M = 2^32. Each device's real-valued contribution x (its users' clipped updates plus its
noise share) is clipped coordinate-wise to [-c, c], mapped to [0, 2^b] and stochastically
rounded (flwr.common.secure_aggregation.quantization), so a coordinate's rounding error
is below one step 2c / 2^b and zero on average. This module picks:

- shares s: every sampled node (secagg-num-shares = 0, SecAgg) or that many neighbours
  (SecAgg+); threshold t = round(secagg-reconstruction-threshold * s), at least 2 and
  below s (Flower's rule for integer settings). A round completes only if every node
  has t surviving neighbours. Every device is the neighbour of exactly s nodes, so the
  survivors A satisfy s |A| >= n t: at least m = ceil(n t / s) devices' vectors are in
  every sum decoded (m = t when every node is every other's neighbour). m is the worst
  case the noise is calibrated to (`min_survivors`; client/secure_contribution.py).
- bits b = 32 - ceil(log2(n + 1)) (at most 30): n values of at most 2^b, and the n
  weights of 2^b Flower sums beside them, stay below 2^32, so the sum never wraps.
- range c = k C (1 + 1e-3) + TAIL_SIGMAS * s_dev with k the most users a node combines,
  C = user-clip-norm and s_dev = sigma C / sqrt(m) the device's noise std: a coordinate
  of k clipped updates is at most k C, so without noise nothing is ever clipped, and with
  noise a coordinate is clipped with probability at most erfc(TAIL_SIGMAS / sqrt(2))
  (2.0e-9 at 6 standard deviations).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedinterest.common.run_config import RunConfig
from fedinterest.common.secure_survivors import fewest_survivors

MODULUS_BITS = 32  # Flower's default modulus, 2^32
MAX_QUANTIZATION_BITS = 30  # Flower's stochastic rounding casts to int32
TAIL_SIGMAS = 6.0  # the clipping range's margin over the largest update, in device noise standard deviations
UPDATE_SLACK = 1e-3  # float32 rounding of a clipped update may exceed C by a few ulps


@dataclass(frozen=True)
class SecureRoundPlan:
    """Protocol and quantization settings of one round of `nodes` sampled nodes."""

    nodes: int
    shares: int
    threshold: int
    bits: int
    clipping_range: float
    noise_multiplier: float  # sigma of the sum; 0 = no noise
    clip_norm: float

    @property
    def step(self) -> float:
        """One quantization step, 2c / 2^b."""
        return 2 * self.clipping_range / 2**self.bits

    @property
    def min_survivors(self) -> int:
        """m: the fewest devices whose vectors a completed round sums (protocol_min_survivors on the device)."""
        return fewest_survivors(self.nodes, self.shares, self.threshold)

    @property
    def device_noise_std(self) -> float:
        """Each device's noise share per coordinate: sigma C / sqrt(m)."""
        return self.noise_multiplier * self.clip_norm / math.sqrt(self.min_survivors)

    def sum_noise_std(self, survivors: int) -> float:
        """The noise std per coordinate of the decoded sum of `survivors` devices (>= sigma C when survivors >= m)."""
        return self.device_noise_std * math.sqrt(survivors)

    def quantization_error_bound(self, survivors: int) -> float:
        """The largest error per coordinate of the decoded sum when nothing is clipped: one step per device."""
        return survivors * self.step

    @property
    def clipping_probability(self) -> float:
        """Upper bound on the chance that one device's coordinate falls outside [-c, c]."""
        return math.erfc(TAIL_SIGMAS / math.sqrt(2)) if self.noise_multiplier > 0 else 0.0

    def flower_arguments(self) -> tuple[int | float, int | float]:
        """num_shares and reconstruction_threshold for SecAggPlusWorkflow, giving exactly `shares` and `threshold`.

        Flower takes integers only for more than 2 shares and a threshold below them; two
        nodes are given as fractions 1.0 / 1.0, which Flower turns into 2 shares, threshold 2.
        """
        if self.shares >= 3:
            return self.shares, self.threshold
        return 1.0, 1.0

    def summary(self) -> dict[str, float | int]:
        """What the run's secure_aggregation.jsonl and report state about the plan."""
        return {
            "nodes": self.nodes, "shares": self.shares, "threshold": self.threshold, "min_survivors": self.min_survivors, "modulus_bits": MODULUS_BITS,
            "quantization_bits": self.bits, "clipping_range": self.clipping_range, "step": self.step,
            "clipping_probability": self.clipping_probability, "device_noise_std": self.device_noise_std,
        }


def plan_round(config: RunConfig, *, nodes: int, max_users: int, noise_multiplier: float) -> SecureRoundPlan:
    """The plan for a round of `nodes` (at least 2) whose nodes combine at most `max_users` users each."""
    if nodes < 2:
        raise ValueError(f"SecAgg+ needs at least 2 nodes in a round, got {nodes}")
    shares = nodes if config.secagg_num_shares == 0 else min(config.secagg_num_shares, nodes)
    threshold = 2 if shares < 3 else min(max(2, round(config.secagg_reconstruction_threshold * shares)), shares - 1)
    bits = min(MAX_QUANTIZATION_BITS, MODULUS_BITS - math.ceil(math.log2(nodes + 1)))
    device_std = noise_multiplier * config.user_clip_norm / math.sqrt(fewest_survivors(nodes, shares, threshold))
    clipping_range = max_users * config.user_clip_norm * (1 + UPDATE_SLACK) + TAIL_SIGMAS * device_std
    return SecureRoundPlan(
        nodes=nodes, shares=shares, threshold=threshold, bits=bits, clipping_range=clipping_range,
        noise_multiplier=noise_multiplier, clip_norm=config.user_clip_norm,
    )

"""The privacy audit's design: its dataset, the audited models and the simulation overrides that train each one."""

from __future__ import annotations

from fedinterest.benchmarks.federated import VARIANTS

DATASET = "ml-100k"
TARGET_EPSILON = 8.0
# The run stops before a round that would exceed the user-level budget; the noise is
# calibrated for the target exactly, so the budget sits a hair above it for rounding.
USER_BUDGET_SLACK = 0.05
USER_CLIP_NORM = 1.0

# The audited models in table order, each with its label.
LABELS = {
    "no-dp": "no DP",
    "layer-1": "layer 1 (on-device DP-SGD)",
    "layer-2": "layer 2 only (user-level DP-FedAvg, devices train as no DP)",
    "layers-1+2": "layers 1+2 (+ user-level DP-FedAvg)",
}
MODELS = tuple(LABELS)


def user_noise_multiplier(*, target_epsilon: float, delta: float, sample_rate: float, rounds: int) -> float:
    """Layer 2's noise multiplier for user-level `target_epsilon` at `delta` (Opacus's RDP accountant)."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate, steps=rounds, accountant="rdp"))


def overrides_for(model_name: str, *, members: int, rounds: int, clients_per_round: int, target_epsilon: float = TARGET_EPSILON) -> list[str]:
    """The `--set` items of one model's simulation."""
    common = [f"num-supernodes={members}", f"num-server-rounds={rounds}", f"clients-per-round={clients_per_round}"]
    if model_name == "no-dp":
        return VARIANTS["no-dp"] + common
    if model_name == "layer-1":
        return VARIANTS["dp-2.0"] + common
    if model_name in ("layer-2", "layers-1+2"):
        delta = 1.0 / members
        sigma = user_noise_multiplier(target_epsilon=target_epsilon, delta=delta, sample_rate=min(1.0, clients_per_round / members), rounds=rounds)
        layer1 = VARIANTS["dp-2.0"] if model_name == "layers-1+2" else VARIANTS["no-dp"]
        return layer1 + common + [
            f"user-noise-multiplier={sigma!r}",
            f"user-clip-norm={USER_CLIP_NORM!r}",
            f"user-delta={delta!r}",
            f"user-epsilon-budget={target_epsilon + USER_BUDGET_SLACK!r}",
        ]
    raise ValueError(f"unknown model {model_name!r}; choose from {', '.join(MODELS)}")

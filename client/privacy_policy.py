"""The device's own privacy floor: what an operator's run config may not weaken.

The run config (noise multiplier, delta, epsilon budget) comes from the operator. A
device that simply obeyed it could be told to train without noise or with a budget of
1e9, and layer 1 would protect nothing (DESIGN.md: the server is honest but curious;
privacy must hold by construction). So each device keeps its own policy in its store,
set by its user (`fedinterest device init` / `device policy`), and before every round:

- refuses a run that turns DP off (noise-multiplier 0) or states epsilon at a larger
  delta than the device accepts (a larger delta is a weaker guarantee);
- spends at most its own maximum epsilon, whatever budget the run asks for;
- sends its noiseless metrics (training loss, held-out rank) only if the policy allows
  it (`share_metrics`, off by default), whatever the run's share-metrics says.

A refusal is a normal reply (REFUSED = 1), as for an exhausted budget: the round goes on.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

from fedinterest.client.device_store import DeviceStore
from fedinterest.common.run_config import RunConfig

META_POLICY = "privacy-policy"


@dataclass(frozen=True)
class PrivacyPolicy:
    """The weakest layer-1 guarantee this device accepts: epsilon at most `max_epsilon` at delta at most
    `max_delta`; and whether it may send metrics no guarantee covers (`share_metrics`)."""

    max_epsilon: float = RunConfig.epsilon_budget
    max_delta: float = RunConfig.delta
    share_metrics: bool = False

    def __post_init__(self) -> None:
        if not (math.isfinite(self.max_epsilon) and self.max_epsilon > 0):
            raise ValueError(f"the device's max epsilon must be a positive number, got {self.max_epsilon}")
        if not 0 < self.max_delta < 1:
            raise ValueError(f"the device's max delta must be in (0, 1), got {self.max_delta}")
        if not isinstance(self.share_metrics, bool):
            raise ValueError(f"the device's share_metrics must be true or false, got {self.share_metrics!r}")


def load_policy(store: DeviceStore) -> PrivacyPolicy:
    """The policy kept in the store (the defaults for a store that has none)."""
    raw = store.meta(META_POLICY)
    if raw is None:
        return PrivacyPolicy()
    try:
        return PrivacyPolicy(**json.loads(raw))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{store.path}: the stored privacy policy is unreadable ({exc}); set it again with `fedinterest device policy`") from exc


def save_policy(store: DeviceStore, policy: PrivacyPolicy) -> None:
    """Keep `policy` in the store (one transaction)."""
    store.set_meta(META_POLICY, json.dumps(dataclasses.asdict(policy)))


def apply_policy(policy: PrivacyPolicy, run: RunConfig) -> tuple[RunConfig, str | None]:
    """The run as this device will train it (budget capped, metrics shared only if both allow), and the reason to refuse it, if any."""
    run = dataclasses.replace(run, share_metrics=run.share_metrics and policy.share_metrics)
    if not run.private:
        return run, "the run turns DP off (noise-multiplier 0); this device trains only with differential privacy"
    if run.delta > policy.max_delta:
        return run, f"the run's delta {run.delta:g} is above this device's maximum {policy.max_delta:g}"
    return dataclasses.replace(run, epsilon_budget=min(run.epsilon_budget, policy.max_epsilon)), None


def run_for_device(store_path: str, run: RunConfig) -> tuple[RunConfig, str | None]:
    """`apply_policy` with the policy kept in the device store at `store_path`."""
    with DeviceStore(store_path) as store:
        return apply_policy(load_policy(store), run)

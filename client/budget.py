"""The device's privacy budget: epsilon spent (from its ledger), the budget and what remains.

Delta and the budget are those of the last run the device trained in (kept in the store
by the ClientApp); before any run, the defaults of `RunConfig`; the budget never above
the device's own maximum (client/privacy_policy.py). Either can be given explicitly. Epsilon is recomputed by Opacus's RDP accountant from the ledger rows.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedinterest.client.device_store import META_BUDGET, META_DELTA, DeviceStore
from fedinterest.client.ledger import PrivacyLedger
from fedinterest.client.privacy_policy import load_policy
from fedinterest.common.run_config import RunConfig


@dataclass(frozen=True)
class BudgetReport:
    """Example-level (layer-1) privacy spent by this device, at `delta`."""

    epsilon: float
    delta: float
    budget: float
    remaining: float
    rounds: int  # ledger rows: rounds this device was charged for
    steps: int  # DP-SGD steps over all those rounds
    settings_from: str  # "last run", "defaults" or "given"


def privacy_budget(store: DeviceStore, *, delta: float | None = None, budget: float | None = None) -> BudgetReport:
    """The budget report of the device whose store is `store`."""
    defaults = RunConfig()
    epsilon_budget_given = budget
    stored_delta, stored_budget = store.meta(META_DELTA), store.meta(META_BUDGET)
    settings_from = "last run" if stored_delta is not None else "defaults"
    if delta is not None or budget is not None:
        settings_from = "given"
    delta = delta if delta is not None else float(stored_delta) if stored_delta is not None else defaults.delta
    budget = budget if budget is not None else float(stored_budget) if stored_budget is not None else defaults.epsilon_budget
    if epsilon_budget_given is None:
        budget = min(budget, load_policy(store).max_epsilon)  # no run may spend more than the device's policy
    if not 0 < delta < 1 or not budget > 0:
        raise ValueError(f"need 0 < delta < 1 and budget > 0, got delta={delta}, budget={budget}")
    with PrivacyLedger(store.path) as ledger:
        entries = ledger.entries()
        epsilon = ledger.epsilon(delta)
    return BudgetReport(
        epsilon=epsilon, delta=delta, budget=budget, remaining=max(0.0, budget - epsilon),
        rounds=len(entries), steps=sum(e.steps for e in entries), settings_from=settings_from,
    )

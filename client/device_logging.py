"""The ClientApp's log on a device: one readable line per event, and why a round was refused.

Opacus calls `logging.basicConfig` when it is imported, which gives the root logger a
second handler: every record of Flower's logger (a child of root) is printed again in
Opacus's `date:LEVEL:message` format, Flower's empty spacer records as bare
`12/02/2026 00:57:31:INFO:` lines (issue 16). Flower's own console handler already
prints our records (the `flwr.fedinterest` logger is its child), so that handler goes.

docs/device.md promises that a refusal says why in the device's log; a round refused
by the ledger (budget, or a round already charged) is explained here, since
client/local_training.py only returns `refused=True`.
"""

from __future__ import annotations

import logging

from fedinterest.client.ledger import PrivacyLedger
from fedinterest.common.run_config import RunConfig

# The exact format Opacus 1.6 passes to logging.basicConfig (opacus/utils/module_utils.py).
_OPACUS_FORMAT = "%(asctime)s:%(levelname)s:%(message)s"


def drop_opacus_root_handler() -> int:
    """Remove the root handler Opacus's import installed; how many were removed."""
    root = logging.getLogger()
    dropped = [h for h in root.handlers if getattr(h.formatter, "_fmt", None) == _OPACUS_FORMAT]
    for handler in dropped:
        root.removeHandler(handler)
    return len(dropped)


def refusal_reason(ledger: PrivacyLedger, run: RunConfig, run_id: int, server_round: int, epsilon: float) -> str:
    """Why the ledger kept the device from training this round (called after a refused train)."""
    if ledger.entry(run_id, server_round) is not None:
        return (
            f"round {server_round} of run {run_id} was already charged to the privacy ledger (the server retried it); "
            "training it again would release the same data twice"
        )
    return (
        f"the privacy budget: epsilon {epsilon:.4g} already spent at delta {run.delta:g}, and this round would pass "
        f"the budget of {run.epsilon_budget:g} (the smaller of the run's and the device's policy)"
    )

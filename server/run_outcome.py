"""Whether a run trained anything: Flower says "completed" even when no device trained (issue 16).

A run whose every sampled device refused (privacy budget, device policy), failed or sent
an unusable reply ends `finished:completed` with the initial model unchanged. The
verdict is taken from what the ServerApp wrote: final.json's `counts` (replies
aggregated over the run), or, while the run goes on, the rounds of metrics.jsonl
(a round with a training loss had at least one valid update).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fedinterest.common.run_files import FinalReport, RoundRow

TRAINED = "trained"
NOTHING_TRAINED = "nothing-trained"


def trained_replies(final: FinalReport | None, rows: Sequence[RoundRow]) -> int | None:
    """Updates aggregated over the run (final.json), or rounds with a training loss so far; None before any round."""
    counts = final.counts if final is not None else {}
    if "aggregated" in counts:
        return int(counts["aggregated"])
    if not rows:
        return None
    return sum(1 for row in rows if row.number("train_loss") is not None)


def outcome(final: FinalReport | None, rows: Sequence[RoundRow], devices: dict[str, int]) -> dict[str, Any]:
    """`trained` (bool, None while unknown), `verdict` and, when nothing trained, why in one sentence."""
    aggregated = trained_replies(final, rows)
    if aggregated is None or (aggregated == 0 and final is None):
        return {"trained": None if aggregated is None else False, "verdict": None, "why": None}
    if aggregated > 0:
        return {"trained": True, "verdict": TRAINED, "why": None}
    why = (
        f"no device trained: of {devices['sampled']} device replies requested, {devices['refused']} refused "
        f"(privacy budget spent or the device's privacy policy), {devices['failed']} failed, "
        f"{devices['rejected']} were rejected and {devices.get('empty', 0)} had too little history; the global model is the initial one"
    )
    return {"trained": False, "verdict": NOTHING_TRAINED, "why": why}

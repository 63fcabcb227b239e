"""The highest cumulative example-level epsilon each user reported (layer 1), kept across rounds."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from fedinterest.common.run_files import DEVICE_EPSILON_MAX, DEVICE_EPSILON_MEAN


@dataclass
class PrivacyTally:
    """The highest cumulative epsilon each user reported so far, by the user's stable name.

    A user's name is its dataset index in simulation (server/cohort.py), so a resumed run
    counts the same user under the same name; a device of a deployment is named by its
    node id. Users that reported inf (no DP) are listed apart, so every stored number is finite.
    """

    device_max: dict[str, float] = field(default_factory=dict)
    without_dp: set[str] = field(default_factory=set)

    def update(self, epsilons: dict[str, float]) -> None:
        """Fold in one round's reported epsilons."""
        for user, eps in epsilons.items():
            key = str(user)
            if math.isinf(eps):
                self.without_dp.add(key)
            else:
                self.device_max[key] = max(eps, self.device_max.get(key, 0.0))

    def to_json(self) -> dict[str, Any]:
        """JSON-safe state for the checkpoint manifest."""
        return {DEVICE_EPSILON_MAX: dict(sorted(self.device_max.items())), "devices_without_dp": sorted(self.without_dp)}

    @classmethod
    def from_json(cls, state: dict[str, Any]) -> PrivacyTally:
        """Inverse of `to_json` (an empty mapping gives an empty tally)."""
        return cls(
            device_max={str(k): float(v) for k, v in (state.get(DEVICE_EPSILON_MAX) or {}).items()},
            without_dp=set(state.get("devices_without_dp") or ()),
        )

    def summary(self, delta: float) -> dict[str, Any]:
        """What final.json reports about privacy."""
        values = list(self.device_max.values())
        dp = None if not values and not self.without_dp else not self.without_dp
        return {
            "unit": (
                "per-device cumulative example-level (epsilon, delta)-DP of layer 1 for adding or removing one training "
                "window (the window count stays on the device); Opacus RDP accountant on the device, which trusts no one else"
            ),
            "delta": delta,
            "dp": dp,
            DEVICE_EPSILON_MAX: max(values) if values and dp else None,
            DEVICE_EPSILON_MEAN: sum(values) / len(values) if values and dp else None,
            "devices_reporting": len(set(self.device_max) | self.without_dp),
            "devices_without_dp": len(self.without_dp),
        }

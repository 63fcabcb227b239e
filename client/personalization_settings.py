"""How the device personalizes its ranking (client/personalization.py), without importing torch:
the device CLI names the defaults in its options, and `--help` must stay fast (issue 16)."""

from __future__ import annotations

import math
from dataclasses import dataclass

DEFAULT_STEPS = 10
DEFAULT_LR = 1e-2
MAX_STEPS = 1000  # far beyond any useful count: a typo (steps=30000) fails instead of hanging the device


@dataclass(frozen=True)
class PersonalizationSettings:
    """How many full-batch Adam steps on the user's windows, at which learning rate; steps 0 = off."""

    steps: int = DEFAULT_STEPS
    lr: float = DEFAULT_LR

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or not 0 <= self.steps <= MAX_STEPS:
            raise ValueError(f"personalization steps must be an integer from 0 (off) to {MAX_STEPS}, got {self.steps!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"personalization learning rate must be a positive finite number, got {self.lr!r}")

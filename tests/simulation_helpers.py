"""A tiny real simulation for the end-to-end tests: a sequences file and its config."""

from __future__ import annotations

import random
from pathlib import Path

USERS, ITEMS = 4, 40
# Guards the test against a hung run: the runner stops Flower and fails after this.
TIMEOUT_MINUTES = "4"

TINY = """
[run]
dataset = "sequences"
data-path = "tiny.seq"
num-server-rounds = 2
clients-per-round = 4   # every device trains every round, so every epsilon grows
local-epochs = 1
batch-size = 2
noise-multiplier = 1.0  # real Opacus noise and clipping
max-grad-norm = 1.0
epsilon-budget = 1000.0
max-len = 10
dim = 8
num-blocks = 1
num-heads = 1
dropout = 0.0
eval-every = 1
round-timeout = 120.0

[federation]
num-supernodes = 4
"""


def write_sequences(path: Path, seed: int = 0, duplicate_user: bool = False, users: int = USERS) -> None:
    """`users` users with 8-12 distinct items each out of ITEMS, one `user item item ...` line per user."""
    rng = random.Random(seed)
    lines = [f"u{u} " + " ".join(f"i{i}" for i in rng.sample(range(1, ITEMS + 1), rng.randint(8, 12))) for u in range(users)]
    if duplicate_user:
        lines.append(lines[0])  # a user on two lines: the loader rejects the file
    path.write_text("\n".join(lines) + "\n")

"""The leave-one-out split by time of DESIGN.md's evaluation protocol.

For every user with at least three interactions, the last one is the test target, the
one before it the validation target, and the rest trains. Users with fewer are left
out of training and evaluation, and the split says how many.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedinterest.common.constants import MIN_INTERACTIONS_FOR_SPLIT
from fedinterest.common.interactions import SequenceDataset


@dataclass(frozen=True)
class UserSplit:
    """One user's history cut for evaluation; `user` indexes the dataset's users."""

    user: int
    train: np.ndarray
    valid: int
    test: int

    def history(self, stage: str) -> np.ndarray:
        """Items the model sees before the `stage` target ("valid" or "test")."""
        if stage == "valid":
            return self.train
        if stage == "test":
            return np.append(self.train, self.valid)
        raise ValueError(f"stage must be 'valid' or 'test', got {stage!r}")

    def target(self, stage: str) -> int:
        """The held-out item of `stage`."""
        if stage not in ("valid", "test"):
            raise ValueError(f"stage must be 'valid' or 'test', got {stage!r}")
        return self.valid if stage == "valid" else self.test


@dataclass(frozen=True)
class LeaveOneOut:
    """The split of a whole dataset: one `UserSplit` per kept user (= one partition)."""

    dataset: SequenceDataset
    users: tuple[UserSplit, ...]
    users_left_out: int

    @property
    def num_items(self) -> int:
        return self.dataset.num_items

    def __len__(self) -> int:
        return len(self.users)


def leave_one_out(dataset: SequenceDataset) -> LeaveOneOut:
    """Split every user with enough history; count those without."""
    kept = []
    for u, seq in enumerate(dataset.sequences):
        if len(seq) >= MIN_INTERACTIONS_FOR_SPLIT:
            kept.append(UserSplit(user=u, train=seq[:-2], valid=int(seq[-2]), test=int(seq[-1])))
    return LeaveOneOut(dataset=dataset, users=tuple(kept), users_left_out=dataset.num_users - len(kept))

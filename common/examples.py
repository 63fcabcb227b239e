"""Training examples and model inputs built from item sequences.

One training example -- the unit that on-device DP-SGD protects -- is one window of
up to `max_len` consecutive (input item, next item) pairs from a user's training
history, i.e. up to `max_len + 1` consecutive items. A history is cut into such
windows from its most recent end so that every *pair* is in exactly one window, and
every training interaction but the first is the target of exactly one example. The
windows share their boundary items: the target of an older window's last pair is the
input of the next window's first pair, so one interaction can touch two windows
(docs/privacy.md, "What this does not protect": group privacy applies to it).
"""

from __future__ import annotations

import numpy as np
import torch

from fedinterest.common.constants import PAD_ID


def training_windows(train: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(W, max_len) inputs and next-item targets from one training history, left-padded.

    A history of n items gives n - 1 pairs and ceil((n - 1) / max_len) windows; a
    history of fewer than two items gives none.
    """
    pairs = len(train) - 1
    if pairs < 1:
        return np.zeros((0, max_len), dtype=np.int64), np.zeros((0, max_len), dtype=np.int64)
    num_windows = -(-pairs // max_len)
    inputs = np.full((num_windows, max_len), PAD_ID, dtype=np.int64)
    targets = np.full((num_windows, max_len), PAD_ID, dtype=np.int64)
    for w in range(num_windows):
        end = pairs - w * max_len  # exclusive end of this window's pair indices
        start = max(0, end - max_len)
        width = end - start
        inputs[w, max_len - width :] = train[start:end]
        targets[w, max_len - width :] = train[start + 1 : end + 1]
    return inputs, targets


def stack_windows(histories: list[np.ndarray], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All users' training windows as (N, max_len) input and target tensors."""
    parts = [training_windows(h, max_len) for h in histories]
    inputs = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, max_len), dtype=np.int64)
    targets = np.concatenate([p[1] for p in parts]) if parts else np.zeros((0, max_len), dtype=np.int64)
    return torch.from_numpy(inputs), torch.from_numpy(targets)


def history_batch(histories: list[np.ndarray], max_len: int) -> torch.Tensor:
    """(B, L) model input: each history's last `max_len` items, left-padded with PAD_ID.

    L is the longest (truncated) history in the batch, so short batches stay cheap.
    """
    length = max(1, min(max_len, max((len(h) for h in histories), default=1)))
    batch = np.full((len(histories), length), PAD_ID, dtype=np.int64)
    for row, history in enumerate(histories):
        tail = history[-length:]
        if len(tail):
            batch[row, length - len(tail) :] = tail
    return torch.from_numpy(batch)


def trim_padding(items: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the leading columns that are padding in every row (left padding only).

    The model's outputs at real positions do not depend on how much padding precedes
    them, so trimming changes no loss value, only the work done.
    """
    real_cols = (items != PAD_ID).any(dim=0).nonzero()
    first = int(real_cols[0]) if len(real_cols) else items.shape[1] - 1
    return items[:, first:], targets[:, first:]


def bucketed_batches(
    inputs: torch.Tensor, targets: torch.Tensor, batch_size: int, generator: torch.Generator
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of shuffled batches that group windows of similar length, padding trimmed.

    Windows are ordered by real length with random tie-breaking, cut into batches, and
    the batches shuffled: every window appears once per epoch, as with a shuffled
    loader, but a batch of short windows no longer pays for the longest one.
    """
    lengths = (inputs != PAD_ID).sum(dim=1).to(torch.float64)
    jitter = torch.rand(len(inputs), generator=generator, dtype=torch.float64)
    order = torch.argsort(lengths + jitter)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    shuffled = torch.randperm(len(batches), generator=generator)
    return [trim_padding(inputs[batches[b]], targets[batches[b]]) for b in shuffled.tolist()]

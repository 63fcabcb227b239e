"""The FedSGD update of many users at once: one batched pass instead of a loop over users.

A FedSGD device takes one plain SGD step over all its training windows from the
global model, so its update is `-lr * g_u`, with `g_u` the gradient of its own loss
`L_u` (mean over its windows of each window's mean next-item cross-entropy, the loss
`client.local_training` trains). A virtual node that stands for a shard of users
(docs/simulations.md, "Shards") needs, per round, either

- the example-weighted sum of its users' updates (FedAvg without user-level DP): the
  gradient of `sum_u W_u L_u`, one ordinary backward pass; or
- the sum of its users' updates each clipped to L2 norm C (user-level DP-FedAvg):
  `sum_u min(1, C / ||lr g_u||) * (-lr g_u)`. Clipping needs every user's own norm.

Per-user norms without a loop. The users' losses are independent (no layer mixes
rows), so one backward pass of `sum_u L_u` gives every layer's per-position
backprops of every user. From them and the layer inputs captured in the forward pass:

- small layers (Transformer blocks, LayerNorms, position embedding): Opacus's own
  per-sample gradient functions give one gradient per window, summed over each
  user's windows (a user with a long history has several windows: the unit is the
  user, not the row);
- the item embedding: a user's gradient touches only the rows of its items, so its
  norm is summed over (user, item) pairs -- O(positions x dim);
- the output head (table rows x dim): for a user with P scored positions its gradient
  is `G^T A` (P x rows backprops, P x dim inputs); its squared norm is
  `<A A^T, G G^T>` ("ghost" norm, Li et al. 2022), which costs P^2 (rows + dim)
  instead of P x rows x dim, so it is used when P is below about `dim`, and the
  gradient is formed explicitly otherwise;
- the variants of common/model.py: with attribute item vectors the item table holds
  attributes (a position looks up several rows) and the head scores attributes, mixed
  into item scores by a fixed matrix (autograd hands the head its backprops through
  it), and a per-item bias (`ItemBias`) takes the per-position sum; a tied head shares
  the item table, so a user's gradient of it is the sum of both uses and its squared
  norm adds twice their inner product.

The clipped sum is then formed layer by layer from the same inputs and backprops,
each user's positions weighted by its clipping factor -- no second backward pass
(the "book-keeping" form of Bu et al. 2023). The head and the item embedding are
frozen during the pass, so autograd never forms their (unclipped) weight gradients.
`tests/test_user_gradients.py` checks the result against one autograd pass per user.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from opacus.grad_sample import GradSampleModule
from torch import nn

from fedinterest.common.constants import PAD_ID
from fedinterest.common.examples import training_windows, trim_padding
from fedinterest.common.model import InterestModel

# Rows (training windows) per batched pass: the centralized trainer's batch size, so a
# shard does the centralized trainer's arithmetic in pieces of the same size.
CHUNK_ROWS = 128
# Users whose head gradient norm is computed together in one ghost-norm group.
GHOST_GROUP = 32


@dataclass(frozen=True)
class UserUpdates:
    """The combined update of a group of users and what each user contributed.

    `total` has the model's parameter names and shapes: the example-weighted sum of the
    users' updates (no clipping) or the sum of their clipped updates. `norms` are the
    L2 norms of each user's update before clipping (None when not clipped), `losses`
    each user's training loss at the global model, `windows` each user's window count.
    """

    total: dict[str, torch.Tensor]
    norms: torch.Tensor | None
    losses: torch.Tensor
    windows: torch.Tensor


@dataclass(frozen=True)
class _Chunk:
    users: np.ndarray  # positions of the chunk's users in the caller's list
    inputs: torch.Tensor  # (R, L) rows grouped by user, padding trimmed
    targets: torch.Tensor  # (R, L)
    row_user: torch.Tensor  # (R,) index into `users` of each row's user
    row_weight: torch.Tensor  # (R,) 1 / (W_u * targets in the row): L_u's weight of each row


def fedsgd_user_updates(
    model: InterestModel,
    histories: Sequence[np.ndarray],
    *,
    lr: float,
    clip_norm: float | None = None,
    chunk_rows: int = CHUNK_ROWS,
) -> UserUpdates:
    """Every user's one-step SGD update from `model`'s weights, combined (see the module docstring).

    `histories` are the users' training histories (item indices); a user with fewer than
    two items has no window and contributes nothing. The model stays unchanged; it is
    put in training mode (dropout as in local training).
    """
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if clip_norm is not None and not clip_norm > 0:
        raise ValueError(f"clip_norm must be positive, got {clip_norm}")
    names: dict[torch.Tensor, str] = {param: name for name, param in model.named_parameters()}  # parameters by identity
    total = {name: torch.zeros_like(param) for param, name in names.items()}
    count = len(histories)
    losses = torch.zeros(count)
    norms = torch.zeros(count) if clip_norm is not None else None
    windows = torch.zeros(count, dtype=torch.long)
    model.train()
    for chunk in _chunks(histories, model.config.max_len, chunk_rows, windows):
        if clip_norm is None:
            chunk_losses = _weighted_sum(model, chunk, total, names, lr, windows)
        else:
            chunk_losses, chunk_norms = _clipped_sum(model, chunk, total, names, lr, clip_norm)
            assert norms is not None  # allocated above whenever clip_norm is set
            norms[chunk.users] = chunk_norms
        losses[chunk.users] = chunk_losses
    return UserUpdates(total=total, norms=norms, losses=losses, windows=windows)


def _chunks(histories: Sequence[np.ndarray], max_len: int, chunk_rows: int, windows: torch.Tensor) -> Iterator[_Chunk]:
    """The users' windows in pieces of about `chunk_rows` rows, users of similar length together."""
    per_user = [training_windows(np.asarray(h, dtype=np.int64), max_len) for h in histories]
    for index, (inputs, _) in enumerate(per_user):
        windows[index] = len(inputs)
    # Short users together, so trimming the padding of a chunk saves most of its work.
    longest = np.array([int((w[0] != PAD_ID).sum(axis=1).max()) if len(w[0]) else 0 for w in per_user])
    order = [int(u) for u in np.argsort(longest, kind="stable") if len(per_user[u][0])]
    start = 0
    while start < len(order):
        end, rows = start, 0
        while end < len(order) and (end == start or rows + len(per_user[order[end]][0]) <= chunk_rows):
            rows += len(per_user[order[end]][0])
            end += 1
        users = np.array(order[start:end])
        yield _chunk(users, [per_user[u] for u in users])
        start = end


def _chunk(users: np.ndarray, parts: list[tuple[np.ndarray, np.ndarray]]) -> _Chunk:
    inputs = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    targets = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    inputs, targets = trim_padding(inputs, targets)
    counts = torch.tensor([len(p[0]) for p in parts])
    row_user = torch.repeat_interleave(torch.arange(len(parts)), counts)
    per_row_targets = (targets != PAD_ID).sum(dim=1).clamp(min=1)
    row_weight = 1.0 / (counts[row_user] * per_row_targets).to(torch.float32)
    return _Chunk(users=users, inputs=inputs, targets=targets, row_user=row_user, row_weight=row_weight)


def _position_losses(model: InterestModel, chunk: _Chunk) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted cross-entropy of every scored position (packed, as the centralized trainer) and its row."""
    hidden = model.encode(chunk.inputs)  # (R, L, D)
    has_target = chunk.targets != PAD_ID  # (R, L)
    logits = model.scores(hidden[has_target])  # (N, V)
    rows = has_target.nonzero()[:, 0]  # (N,) row of each scored position, grouped by user
    per_position = F.cross_entropy(logits, chunk.targets[has_target], reduction="none") * chunk.row_weight[rows]
    return per_position, rows


def _user_losses(per_position: torch.Tensor, rows: torch.Tensor, chunk: _Chunk) -> torch.Tensor:
    return torch.zeros(len(chunk.users)).index_add_(0, chunk.row_user[rows], per_position.detach())


def _weighted_sum(
    model: InterestModel, chunk: _Chunk, total: dict[str, torch.Tensor], names: dict[torch.Tensor, str], lr: float, windows: torch.Tensor
) -> torch.Tensor:
    """Add sum_u W_u * (-lr g_u) of the chunk's users to `total`: one ordinary backward pass."""
    model.zero_grad(set_to_none=True)
    per_position, rows = _position_losses(model, chunk)
    user_weight = windows[torch.from_numpy(chunk.users)].to(torch.float32)  # W_u
    (per_position * user_weight[chunk.row_user[rows]]).sum().backward()
    with torch.no_grad():
        for param, name in names.items():
            if param.grad is not None:
                total[name] -= lr * param.grad
    model.zero_grad(set_to_none=True)
    return _user_losses(per_position, rows, chunk)


class _Capture:
    """Forward hooks that keep each parametrised layer's input and its output's gradient."""

    def __init__(self, model: InterestModel) -> None:
        self.inputs: dict[nn.Module, torch.Tensor] = {}
        self.grads: dict[nn.Module, torch.Tensor] = {}
        self._frozen = {m for m in (model.item_emb, model.head, model.item_bias) if m is not None}
        self._handles = [
            module.register_forward_hook(self._hook)
            for module in model.modules()
            if any(p.requires_grad for p in module.parameters(recurse=False)) or module in self._frozen
        ]

    def _hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor | None:
        if module in self.inputs:
            raise RuntimeError(f"{type(module).__name__} ran twice in one pass: shared weights need their own rule")
        self.inputs[module] = inputs[0].detach()
        replaced = None
        if module in self._frozen and not output.requires_grad:
            # A frozen embedding's output: a leaf, so the backward pass still reaches it.
            output = replaced = output.detach().requires_grad_(True)
        output.register_hook(lambda grad, module=module: self.grads.__setitem__(module, grad.detach()))
        return replaced

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def _clipped_sum(
    model: InterestModel, chunk: _Chunk, total: dict[str, torch.Tensor], names: dict[torch.Tensor, str], lr: float, clip_norm: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Add sum_u clip(-lr g_u, C) of the chunk's users to `total`; (losses, update norms)."""
    big = [p for m in (model.item_emb, model.head, model.item_bias) if m is not None for p in m.parameters()]
    for param in big:
        param.requires_grad_(False)
    capture = _Capture(model)
    try:
        model.zero_grad(set_to_none=True)
        per_position, rows = _position_losses(model, chunk)
        per_position.sum().backward()
    finally:
        capture.close()
        for param in big:
            param.requires_grad_(True)
        model.zero_grad(set_to_none=True)
    users = len(chunk.users)
    position_user = chunk.row_user[rows]
    with torch.no_grad():
        small = _small_layer_grads(model, capture, chunk.row_user, users)
        sq_norms = sum((g.reshape(users, -1).square().sum(dim=1) for g in small.values()), torch.zeros(users))
        table = _sparse_rows(*_embedding_positions(capture, model.item_emb, chunk.row_user), users, model.item_emb.num_embeddings)
        sq_norms += table.sq_norms
        head_in, head_grad = capture.inputs[model.head], capture.grads[model.head]
        sq_norms += _head_sq_norms(head_in, head_grad, position_user, users, with_bias=model.head.bias is not None)
        if model.head.weight is model.item_emb.weight:
            sq_norms += 2 * _tied_inner_products(table, head_in, head_grad, position_user, users)
        if model.item_bias is not None:
            item_grad = capture.grads[model.item_bias]  # (N, V+1): the bias's per-position gradient
            sq_norms += torch.zeros(users, item_grad.shape[1]).index_add_(0, position_user, item_grad).square().sum(dim=1)
        norms = lr * sq_norms.sqrt()
        scale = (clip_norm / norms.clamp(min=1e-12)).clamp(max=1.0)  # min(1, C / ||update||)
        for param, per_user in small.items():
            total[names[param]] -= lr * torch.tensordot(scale, per_user, dims=1)
        total[names[model.item_emb.weight]].index_add_(0, table.ids, table.grads * (-lr * scale[table.users])[:, None])
        # Weighting the (N, D) inputs rather than the (N, rows) backprops: the same product, rows / D times cheaper.
        position_scale = -lr * scale[position_user]  # (N,)
        total[names[model.head.weight]] += head_grad.T @ (head_in * position_scale[:, None])
        if model.head.bias is not None:
            total[names[model.head.bias]] += head_grad.T @ position_scale
        if model.item_bias is not None:
            total[names[model.item_bias.bias]] += capture.grads[model.item_bias].T @ position_scale
    return _user_losses(per_position, rows, chunk), norms


def _small_layer_grads(model: InterestModel, capture: _Capture, row_user: torch.Tensor, users: int) -> dict[nn.Parameter, torch.Tensor]:
    """Per-user gradients of every layer but the item embedding and the head: Opacus's
    per-sample (per-row) gradients, summed over each user's rows."""
    grads: dict[nn.Parameter, torch.Tensor] = {}
    for module, inputs in capture.inputs.items():
        if module in (model.item_emb, model.head, model.item_bias):
            continue
        sampler = GradSampleModule.GRAD_SAMPLERS.get(type(module))
        if sampler is None:
            raise TypeError(f"no per-sample gradient for {type(module).__name__}: the model has a layer Opacus does not support")
        for param, per_row in sampler(module, [inputs], capture.grads[module]).items():
            per_user = torch.zeros((users, *per_row.shape[1:]), dtype=per_row.dtype).index_add_(0, row_user, per_row)
            grads[param] = grads[param] + per_user if param in grads else per_user
    return grads


def _embedding_positions(capture: _Capture, embedding: nn.Embedding, row_user: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(table row, output gradient, user) of every real lookup of the embedding (ids of any shape (R, ...))."""
    ids = capture.inputs[embedding]  # (R, L) item ids, or (R, L, K) attribute ids
    real = ids != PAD_ID
    rows = real.nonzero()[:, 0]
    return ids[real], capture.grads[embedding][real], row_user[rows]


@dataclass(frozen=True)
class _SparseRows:
    """A table's per-user gradients, kept sparse: the summed gradient of each (user, row) touched."""

    ids: torch.Tensor  # (M,) table row of each lookup
    grads: torch.Tensor  # (M, D) its output gradient
    users: torch.Tensor  # (M,) its user
    key_users: torch.Tensor  # (K,) user of each (user, row) pair
    key_rows: torch.Tensor  # (K,) row of each pair
    sums: torch.Tensor  # (K, D) summed gradient of each pair
    sq_norms: torch.Tensor  # (U,) each user's squared gradient norm of the table


def _sparse_rows(ids: torch.Tensor, grads: torch.Tensor, users_of: torch.Tensor, users: int, rows: int) -> _SparseRows:
    """Each user's gradient of an embedding table as per (user, row) sums: only the rows it touched are formed."""
    keys = users_of * rows + ids
    unique, inverse = torch.unique(keys, return_inverse=True)
    sums = torch.zeros(len(unique), grads.shape[1], dtype=grads.dtype).index_add_(0, inverse, grads)
    key_users = unique // rows
    sq = torch.zeros(users, dtype=grads.dtype).index_add_(0, key_users, sums.square().sum(dim=1))
    return _SparseRows(ids, grads, users_of, key_users, unique % rows, sums, sq)


def _tied_inner_products(table: _SparseRows, inputs: torch.Tensor, grads: torch.Tensor, position_user: torch.Tensor, users: int) -> torch.Tensor:
    """Each user's <table gradient as embedding, table gradient as head> for a tied table.

    The head part of row r is sum_p g_p[r] a_p over the user's positions, so the inner
    product is sum over the user's (row r, position p) of g_p[r] (a_p . s_r), s_r the
    row's summed embedding gradient -- formed user by user, rows x positions each.
    """
    counts = torch.bincount(position_user, minlength=users)
    starts = torch.cumsum(counts, dim=0) - counts
    order = torch.argsort(table.key_users, stable=True)
    key_counts = torch.bincount(table.key_users, minlength=users)
    key_starts = torch.cumsum(key_counts, dim=0) - key_counts
    out = torch.zeros(users, dtype=grads.dtype)
    for user in (key_counts * counts > 0).nonzero()[:, 0].tolist():
        keys = order[int(key_starts[user]) : int(key_starts[user] + key_counts[user])]
        positions = slice(int(starts[user]), int(starts[user] + counts[user]))
        dots = inputs[positions] @ table.sums[keys].T  # (P, R): a_p . s_r
        out[user] = (grads[positions][:, table.key_rows[keys]] * dots).sum()
    return out


def _head_sq_norms(inputs: torch.Tensor, grads: torch.Tensor, position_user: torch.Tensor, users: int, *, with_bias: bool) -> torch.Tensor:
    """Each user's squared gradient norm of the head (weight, and bias when it has one) from
    its positions' inputs (N, D) and output gradients (N, rows); positions are grouped by user."""
    counts = torch.bincount(position_user, minlength=users)
    starts = torch.cumsum(counts, dim=0) - counts
    dim, catalogue = inputs.shape[1], grads.shape[1]
    # Ghost norm while P^2 (V + D) < P V D, i.e. P < V D / (V + D) (about D for a large catalogue).
    ghost_below = dim * catalogue / (dim + catalogue)
    sq = torch.zeros(users, dtype=grads.dtype)
    # Users with the same position count P form one (n, P, .) batch: no padding to mask.
    ghost = (counts > 0) & (counts < ghost_below)
    for width in torch.unique(counts[ghost]).tolist():
        same = ((counts == width) & ghost).nonzero()[:, 0]
        for group in same.split(GHOST_GROUP):
            first = starts[group]
            if bool((first[1:] - first[:-1] == width).all()):  # consecutive users: a view, no copy
                start = int(first[0])
                a = inputs[start : start + len(group) * width].view(len(group), width, dim)
                g = grads[start : start + len(group) * width].view(len(group), width, catalogue)
            else:
                index = first[:, None] + torch.arange(width)[None, :]  # (n, P)
                a, g = inputs[index], grads[index]
            ggt = g @ g.transpose(1, 2)  # (n, P, P)
            # weight: <A A^T, G G^T>; bias: ||sum_p g_p||^2, the sum of G G^T
            sq[group] = ((a @ a.transpose(1, 2)) * ggt).sum(dim=(1, 2)) + (ggt.sum(dim=(1, 2)) if with_bias else 0.0)
    for user in (counts >= ghost_below).nonzero()[:, 0].tolist():
        start, end = int(starts[user]), int(starts[user] + counts[user])
        g = grads[start:end]
        sq[user] = (g.T @ inputs[start:end]).square().sum() + (g.sum(dim=0).square().sum() if with_bias else 0.0)
    return sq

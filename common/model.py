"""The long-term interest model: a SASRec-style causal self-attention encoder.

A history of item indices (left-padded with PAD_ID, most recent item last) goes
through item + position embeddings and a few pre-LayerNorm Transformer blocks; the
hidden state at each position is the user's interest representation after that item,
and a linear head scores the whole catalogue from it.

Built for Opacus from day one (see DESIGN.md, runtime notes):
- every trainable parameter is used through a module Opacus computes per-sample
  gradients for (Embedding, Linear, LayerNorm); attention is two `nn.Linear`
  projections around `F.scaled_dot_product_attention`, never `nn.MultiheadAttention`;
- the output head is its own `nn.Linear`, not tied to the item embedding, because a
  tied `h @ emb.weight.T` is silently left out of Opacus's per-sample gradients;
- padded positions are zeroed after the embeddings and after every block, so they
  contribute nothing to any gradient (Opacus ignores `padding_idx`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fedinterest.common.constants import PAD_ID
from fedinterest.common.model_config import ModelConfig  # noqa: F401 (re-exported: the model's shape)


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention from Linear projections (Opacus-compatible)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.dim, 3 * config.dim)
        self.proj = nn.Linear(config.dim, config.dim)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).split(dim, dim=2)  # 3 x (B, L, D)
        head_dim = dim // self.num_heads
        # (B, L, D) -> (B, H, L, D/H)
        q = q.view(batch, length, self.num_heads, head_dim).transpose(1, 2)
        k = k.view(batch, length, self.num_heads, head_dim).transpose(1, 2)
        v = v.view(batch, length, self.num_heads, head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )  # (B, H, L, D/H)
        y = y.transpose(1, 2).contiguous().view(batch, length, dim)  # (B, L, D)
        return self.proj(y)


class Block(nn.Module):
    """Pre-LayerNorm Transformer block: attention then a GELU feed-forward layer."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(config.dim)
        self.attn = CausalSelfAttention(config)
        self.ln_ff = nn.LayerNorm(config.dim)
        self.ff_in = nn.Linear(config.dim, 4 * config.dim)
        self.ff_out = nn.Linear(4 * config.dim, config.dim)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_attn(x), attn_mask))
        x = x + self.drop(self.ff_out(self.drop(F.gelu(self.ff_in(self.ln_ff(x))))))
        return x


class InterestModel(nn.Module):
    """SASRec-style encoder of a user's history that scores the whole catalogue."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        # Row PAD_ID of the item table exists but never reaches a gradient (masked below).
        self.item_emb = nn.Embedding(config.num_items + 1, config.dim)
        self.pos_emb = nn.Embedding(config.max_len, config.dim)
        self.emb_drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_blocks))
        self.ln_out = nn.LayerNorm(config.dim)
        # Column PAD_ID of the head is never a target and is masked out at ranking time.
        self.head = nn.Linear(config.dim, config.num_items + 1)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def encode(self, items: torch.Tensor) -> torch.Tensor:
        """(B, L) item indices, left-padded -> (B, L, D) interest states, zero at padding."""
        batch, length = items.shape
        if length > self.config.max_len:
            raise ValueError(f"history of length {length} exceeds max_len={self.config.max_len}")
        keep = (items != PAD_ID).unsqueeze(-1)  # (B, L, 1)
        # Positions count from the right so the most recent item always has the same
        # position embedding, whatever the history length. contiguous(): Opacus's
        # ghost-clipping mode needs contiguous index tensors.
        positions = torch.arange(length - 1, -1, -1, device=items.device).expand(batch, length).contiguous()
        x = (self.item_emb(items) * math.sqrt(self.config.dim) + self.pos_emb(positions)) * keep
        x = self.emb_drop(x)
        attn_mask = self._attention_mask(items)
        for block in self.blocks:
            x = block(x, attn_mask) * keep
        return self.ln_out(x) * keep

    @staticmethod
    def _attention_mask(items: torch.Tensor) -> torch.Tensor:
        """(B, 1, L, L) boolean: query i may attend key j <= i that is not padding.

        Each position may always attend itself, so a padded query never has an empty
        row (which would give NaN); its output is zeroed by `encode` anyway.
        """
        length = items.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=items.device).tril()  # (L, L)
        real_key = (items != PAD_ID)[:, None, None, :]  # (B, 1, 1, L)
        eye = torch.eye(length, dtype=torch.bool, device=items.device)
        return (causal & real_key) | eye  # (B, 1, L, L)

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        """(B, L) histories -> (B, L, num_items + 1) catalogue scores after every position."""
        return self.head(self.encode(items))

    def score_last(self, items: torch.Tensor) -> torch.Tensor:
        """(B, L) histories -> (B, num_items + 1) scores for the item that comes next."""
        return self.head(self.encode(items)[:, -1, :])


def sequence_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over examples of each example's mean next-item cross-entropy.

    logits (B, L, V), targets (B, L) with PAD_ID where there is no target. One
    example's loss does not depend on the others', and the batch loss is their mean:
    the form Opacus's `loss_reduction="mean"` assumes.
    """
    per_token = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=PAD_ID, reduction="none")  # (B, L)
    counts = (targets != PAD_ID).sum(dim=1).clamp(min=1)  # (B,)
    return (per_token.sum(dim=1) / counts).mean()


def packed_sequence_loss(model: InterestModel, items: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The value of `sequence_loss(model(items), targets)`, scoring only positions with a target.

    Skipping padded positions saves most of the catalogue-head work on short windows;
    it gathers rows across examples, so it is for non-private training only (Opacus
    needs the dense (B, L, V) form to keep gradients per example).
    """
    hidden = model.encode(items)  # (B, L, D)
    has_target = targets != PAD_ID  # (B, L)
    logits = model.head(hidden[has_target])  # (N, V)
    per_token = F.cross_entropy(logits, targets[has_target], reduction="none")  # (N,)
    rows = has_target.nonzero()[:, 0]  # (N,) example of each scored position
    per_example = torch.zeros(items.shape[0], dtype=per_token.dtype, device=items.device).index_add(0, rows, per_token)
    counts = has_target.sum(dim=1).clamp(min=1)  # (B,)
    return (per_example / counts).mean()


def sampled_sequence_loss(
    model: InterestModel, items: torch.Tensor, targets: torch.Tensor, num_negatives: int
) -> torch.Tensor:
    """Sampled-softmax version of `packed_sequence_loss`: each target competes with
    `num_negatives` items drawn uniformly (shared by the batch) instead of the whole
    catalogue. Cheaper for very large catalogues; it reads the head's weight rows
    directly, so it is for non-private training only. Negatives equal to a position's
    target are masked out (accidental hits); uniform sampling needs no logQ correction.
    """
    hidden = model.encode(items)  # (B, L, D)
    has_target = targets != PAD_ID  # (B, L)
    h = hidden[has_target]  # (N, D)
    positives = targets[has_target]  # (N,)
    negatives = torch.randint(1, model.config.num_items + 1, (num_negatives,), device=items.device)  # (K,)
    weight, bias = model.head.weight, model.head.bias
    pos_logits = (h * weight[positives]).sum(dim=-1) + bias[positives]  # (N,)
    neg_logits = h @ weight[negatives].T + bias[negatives]  # (N, K)
    neg_logits = neg_logits.masked_fill(negatives[None, :] == positives[:, None], float("-inf"))
    logits = torch.cat([pos_logits[:, None], neg_logits], dim=1)  # (N, 1 + K), positive first
    per_token = F.cross_entropy(logits, torch.zeros(len(h), dtype=torch.long, device=items.device), reduction="none")
    rows = has_target.nonzero()[:, 0]
    per_example = torch.zeros(items.shape[0], dtype=per_token.dtype, device=items.device).index_add(0, rows, per_token)
    return (per_example / has_target.sum(dim=1).clamp(min=1)).mean()

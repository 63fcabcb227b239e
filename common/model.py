"""The long-term interest model: a SASRec-style causal self-attention encoder.

A history of item indices (left-padded with PAD_ID, most recent item last) goes
through item + position embeddings and a few pre-LayerNorm Transformer blocks; the
hidden state at each position is the user's interest representation after that item,
and a linear head scores the whole catalogue from it.

Item vectors (`ModelConfig.item_vectors`, docs/model.md):
- "free": one learned vector per item in the input table and one per item in the head;
- "attributes": an item's vector is the mean of the vectors of its public catalogue
  attributes (brand, categories, genres; `item_attributes`), in the input and in the
  head (scores of the attributes, mixed into item scores by a fixed sparse matrix),
  plus one learned bias per item: far fewer parameters, shared across items, which is
  what user-level DP noise needs (docs/privacy.md);
- `tie_item_vectors`: the head reuses the input table (one Parameter seen by an
  `nn.Linear` and an `nn.Embedding`: Opacus sums the per-sample gradients of both
  uses), and the state dict holds it once.

Built for Opacus from day one (see DESIGN.md, runtime notes):
- every trainable parameter is used through a module Opacus computes per-sample
  gradients for (Embedding, Linear, LayerNorm); attention is two `nn.Linear`
  projections around `F.scaled_dot_product_attention`, never `nn.MultiheadAttention`;
- the output head is an `nn.Linear` (tied: one sharing the embedding's Parameter), never
  `h @ emb.weight.T`, which is silently left out of Opacus's per-sample gradients;
- padded positions are zeroed after the embeddings and after every block, so they
  contribute nothing to any gradient (Opacus ignores `padding_idx`).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from fedinterest.common.constants import PAD_ID
from fedinterest.common.model_config import ITEM_VECTORS, ModelConfig  # noqa: F401 (re-exported: the model's shape)


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


class ItemBias(nn.Module):
    """One learned score per item added to the catalogue scores (attribute item vectors).

    A module of its own so that per-sample gradient code sees its input and output
    (client/local_training.py registers its per-sample gradient with Opacus).
    """

    def __init__(self, num_items: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(num_items + 1))

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        return scores + self.bias


class InterestModel(nn.Module):
    """SASRec-style encoder of a user's history that scores the whole catalogue."""

    # Buffers registered with item-vectors = attributes (__init__); declared for the type checker.
    attr_index: torch.Tensor
    attr_weight: torch.Tensor
    attr_mixing: torch.Tensor

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        attributes = config.item_vectors == "attributes"
        # Row PAD_ID of the item table exists but never reaches a gradient (masked below).
        self.item_emb = nn.Embedding(config.table_rows, config.dim)
        self.pos_emb = nn.Embedding(config.max_len, config.dim)
        self.emb_drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_blocks))
        self.ln_out = nn.LayerNorm(config.dim)
        # Column PAD_ID of the head is never a target and is masked out at ranking time.
        # With attributes the head scores attributes and `item_bias` holds the per-item term.
        self.head = nn.Linear(config.dim, config.table_rows, bias=not attributes)
        self.item_bias = ItemBias(config.num_items) if attributes else None
        self.apply(self._init_weights)
        if config.tie_item_vectors:
            self.head.weight = self.item_emb.weight  # one Parameter; the state dict keeps it once (hooks below)
            self._register_state_dict_hook(_drop_tied_weight)
            self._register_load_state_dict_pre_hook(_restore_tied_weight, with_module=True)
        if attributes:
            index, weight, mixing = _attribute_tensors(config)
            self.register_buffer("attr_index", index, persistent=False)  # (V+1, K) attribute of item, PAD_ID padded
            self.register_buffer("attr_weight", weight, persistent=False)  # (V+1, K) 1 / |attributes of item|
            self.register_buffer("attr_mixing", mixing, persistent=False)  # sparse (V+1, A+1): item score = mean of its attributes'

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def item_inputs(self, items: torch.Tensor) -> torch.Tensor:
        """(B, L) item indices -> (B, L, D) item vectors (free rows, or the mean of the attributes' rows)."""
        if self.item_bias is None:
            return self.item_emb(items)
        # (B, L, K) attribute ids looked up at once; padding slots weigh 0.
        return (self.item_emb(self.attr_index[items]) * self.attr_weight[items].unsqueeze(-1)).sum(dim=-2)

    def scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., D) interest states -> (..., num_items + 1) catalogue scores."""
        scores = self.head(hidden)
        if self.item_bias is None:
            return scores
        flat = scores.reshape(-1, scores.shape[-1])  # (N, A+1)
        items = torch.sparse.mm(self.attr_mixing, flat.T).T  # (N, V+1)
        return self.item_bias(items.reshape(*scores.shape[:-1], -1))

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
        x = (self.item_inputs(items) * math.sqrt(self.config.dim) + self.pos_emb(positions)) * keep
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
        return self.scores(self.encode(items))

    def score_last(self, items: torch.Tensor) -> torch.Tensor:
        """(B, L) histories -> (B, num_items + 1) scores for the item that comes next."""
        return self.scores(self.encode(items)[:, -1, :])


TIED = "head.weight"  # the state-dict key a tied head would repeat


def _drop_tied_weight(module: nn.Module, state: dict, prefix: str, local_metadata: dict) -> dict:
    state.pop(prefix + TIED, None)
    return state


def _restore_tied_weight(module: nn.Module, state: dict, prefix: str, *args: object) -> None:
    if prefix + TIED not in state and prefix + "item_emb.weight" in state:
        state[prefix + TIED] = state[prefix + "item_emb.weight"]


def _attribute_tensors(config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The item -> attribute index and weights, and the sparse mixing matrix (V+1, A+1)."""
    rows = config.item_attributes
    width = max(len(row) for row in rows)
    index = torch.zeros(len(rows), width, dtype=torch.long)
    for item, row in enumerate(rows):
        index[item, : len(row)] = torch.tensor(row, dtype=torch.long)
    real = index != PAD_ID
    weight = real.float() / real.sum(dim=1, keepdim=True).clamp(min=1)
    items = torch.arange(len(rows)).unsqueeze(1).expand_as(index)[real]
    coordinates = torch.stack([items, index[real]])
    mixing = torch.sparse_coo_tensor(coordinates, weight[real], (len(rows), config.table_rows), check_invariants=True).coalesce()
    with warnings.catch_warnings():  # CSR is "beta" in torch; its matmul is what the head needs
        warnings.simplefilter("ignore", UserWarning)
        return index, weight, mixing.to_sparse_csr()


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
    logits = model.scores(hidden[has_target])  # (N, V)
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
    Free item vectors only (attribute vectors have no per-item head rows).
    """
    if model.item_bias is not None:
        raise ValueError("the sampled loss needs free item vectors (item_vectors = 'free')")
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

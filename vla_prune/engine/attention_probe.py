"""Attention rows for a few queries, recomputed from q_proj + rotary against cached keys.

The model runs SDPA everywhere; when a pruning method needs attention scores we recompute
q for the handful of query rows that matter and take softmax(q k^T / sqrt(d)) against keys that
are already in the KV cache. Cost: one small matmul. No layer ever switches to eager attention.
"""

from __future__ import annotations

import torch

from .kv_cache import KVCache
from .rope import apply_rope


def attention_rows(
    layer: torch.nn.Module,
    rotary: torch.nn.Module,
    cache: KVCache,
    layer_idx: int,
    hidden_rows: torch.Tensor,
    pos_rows: torch.Tensor,
    num_heads: int,
) -> torch.Tensor:
    """Softmax attention of `hidden_rows` (inputs of `layer`) over that layer's cached keys.

    hidden_rows: [B, R, D] layer inputs (before input_layernorm); pos_rows: [B, R] position ids.
    Returns [B, H, R, L] over all L cached keys, causally masked by original position.
    """
    b, r, _ = hidden_rows.shape
    x = layer.input_layernorm(hidden_rows)
    q = layer.self_attn.q_proj(x).view(b, r, num_heads, -1).transpose(1, 2)
    cos, sin = rotary(x, pos_rows)
    q = apply_rope(q, cos, sin)
    n = cache.length[layer_idx]
    k = cache.k[layer_idx][:, :, :n]
    if k.shape[1] != num_heads:  # grouped-query attention
        k = k.repeat_interleave(num_heads // k.shape[1], dim=1)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    key_pos, key_valid, _ = cache.rows(layer_idx)
    allowed = (key_pos[:, None, None, :] <= pos_rows[:, None, :, None]) & key_valid[:, None, None]
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores.float(), dim=-1)


def to_visual(attn: torch.Tensor, cache: KVCache, layer_idx: int, num_visual: int) -> torch.Tensor:
    """Pick the visual columns of [B, H, R, L] attention -> [B, H, R, num_visual].

    Visual tokens that are not in this layer's cache (pruned) get 0.
    """
    _, _, vis = cache.rows(layer_idx)
    out = attn.new_zeros(*attn.shape[:-1], num_visual)
    for b in range(attn.shape[0]):  # batch is small; per-sample keeps the indexing obvious
        cols = (vis[b] >= 0).nonzero().squeeze(1)
        out[b, ..., vis[b, cols]] = attn[b, ..., cols]
    return out

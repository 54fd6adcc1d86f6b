"""Attention rows for a few queries, computed against keys already in the KV cache.

The model runs SDPA everywhere; when a pruning method needs attention scores we take
softmax(q k^T / sqrt(d)) for the handful of query rows that matter against the cached keys.
In prefill, q is recomputed from q_proj + rotary for those rows; in decode the layer has just
computed q for the new token and we reuse it. No layer ever switches to eager attention.
"""

from __future__ import annotations

import torch

from .kv_cache import KVCache
from .rope import apply_rope


def query_rows(
    layer: torch.nn.Module,
    rotary: torch.nn.Module,
    hidden_rows: torch.Tensor,
    pos_rows: torch.Tensor,
    num_heads: int,
) -> torch.Tensor:
    """Rotated queries [B, H, R, hd] of `hidden_rows` (inputs of `layer`, before its norm)."""
    b, r, _ = hidden_rows.shape
    x = layer.input_layernorm(hidden_rows)
    q = layer.self_attn.q_proj(x).view(b, r, num_heads, -1).transpose(1, 2)
    cos, sin = rotary(x, pos_rows)
    return apply_rope(q, cos, sin)


def attention_from_queries(
    q: torch.Tensor, cache: KVCache, layer_idx: int, pos_rows: torch.Tensor
) -> torch.Tensor:
    """Softmax attention [B, H, R, L] of rotated queries over the layer's L cached keys,
    causally masked by original position (and padding)."""
    num_heads = q.shape[1]
    n = cache.length[layer_idx]
    k = cache.k[layer_idx][:, :, :n]
    if k.shape[1] != num_heads:  # grouped-query attention
        k = k.repeat_interleave(num_heads // k.shape[1], dim=1)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    key_pos, key_valid, _ = cache.rows(layer_idx)
    newest_only = (
        q.shape[2] == 1 and not cache.has_padding and bool((pos_rows[:, 0] >= key_pos[:, -1]).all())
    )
    if not newest_only:  # the newest token sees every cached key: no mask needed
        allowed = key_pos[:, None, None, :] <= pos_rows[:, None, :, None]
        allowed = allowed & key_valid[:, None, None]
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores.float(), dim=-1)


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
    q = query_rows(layer, rotary, hidden_rows, pos_rows, num_heads)
    return attention_from_queries(q, cache, layer_idx, pos_rows)


def to_visual(attn: torch.Tensor, cache: KVCache, layer_idx: int, num_visual: int) -> torch.Tensor:
    """Pick the visual columns of [B, H, R, L] attention -> [B, H, R, num_visual].

    Visual tokens that are not in this layer's cache (pruned) get 0.
    """
    cols, vis = cache.visual_columns(layer_idx)  # [B, n_vis_here] each
    out = attn.new_zeros(*attn.shape[:-1], num_visual)
    shape = (*attn.shape[:-1], cols.shape[1])
    picked = attn.gather(-1, cols[:, None, None, :].expand(shape))
    return out.scatter_(-1, vis[:, None, None, :].expand(shape), picked)

"""Attention rows for a few queries, computed against keys already in the KV cache.

The model runs SDPA everywhere; when a pruning method needs attention scores we take
softmax(q k^T / sqrt(d)) for the handful of query rows that matter against the cached keys.
In prefill, q is recomputed from q_proj + rotary for those rows; in decode the layer has just
computed q for the new token and we reuse it. No layer ever switches to eager attention.

These run once per prefill and once per decode step on tensors of a few hundred elements, so
their cost is the number of torch calls, not FLOPs: the bodies keep that count low (what is
constant per prefill is computed once and memoized) while computing bit-for-bit the same
values as the plain formulation (rope.apply_rope, gather + scatter onto zeros).
"""

from __future__ import annotations

import weakref

import torch

from .kv_cache import KVCache

_MEMO_SIZE = 64  # entries per memo; a step creates ~2 (one per row-metadata group)


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
    q = layer.self_attn.q_proj(x)
    # One row: [B, 1, H, hd] -> [B, H, 1, hd] is a view with the same layout, no transpose.
    q = q.view(b, num_heads, 1, -1) if r == 1 else q.view(b, r, num_heads, -1).transpose(1, 2)
    cos, sin_signed = _rope(rotary, x, pos_rows)
    # = apply_rope(q, cos, sin): rotate_half(q) * sin == roll(q, hd/2) * [-sin1, sin2] exactly
    # (negation is exact), in 4 calls instead of 8.
    return q * cos + q.roll(q.shape[-1] // 2, dims=-1) * sin_signed


_ROPE_MEMO: weakref.WeakKeyDictionary[torch.nn.Module, dict] = weakref.WeakKeyDictionary()


def _rope(
    rotary: torch.nn.Module, x: torch.Tensor, pos_rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sign-folded sin), both [B, 1, R, hd], of the model's own rotary module.

    Memoized by position ids on the CPU for plain RoPE (a pure function of the positions); the
    semantic probe asks for the same last-token position every step of an episode. Not on a
    GPU: the key would need a host sync.
    """
    if pos_rows.device.type != "cpu" or getattr(rotary, "rope_type", None) != "default":
        return _rope_tables(rotary, x, pos_rows)
    memo = _ROPE_MEMO.get(rotary)
    if memo is None:
        memo = _ROPE_MEMO[rotary] = {}
    key = (x.dtype, pos_rows.shape, *pos_rows.reshape(-1).tolist())
    out = memo.get(key)
    if out is None:
        if len(memo) >= _MEMO_SIZE:
            memo.clear()
        # normal tensors (not inference-mode ones), so that they serve under autograd too
        with torch.inference_mode(False), torch.no_grad():
            out = memo[key] = _rope_tables(rotary, x, pos_rows)
    return out


def _rope_tables(
    rotary: torch.nn.Module, x: torch.Tensor, pos_rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = rotary(x, pos_rows)  # [B, R, hd]
    half = sin.shape[-1] // 2
    sin_signed = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    return cos.unsqueeze(1), sin_signed.unsqueeze(1)


def attention_from_queries(
    q: torch.Tensor, cache: KVCache, layer_idx: int, pos_rows: torch.Tensor
) -> torch.Tensor:
    """Softmax attention [B, H, R, L] of rotated queries over the layer's L cached keys,
    causally masked by original position (and padding)."""
    num_heads = q.shape[1]
    n = cache.length[layer_idx]
    k = cache.k[layer_idx].narrow(2, 0, n)
    if k.shape[1] != num_heads:  # grouped-query attention
        k = k.repeat_interleave(num_heads // k.shape[1], dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)).mul_(q.shape[-1] ** -0.5)
    # A query at the newest row's position passes the causal mask at every cached key (rows
    # hold non-decreasing positions): only padding can mask. One host read (torch.equal
    # against the newest row's position, as the engine's decode reads row metadata) is
    # cheaper than building the causal mask; any other query gets the full mask. The same
    # -inf land on the same scores either way.
    g = cache.group[layer_idx]
    if q.shape[2] == 1 and torch.equal(pos_rows, cache.pos[g][:, n - 1 : n]):
        if cache.has_padding:
            scores.masked_fill_(~cache.valid[g][:, None, None, :n], float("-inf"))
    else:
        key_pos, key_valid, _ = cache.rows(layer_idx)
        allowed = key_pos[:, None, None, :] <= pos_rows[:, None, :, None]
        allowed = allowed & key_valid[:, None, None]
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores if scores.dtype == torch.float32 else scores.float(), dim=-1)


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
    layout = cache.visual_layout(layer_idx)
    if layout is not None:  # the visual rows are one slice of columns: no column search
        start, ids = layout
        part = attn.narrow(-1, start, num_visual if ids is None else ids.shape[1])
        if ids is None:
            return part.clone()  # a copy, as below: attn may be a CUDA graph's output buffer
        out = attn.new_zeros(*attn.shape[:-1], num_visual)
        if ids.shape[0] == 1:
            return out.index_copy_(-1, ids[0], part)
        return out.scatter_(
            -1, ids.view(ids.shape[0], *[1] * (attn.dim() - 2), -1).expand_as(part), part
        )
    cols, vis = cache.visual_columns(layer_idx)  # [B, n_vis_here] each
    plan = _visual_plan(cols, vis, num_visual)
    if plan.index1 is not None and attn.dtype == torch.float32:
        out, present = attn.index_select(-1, plan.index1), plan.present1
    else:
        index, present = plan.for_batch(attn)
        out = attn.gather(-1, index)
    # A pruned token reads some cached column, times 0: exact for the finite probabilities
    # softmax gives (x * 1 = x, x * 0 = +0), one call instead of zeros + scatter.
    return out if present is None else out.mul_(present)


# id(cols) -> (cols, {inference mode: plan}); `cols` is held so that its id stays unique.
_PLANS: dict[int, tuple[torch.Tensor, dict[bool, _Plan]]] = {}


class _Plan:
    """Where each visual token sits in one (cols, vis) pair of the cache, in the forms
    to_visual consumes."""

    def __init__(self, cols: torch.Tensor, vis: torch.Tensor, num_visual: int):
        b, m = cols.shape
        column = torch.zeros(b, num_visual, dtype=torch.long, device=cols.device)
        column.scatter_(1, vis, cols)
        present = None
        if m < num_visual:
            present = torch.zeros(b, num_visual, dtype=torch.float32, device=cols.device)
            present.scatter_(1, vis, 1.0)
        self.column, self.present = column, present
        # one sample: a 1-D index for index_select and a multiplier that broadcasts
        self.index1 = column[0] if b == 1 else None
        self.present1 = None if present is None or b != 1 else present[0]
        self.expanded: dict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def for_batch(self, attn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(index expanded to attn's leading shape for gather, multiplier [B, 1.., N])."""
        key = (attn.shape[:-1], attn.dtype)
        out = self.expanded.get(key)
        if out is None:
            b, n = self.column.shape
            lead = (b, *([1] * (attn.dim() - 2)), n)
            present = None if self.present is None else self.present.to(attn.dtype).view(lead)
            out = self.column.view(lead).expand(*attn.shape[:-1], n), present
            self.expanded[key] = out
        return out


def _visual_plan(cols: torch.Tensor, vis: torch.Tensor, num_visual: int) -> _Plan:
    """The plan of this (cols, vis) pair. The cache computes the pair once per prefill per row
    group and returns the same tensors until its rows change: one plan each (per inference
    mode: a plan made under inference mode must not meet autograd)."""
    entry = _PLANS.get(id(cols))
    if entry is None or entry[0] is not cols:
        if len(_PLANS) >= _MEMO_SIZE:
            _PLANS.clear()
        entry = _PLANS[id(cols)] = (cols, {})
    mode = torch.is_inference_mode_enabled()
    plan = entry[1].get(mode)
    if plan is None:
        plan = entry[1][mode] = _Plan(cols, vis, num_visual)
    return plan

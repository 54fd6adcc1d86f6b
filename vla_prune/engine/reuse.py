"""Visual rows whose K/V a layer takes from the previous prefill instead of computing them.

The engine's side of VLA-Cache. A `ReusePlan` names, per batch slot, visual tokens in reuse
order and, per decoder layer, how many of the first ones that layer reuses. A reused row skips
the layer (no q/k/v, attention or MLP for it); its key and value stay those the previous step
stored for the same token at the same position id. Recomputed rows write fresh K/V and attend
over all rows, reused and fresh. Every batch slot has its own tokens, counts and cache rows.

Where the previous K/V are: `KVCache.visual_rows` (taken before the prefill rewrites the row
metadata) maps each token to its row at each layer in the last step. A token is reusable only
if every layer that ran then holds it — so the reused set, which only grows with depth, never
has to recompute a row it skipped (a skipped row has no input for the next layer). The rows
usually sit where they were (same padding, same pruning); when they moved (another left
padding in a batch, another kept set after the pruning point) the old K/V are copied to the new
rows before the layer writes anything.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .functional import prefill_rows_layer
from .rope import apply_rope


@dataclass(frozen=True)
class PrefillStamp:
    """Which prefill filled a cache: a plan is valid only against the very next one."""

    cache_id: int
    generation: int
    ran: frozenset[int]  # decoder layers that ran (a layer-skip change voids the old K/V)


@dataclass
class ReusePlan:
    """tokens[b]: slot b's reusable visual token ids, in reuse order (may be empty);
    counts [B, L]: how many of them layer l reuses (made non-decreasing over layers);
    stamp: the prefill whose K/V they come from (`PrefillResult.stamp` of the last step)."""

    tokens: list[torch.Tensor]
    counts: torch.Tensor
    stamp: PrefillStamp

    def __post_init__(self):
        if self.counts.dim() != 2 or self.counts.shape[0] != len(self.tokens):
            raise ValueError(
                f"ReusePlan.counts must be [slots, layers] with one row per slot, got "
                f"{tuple(self.counts.shape)} for {len(self.tokens)} slots"
            )
        if (self.counts < 0).any():
            raise ValueError("ReusePlan.counts must be >= 0")
        self.counts = self.counts.long().cummax(dim=1).values

    @property
    def empty(self) -> bool:
        return all(len(t) == 0 for t in self.tokens) or not bool(self.counts.any())


@dataclass
class LayerRows:
    """One layer's split of the current rows: `index` [B, n] rows to compute (slot b's first
    `count[b]` are real, sorted; the rest repeat its last row and are discarded) and the
    reused visual tokens [B, N] (bool)."""

    index: torch.Tensor
    count: list[int]
    reused: torch.Tensor


class RowReuse:
    """A plan resolved against the cache it reads from, for one prefill."""

    def __init__(self, plan: ReusePlan, prev_rows: list[torch.Tensor | None], num_visual: int):
        b = len(plan.tokens)
        dev = plan.counts.device
        self.counts = plan.counts
        self.prev_rows = prev_rows
        # order [B, M]: each slot's tokens in reuse order, padded with num_visual (a dummy
        # column of the [B, N + 1] masks below)
        m = max(len(t) for t in plan.tokens)
        self.order = torch.full((b, m), num_visual, dtype=torch.long, device=dev)
        for i, tok in enumerate(plan.tokens):
            tok = tok.to(dev).long()
            if len(tok) and (tok.min() < 0 or tok.max() >= num_visual):
                raise ValueError(f"ReusePlan tokens of slot {i} must lie in [0, {num_visual})")
            if len(set(tok.tolist())) != len(tok):
                raise ValueError(f"ReusePlan tokens of slot {i} repeat a token")
            self.order[i, : len(tok)] = tok
        held = [r >= 0 for r in prev_rows if r is not None]
        self.avail = torch.zeros(b, num_visual + 1, dtype=torch.bool, device=dev)
        if held:  # reusable only if every layer that ran last step holds its K/V
            self.avail[:, :num_visual] = torch.stack(held).all(0)
        self.reused = torch.zeros(self.counts.shape, dtype=torch.long, device=dev)  # [B, L]
        self._last: tuple[torch.Tensor, LayerRows] | None = None  # the split of the last layer

    def rows(self, layer: int, vis: torch.Tensor) -> LayerRows | None:
        """The split at `layer` of the current rows (vis [B, T]: visual index per row, -1 for
        text), or None when no slot reuses anything there (the layer runs as usual)."""
        count = self.counts[:, layer, None]
        if not bool(count.any()):
            return None
        b, n_vis = self.avail.shape[0], self.avail.shape[1] - 1
        # The layer reuses the first `count` tokens of the order that it holds (not pruned at
        # layer K) and whose previous K/V exist: a rank among those only falls as the held set
        # shrinks with depth, so the reused set only grows. Text rows (-1) go to column N.
        col = torch.where(vis >= 0, vis, n_vis)
        present = torch.zeros_like(self.avail).scatter_(1, col, True)
        ok = (self.avail & present).gather(1, self.order)  # [B, M], in reuse order
        take = ok & (ok.cumsum(1) <= count)
        reused = torch.zeros_like(self.avail).scatter_(1, self.order, take)[:, :n_vis]
        if not reused.any():
            return None
        self.reused[:, layer] = reused.sum(1)
        row_reused = (vis >= 0) & reused.gather(1, vis.clamp(min=0))
        if self._last is not None and torch.equal(self._last[0], row_reused):
            return LayerRows(self._last[1].index, self._last[1].count, reused)
        keep = ~row_reused
        computed = keep.sum(1).tolist()
        t = vis.shape[1]
        index = torch.full((b, max(computed)), t - 1, dtype=torch.long, device=vis.device)
        for i, c in enumerate(computed):
            index[i, :c] = keep[i].nonzero().squeeze(1)
        out = LayerRows(index, computed, reused)
        self._last = (row_reused, out)
        return out

    def move_kv(
        self, k: torch.Tensor, v: torch.Tensor, layer: int, vis: torch.Tensor, rows: LayerRows
    ):
        """Put the previous K/V of this layer's reused tokens at their current rows (k/v: the
        layer's cache [B, KVH, S, hd]); a no-op copy is skipped when nothing moved."""
        prev = self.prev_rows[layer]
        t = vis.shape[1]
        for i in range(vis.shape[0]):
            tok = rows.reused[i].nonzero().squeeze(1)
            if len(tok) == 0:
                continue
            cur = torch.full((rows.reused.shape[1],), -1, dtype=torch.long, device=vis.device)
            mine = vis[i] >= 0
            cur[vis[i][mine]] = torch.arange(t, device=vis.device)[mine]
            dst, src = cur[tok], prev[i, tok]
            if torch.equal(dst, src):
                continue
            k[i, :, dst] = k[i, :, src]  # the read is a copy: overlapping rows are safe
            v[i, :, dst] = v[i, :, src]


def rows_mask(index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The prefill mask (runner._prefill_mask) restricted to the query rows `index` [B, n]:
    row r sees the valid rows <= r, and itself -> [B, 1, n, T] bool."""
    t = valid.shape[1]
    cols = torch.arange(t, device=index.device)
    causal = cols[None, None, :] <= index[..., None]
    return ((causal & valid[:, None, :]) | (cols[None, None, :] == index[..., None]))[:, None]


def write_and_attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    rows: LayerRows,
    t: int,
    mask: torch.Tensor,
    gqa: bool,
) -> torch.Tensor:
    """Write the computed rows' k/v [B, KVH, n, hd] into the layer's cache at their rows (the
    padding entries are not written), then attend q [B, H, n, hd] over the cache's first t
    rows -> [B, H, n, hd]."""
    for i, c in enumerate(rows.count):
        idx = rows.index[i, :c]
        k_cache[i, :, idx] = k[i, :, :c]
        v_cache[i, :, idx] = v[i, :, :c]
    keys, values = k_cache[:, :, :t], v_cache[:, :, :t]
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=gqa)


def scatter_rows(h: torch.Tensor, out: torch.Tensor, rows: LayerRows) -> torch.Tensor:
    """h [B, T, D] with the computed rows replaced by out [B, n, D] (padding entries dropped);
    the reused rows keep their (stale) input: no later layer computes them."""
    h = h.clone()
    for i, c in enumerate(rows.count):
        h[i, rows.index[i, :c]] = out[i, :c]
    return h


def layer_rows(engine, idx: int, h, cos, sin, valid, rows: LayerRows) -> torch.Tensor:
    """One decoder layer of `engine` (a LlamaEngine) computing only rows.index of h [B, T, D]
    (the others keep the previous step's K/V, already in the cache); returns h with those rows
    updated.

    The static engine runs prefill_rows_layer on its fused weights (with EngineConfig(compile=
    True) its two halves compiled, dynamic in the row count), the eager one the modules."""
    b, t, _ = h.shape

    def take(x):
        return x.gather(1, rows.index[..., None].expand(-1, -1, x.shape[-1]))

    hq, cq, sq = take(h), take(cos), take(sin)
    n = hq.shape[1]
    mask = rows_mask(rows.index, valid)
    gqa = engine.kv_heads != engine.num_heads
    k_cache, v_cache = engine.cache.k[idx], engine.cache.v[idx]

    def attend(q, k, v):
        return write_and_attend(q, k, v, k_cache, v_cache, rows, t, mask, gqa)

    if engine.static is not None:
        w = engine.static.prefill_weights[idx]
        hq = prefill_rows_layer(
            hq, cq, sq, w, engine.static.eps, engine.num_heads, engine.kv_heads, attend,
            engine.rows_halves(),
        )
    else:
        layer = engine.layers[idx]
        a = layer.self_attn
        x = layer.input_layernorm(hq)
        q = a.q_proj(x).view(b, n, -1, engine.head_dim).transpose(1, 2)
        k = a.k_proj(x).view(b, n, -1, engine.head_dim).transpose(1, 2)
        v = a.v_proj(x).view(b, n, -1, engine.head_dim).transpose(1, 2)
        out = attend(apply_rope(q, cq, sq), apply_rope(k, cq, sq), v)
        hq = hq + a.o_proj(out.transpose(1, 2).reshape(b, n, -1))
        hq = hq + layer.mlp(layer.post_attention_layernorm(hq))
    engine.cache.length[idx] = t
    return scatter_rows(h, hq, rows)

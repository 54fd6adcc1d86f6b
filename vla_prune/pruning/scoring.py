"""From the engine's context at the pruning point to a pruner's decision.

The engine offers attention probes and the layer-0 embeddings; a strategy (base.py) wants
plain score vectors. This module computes only what the strategy `needs`, asks it once for
the whole batch (`select_batch`) or per batch slot (`select`), and turns its answer into what
the engine consumes.

All of it runs inside the pruning hook, so the policy charges it to the "prune" stage. At
these sizes the cost is the number of torch/numpy calls, not FLOPs: the scores are computed
with as few calls as give the same values bit for bit (tests/pruning/test_exactness.py).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from ..config import PruneConfig
from ..engine.attention_probe import attention_rows
from ..engine.runner import PrefillContext, PruneDecision
from .base import BatchInputs, PruneInputs, Pruner
from .temporal import ActionScoreHistory, smooth_action_batch


def select_tokens(
    ctx: PrefillContext,
    pruner: Pruner,
    cfg: PruneConfig,
    sem_layer: int,
    histories: list[ActionScoreHistory],
    rngs: list[np.random.Generator],
    steps: list[int],
    report: dict,
) -> torch.Tensor | PruneDecision | None:
    """Compute what `pruner` needs from the prefill context, ask it for every batch slot
    (once, through its select_batch if it has one, else per slot), and stack its choices
    (kept indices [B, k], a PruneDecision when recycling, or None = keep all).
    Fills `report` with the scores it computed (semantic, smoothed action, origin)."""
    needs, n = pruner.needs, ctx.num_visual
    b, t = ctx.embeds.shape[:2]
    budget = cfg.budget(n)
    if budget >= n and cfg.method != "fixed":
        return None
    dev = ctx.pad.device
    pads: list[int] | None = None  # host copy of ctx.pad, only where a method needs it
    starts: list[int] = []  # host copy of ctx.vis_start, read once when first needed
    is_text = None
    if needs & {"text_attention"} or cfg.recycle or cfg.semantic_query == "text-mean":
        # Text rows: [pad_i + 1 + n, t) for sample i. Take [1 + n, t) for all and mask per
        # sample: row r is text for sample i iff r >= pad_i (left padding shifts text right).
        text_rows = torch.arange(n + 1, t, device=dev)[None].expand(b, -1)
        is_text = (torch.arange(t - n - 1, device=dev)[None] >= ctx.pad[:, None]).float()
    semantic = text_attention = None
    if "semantic" in needs:
        if cfg.semantic_query == "last":
            # Head mean of the one row; its mean over rows would be itself (bit for bit).
            starts = starts or ctx.vis_start.tolist()
            semantic = _last_token_attention(ctx, sem_layer, starts).mean(dim=1)[:, 0]
        else:
            if cfg.semantic_query == "text-mean":
                rows, weight = text_rows, is_text
            else:  # prefill-mean: every real prefill row
                rows = torch.arange(t, device=dev)[None].expand(b, -1)
                weight = (rows >= ctx.pad[:, None]).float()
            attn = ctx.attention(sem_layer, rows).mean(dim=1)  # heads -> [B, R, N]
            semantic = (attn * weight[..., None]).sum(1) / weight.sum(1, keepdim=True)
    if "text_attention" in needs:
        text_attention = ctx.attention(sem_layer, text_rows).mean(dim=1)  # [B, R, N]
    action = has_action = None
    if "action" in needs:  # the temporal score the pruner works from (also for the report)
        action, has_action = smooth_action_batch(
            [h.as_list() for h in histories], cfg.window, cfg.gamma
        )
        if action is not None and all(has_action):
            report["action"] = action

    select_batch = getattr(pruner, "select_batch", None)
    origin = None
    if select_batch is not None:
        out = select_batch(
            BatchInputs(
                budget=budget,
                num_visual=n,
                steps=list(steps),
                semantic=semantic,
                action=action,
                has_action=has_action,
                embeddings=(
                    (lambda: _visual_embeddings(ctx, starts or ctx.vis_start.tolist()))
                    if "embeddings" in needs
                    else None
                ),
            )
        )
        if semantic is not None:
            report["semantic"] = semantic
        if out is None:
            return None
        kept_t, origin = out
    else:
        embeddings = ctx.visual_embeddings() if "embeddings" in needs else None
        if text_attention is not None:
            pads = ctx.pad.tolist()
        kept, origins = [], []
        for i in range(b):
            x = PruneInputs(
                budget=budget,
                num_visual=n,
                grid=_grid(n),
                semantic=None if semantic is None else semantic[i].float(),
                text_attention=(
                    None if text_attention is None else text_attention[i, pads[i] :].float()
                ),
                action_history=histories[i].as_list(),
                embeddings=None if embeddings is None else embeddings[i].float(),
                rng=rngs[i],
                step=steps[i],
            )
            if hasattr(pruner, "select_with_origin"):
                k, o = pruner.select_with_origin(x) or (None, None)
                origins.append(o)
            else:
                k = pruner.select(x)
            kept.append(k)
        if semantic is not None:
            report["semantic"] = semantic
        if all(k is None for k in kept):
            return None
        if any(k is None for k in kept):
            raise RuntimeError("pruner kept all tokens for some batch slots but not others")
        if origins and all(o is not None for o in origins):
            origin = torch.stack(origins)
        kept_t = torch.stack([k.to(dev) for k in kept])
    if origin is not None:
        report["origin"] = origin
    if not cfg.recycle:
        return kept_t
    if semantic is not None:
        score = semantic
    elif text_attention is not None:  # mean over each sample's own text rows
        score = (text_attention * is_text[..., None]).sum(1) / is_text.sum(1)[:, None]
    else:
        score = torch.ones(b, n, device=dev)
    return _recycled(ctx, kept_t, score)


def _visual_embeddings(ctx: PrefillContext, starts: list[int]) -> torch.Tensor:
    """ctx.visual_embeddings(), as a slice of the layer-0 inputs when every sample's visual
    tokens start at the same row (starts: ctx.vis_start; always for one sample): no index
    tensor, no gather."""
    if all(s == starts[0] for s in starts):
        return ctx.embeds.narrow(1, starts[0], ctx.num_visual)
    return ctx.visual_embeddings()


@torch.inference_mode()
def _last_token_attention(ctx: PrefillContext, layer: int, starts: list[int]) -> torch.Tensor:
    """ctx.attention(layer, row -1) [B, H, 1, N], with less around it: bit for bit on the
    eager engine; the static engine's prefill layer computed the row itself (from its fused
    q/k projection: the same values within round-off) and it is only sliced here.

    Before the pruning point (row group 0) the layer's cache holds every prefill row, so
    visual token j of sample b is cache column vis_start[b] + j (starts: ctx.vis_start): with
    one start for all samples the visual columns are a slice of the attention row, with no
    per-prefill column map; the query row is a slice too. Anything else: ctx.attention.
    """
    engine, hidden = ctx.engine, ctx.hidden_in.get(layer)
    if hidden is None or engine.cache.group[layer] != 0:
        return ctx.attention(layer, _last_row(len(starts), ctx.pad.device))
    attn = ctx.last_row_attention.get(layer)  # the static engine's layer computed it
    if attn is None:  # the eager engine (the reference): recompute q for the one row
        attn = attention_rows(
            engine.layers[layer],
            engine.lm.model.rotary_emb,
            engine.cache,
            layer,
            hidden[:, -1:],  # left padding: the last row is every sample's last prompt token
            ctx.positions_in[layer][:, -1:],
            engine.num_heads,
        )
    n = ctx.num_visual
    if all(x == starts[0] for x in starts):
        return attn.narrow(-1, starts[0], n)
    cols = torch.tensor(starts, device=attn.device)[:, None] + torch.arange(n, device=attn.device)
    return attn.gather(-1, cols[:, None, None].expand(*attn.shape[:-1], n))


@lru_cache(maxsize=16)
def _last_row(b: int, device: torch.device) -> torch.Tensor:
    """Row -1 (the last prompt token) of every sample, [B, 1]; PrefillContext.attention wraps
    negative rows. Built once per batch size: shared, never modified (a normal tensor, not an
    inference-mode one)."""
    with torch.inference_mode(False):
        return torch.full((b, 1), -1, dtype=torch.long, device=device)


def _recycled(ctx: PrefillContext, kept: torch.Tensor, score: torch.Tensor) -> PruneDecision:
    """SparseVLM-style recycling: the dropped tokens' hidden states at layer K, weighted by
    their score, merged into one token placed after the kept ones (at the last visual
    position)."""
    n = ctx.num_visual
    merged, positions = [], []
    for b in range(kept.shape[0]):
        dropped = torch.ones(n, dtype=torch.bool, device=kept.device)
        dropped[kept[b]] = False
        rows = int(ctx.vis_start[b]) + dropped.nonzero().squeeze(1)
        w = score[b, dropped].float().clamp_min(0)
        w = w / w.sum() if w.sum() > 0 else torch.full_like(w, 1.0 / len(w))
        merged.append((w[:, None] * ctx.current[b, rows].float()).sum(0))
        positions.append(ctx.positions[b, int(ctx.vis_start[b]) + n - 1])
    return PruneDecision(kept, torch.stack(merged).to(ctx.current.dtype), torch.stack(positions))


@lru_cache(maxsize=16)
def _grid(n: int) -> tuple[int, int]:
    side = int(round(n**0.5))
    return (side, side) if side * side == n else (1, n)

"""From the engine's context at the pruning point to a pruner's decision.

The engine offers attention probes and the layer-0 embeddings; a strategy (base.py) wants
plain score vectors for one sample. This module computes only what the strategy `needs`,
calls it per batch slot, and turns its answer into what the engine consumes.
"""

from __future__ import annotations

import numpy as np
import torch

from ..config import PruneConfig
from ..engine.runner import PrefillContext, PruneDecision
from .base import PruneInputs, Pruner
from .temporal import ActionScoreHistory, smooth_action_scores


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
    """Compute what `pruner` needs from the prefill context, ask it per batch slot, and stack
    its choices (kept indices [B, k], a PruneDecision when recycling, or None = keep all).
    Fills `report` with the scores it computed (semantic, smoothed action, origin)."""
    needs, n = pruner.needs, ctx.num_visual
    b, t = ctx.embeds.shape[:2]
    budget = cfg.budget(n)
    if budget >= n and cfg.method != "fixed":
        return None
    dev = ctx.pad.device
    # Text rows: [pad_i + 1 + n, t) for sample i. Take [1 + n, t) for all and mask per
    # sample: row r is text for sample i iff r >= pad_i (left padding shifts text right).
    text_rows = torch.arange(n + 1, t, device=dev)[None].expand(b, -1)
    is_text = (torch.arange(t - n - 1, device=dev)[None] >= ctx.pad[:, None]).float()
    semantic = text_attention = None
    if "semantic" in needs:
        if cfg.semantic_query == "last":
            rows, weight = torch.full((b, 1), t - 1, device=dev), None
        elif cfg.semantic_query == "text-mean":
            rows, weight = text_rows, is_text
        else:  # prefill-mean: every real prefill row
            rows = torch.arange(t, device=dev)[None].expand(b, -1)
            weight = (rows >= ctx.pad[:, None]).float()
        attn = ctx.attention(sem_layer, rows).mean(dim=1)  # heads -> [B, R, N]
        if weight is None:
            semantic = attn.mean(dim=1)
        else:
            semantic = (attn * weight[..., None]).sum(1) / weight.sum(1, keepdim=True)
    if "text_attention" in needs:
        text_attention = ctx.attention(sem_layer, text_rows).mean(dim=1)  # [B, R, N]
    embeddings = ctx.visual_embeddings() if "embeddings" in needs else None
    if "action" in needs:  # for the report: the temporal score the pruner works from
        smoothed = [smooth_action_scores(h.as_list(), cfg.window, cfg.gamma) for h in histories]
        if all(x is not None for x in smoothed):
            report["action"] = torch.stack(smoothed)
    kept, origins = [], []
    for i in range(b):
        x = PruneInputs(
            budget=budget,
            num_visual=n,
            grid=_grid(n),
            semantic=None if semantic is None else semantic[i].float(),
            text_attention=(
                None if text_attention is None else text_attention[i, int(ctx.pad[i]) :].float()
            ),
            action_history=histories[i].as_list(),
            embeddings=None if embeddings is None else embeddings[i].float(),
            rng=rngs[i],
            step=steps[i],
        )
        if hasattr(pruner, "select_with_origin"):
            k, origin = pruner.select_with_origin(x) or (None, None)
            origins.append(origin)
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
        report["origin"] = torch.stack(origins)
    kept_t = torch.stack([k.to(dev) for k in kept])
    if not cfg.recycle:
        return kept_t
    if semantic is not None:
        score = semantic
    elif text_attention is not None:  # mean over each sample's own text rows
        score = (text_attention * is_text[..., None]).sum(1) / is_text.sum(1)[:, None]
    else:
        score = torch.ones(b, n, device=dev)
    return _recycled(ctx, kept_t, score)


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


def _grid(n: int) -> tuple[int, int]:
    side = int(round(n**0.5))
    return (side, side) if side * side == n else (1, n)

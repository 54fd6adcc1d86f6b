"""VLA-Pruner: temporal dual-level token selection (semantic top-k U action top-k, then diversity).

Follows the public code: semantic = last-prefill-token attention at layer K-1 (computed by the
engine); action = attention of the action-decode queries at the middle layer, smoothed over a
decaying window of past steps (newest weight largest); no pruning during the first warm-up steps.
"""

from __future__ import annotations

import numpy as np
import torch

from ..config import PruneConfig
from .base import BatchInputs, PruneInputs, register
from .select import (
    check_embeddings,
    check_rows,
    check_scores,
    cosine_distance_np,
    greedy_maxmin,
    host,
    host_f32,
    to_device,
    topk_rows,
)
from .temporal import smooth_action_scores

SEMANTIC, ACTION, BOTH = 1, 2, 3  # origin labels of a kept token


def warming_up(steps: list[int], warmup: int) -> bool:
    """True if every slot is still in its warm-up (keep everything); mixed slots are an error
    (the engine prunes all slots to one budget or none)."""
    warm = [s < warmup for s in steps]
    if any(warm) and not all(warm):
        raise RuntimeError("pruner kept all tokens for some batch slots but not others")
    return bool(warm) and all(warm)


@register("vla-pruner")
class VLAPruner:
    needs = frozenset({"semantic", "action", "embeddings"})

    def __init__(self, cfg: PruneConfig):
        self.cfg = cfg

    def select(self, x: PruneInputs) -> torch.Tensor | None:
        out = self.select_with_origin(x)
        return None if out is None else out[0]

    def select_with_origin(self, x: PruneInputs) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(kept indices sorted, origin int8 per kept token: 1 semantic, 2 action, 3 both)."""
        n, k = x.num_visual, x.budget
        if k >= n or x.step < self.cfg.warmup_steps:
            return None
        check_scores(x.semantic, n, "semantic")
        action = smooth_action_scores(x.action_history, self.cfg.window, self.cfg.gamma)
        if action is not None:  # no history yet (warmup=0): the semantic set alone
            action = check_scores(action, n, "action_history")
        kept, origin = self.select_batch(BatchInputs.one(x, action))
        return kept[0], origin[0]

    def select_batch(self, x: BatchInputs) -> tuple[torch.Tensor, torch.Tensor] | None:
        """select_with_origin for every slot: kept [B, k] sorted, origin [B, k] int8."""
        n, k = x.num_visual, x.budget
        if k >= n or warming_up(x.steps, self.cfg.warmup_steps):
            return None
        semantic = check_rows(x.semantic, n, "semantic")
        b, dev = semantic.shape[0], semantic.device
        has = x.has_action if x.has_action is not None else [False] * b
        scores = semantic
        if any(has):  # rows of slots without history (warmup=0) are skipped below
            action = check_rows(x.action, n, "action")
            scores = torch.cat([semantic, action if action.device == dev else action.to(dev)])
        # One stable sort for every slot's semantic and action top-k (ties -> lower index).
        top = host(topk_rows(scores, k))
        kept, origin, trim = [], [], []
        for i in range(b):
            code = np.zeros(n, dtype=np.int8)  # origin label of every token, 0 = not kept
            code[top[i]] = SEMANTIC
            if has[i]:
                code[top[b + i]] += ACTION  # top-k indices are unique: no lost updates
            cand = code.nonzero()[0]  # the union, sorted; >= k (semantic alone is k)
            if cand.shape[0] > k:
                trim.append((i, cand))
            kept.append(cand)
            origin.append(code)
        if trim:  # greedy max-min diversity trims each union down to k
            emb = x.visual_embeddings()
            if emb is None:
                raise ValueError("vla-pruner needs embeddings to trim the union")
            e = host_f32(check_embeddings(emb, b, n, "vla-pruner"))
            picks = greedy_maxmin([cosine_distance_np(e[i][cand]) for i, cand in trim], k)
            for (i, cand), p in zip(trim, picks):
                kept[i] = cand[np.sort(p)]  # cand is sorted
        for i in range(b):
            origin[i] = origin[i][kept[i]]
        return to_device(kept, dev), to_device(origin, dev)

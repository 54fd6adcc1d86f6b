"""VLA-Pruner: temporal dual-level token selection (semantic top-k U action top-k, then diversity).

Follows the public code: semantic = last-prefill-token attention at layer K-1 (computed by the
engine); action = attention of the action-decode queries at the middle layer, smoothed over a
decaying window of past steps (newest weight largest); no pruning during the first warm-up steps.
"""

from __future__ import annotations

import torch

from ..config import PruneConfig
from .base import PruneInputs, register
from .select import check_scores, maxmin_diversity, topk_indices
from .temporal import smooth_action_scores

SEMANTIC, ACTION, BOTH = 1, 2, 3  # origin labels of a kept token


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
        semantic = check_scores(x.semantic, n, "semantic")
        in_sem = torch.zeros(n, dtype=torch.bool, device=semantic.device)
        in_sem[topk_indices(semantic, k)] = True
        in_act = torch.zeros_like(in_sem)
        action = smooth_action_scores(x.action_history, self.cfg.window, self.cfg.gamma)
        if action is not None:  # no history yet (warmup=0): the semantic set alone
            action = check_scores(action, n, "action_history")
            in_act[topk_indices(action.to(in_act.device), k)] = True

        union = torch.nonzero(in_sem | in_act).squeeze(1)  # sorted, >= k (semantic alone is k)
        if union.shape[0] > k:
            if x.embeddings is None:
                raise ValueError("vla-pruner needs PruneInputs.embeddings to trim the union")
            union = maxmin_diversity(x.embeddings, k, candidates=union.to(x.embeddings.device))
            union = union.to(in_sem.device)
        origin = in_sem[union].to(torch.int8) * SEMANTIC + in_act[union].to(torch.int8) * ACTION
        return union, origin

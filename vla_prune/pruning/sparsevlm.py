"""SparseVLM (simplified): keep the visual tokens the text tokens attend to most.

Score = mean over the text rows of the head-averaged text->visual attention; top-k.
Upstream also picks the text "raters" by relevance and recycles the dropped tokens into a few
merged tokens; token recycling is handled elsewhere (later), not in this selection.
"""

from __future__ import annotations

import torch

from ..config import PruneConfig
from .base import PruneInputs, register
from .select import check_scores, topk_indices


@register("sparsevlm")
class SparseVLM:
    needs = frozenset({"text_attention"})

    def __init__(self, cfg: PruneConfig):
        self.cfg = cfg

    def select(self, x: PruneInputs) -> torch.Tensor | None:
        if x.budget >= x.num_visual:
            return None
        att = x.text_attention
        if att is None or att.dim() != 2 or att.shape[0] == 0:
            shape = None if att is None else tuple(att.shape)
            raise ValueError(f"sparsevlm needs text_attention [n_text > 0, N], got {shape}")
        scores = check_scores(att.float().mean(dim=0), x.num_visual, "text_attention")
        return topk_indices(scores, x.budget)

"""FastV: keep the visual tokens the last prefill token attends to most at layer K-1."""

from __future__ import annotations

import torch

from ..config import PruneConfig
from .base import PruneInputs, register
from .select import check_scores, topk_indices


@register("fastv")
class FastV:
    needs = frozenset({"semantic"})

    def __init__(self, cfg: PruneConfig):
        self.cfg = cfg

    def select(self, x: PruneInputs) -> torch.Tensor | None:
        if x.budget >= x.num_visual:
            return None
        return topk_indices(check_scores(x.semantic, x.num_visual, "semantic"), x.budget)

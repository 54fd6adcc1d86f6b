"""FastV: keep the visual tokens the last prefill token attends to most at layer K-1."""

from __future__ import annotations

import torch

from ..config import PruneConfig
from .base import BatchInputs, PruneInputs, register
from .select import check_rows, check_scores, topk_indices, topk_rows


@register("fastv")
class FastV:
    needs = frozenset({"semantic"})

    def __init__(self, cfg: PruneConfig):
        self.cfg = cfg

    def select(self, x: PruneInputs) -> torch.Tensor | None:
        if x.budget >= x.num_visual:
            return None
        return topk_indices(check_scores(x.semantic, x.num_visual, "semantic"), x.budget)

    def select_batch(self, x: BatchInputs) -> tuple[torch.Tensor, None] | None:
        """select for every slot in one sort: kept [B, k] sorted."""
        if x.budget >= x.num_visual:
            return None
        top = topk_rows(check_rows(x.semantic, x.num_visual, "semantic"), x.budget)
        return top.sort(dim=-1).values, None

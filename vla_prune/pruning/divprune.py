"""DivPrune: keep a maximally diverse subset (greedy max-min cosine distance) of the embeddings."""

from __future__ import annotations

import torch

from ..config import PruneConfig
from .base import PruneInputs, register
from .select import maxmin_diversity


@register("divprune")
class DivPrune:
    needs = frozenset({"embeddings"})

    def __init__(self, cfg: PruneConfig):
        self.cfg = cfg

    def select(self, x: PruneInputs) -> torch.Tensor | None:
        if x.budget >= x.num_visual:
            return None
        e = x.embeddings
        if e is None or e.dim() != 2 or e.shape[0] != x.num_visual:
            shape = None if e is None else tuple(e.shape)
            raise ValueError(f"divprune needs embeddings [{x.num_visual}, D], got {shape}")
        return maxmin_diversity(e, x.budget)

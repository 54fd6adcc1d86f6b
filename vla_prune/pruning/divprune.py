"""DivPrune: keep a maximally diverse subset (greedy max-min cosine distance) of the embeddings."""

from __future__ import annotations

import numpy as np
import torch

from ..config import PruneConfig
from .base import BatchInputs, PruneInputs, register
from .select import (
    check_embeddings,
    cosine_distance_np,
    greedy_maxmin,
    host_f32,
    maxmin_diversity,
)


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

    def select_batch(self, x: BatchInputs) -> tuple[torch.Tensor, None] | None:
        """select for every slot, one greedy loop for the batch: kept [B, k] sorted."""
        n, k = x.num_visual, x.budget
        if k >= n:
            return None
        emb = x.visual_embeddings()
        e = host_f32(check_embeddings(emb, len(x.steps), n, "divprune"))
        picks = greedy_maxmin([cosine_distance_np(e[i]) for i in range(e.shape[0])], k)
        return torch.from_numpy(np.sort(picks, axis=1)).to(emb.device), None

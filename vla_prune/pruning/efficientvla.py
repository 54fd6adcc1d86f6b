"""EfficientVLA's visual token selection: task-relevant anchors + relevance + diversity.

EfficientVLA (arXiv 2506.10100; code not released) keeps, for a budget k:
  1. the `key_tokens` most task-relevant tokens, unconditionally;
  2. of the rest of the budget (k - key), a share `relevance_ratio` (rounded half up) by relevance:
     the next highest semantic scores;
  3. the remainder by diversity: greedy max-min cosine distance on the layer-0 embeddings,
     among the tokens not yet kept, measured against everything already kept (so they cover
     what the relevant ones don't).
Relevance is the `semantic` score the engine computes (configs/pruning/efficientvla.yaml uses
the text-token mean, i.e. the instruction's attention to each visual token, as the paper).

PruneConfig has no per-method options, so key_tokens (paper: 4-8; we use 4) and
relevance_ratio (paper: 0.5-0.6; we use 0.5) are constructor arguments with these defaults.
Deterministic: ties go to the lower index (select.py). No warm-up: it needs no history.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..config import PruneConfig
from .base import PruneInputs, register
from .select import check_scores, cosine_distance, topk_indices

KEY_TOKENS = 4
RELEVANCE_RATIO = 0.5


@register("efficientvla")
class EfficientVLA:
    needs = frozenset({"semantic", "embeddings"})

    def __init__(
        self,
        cfg: PruneConfig,
        key_tokens: int = KEY_TOKENS,
        relevance_ratio: float = RELEVANCE_RATIO,
    ):
        if key_tokens < 0:
            raise ValueError(f"efficientvla key_tokens must be >= 0, got {key_tokens}")
        if not 0.0 <= relevance_ratio <= 1.0:
            raise ValueError(
                f"efficientvla relevance_ratio must be in [0, 1], got {relevance_ratio}"
            )
        self.cfg = cfg
        self.key_tokens = key_tokens
        self.relevance_ratio = relevance_ratio

    def split(self, budget: int) -> tuple[int, int, int]:
        """(key, relevance, diversity) token counts for a budget; they sum to the budget."""
        key = min(self.key_tokens, budget)
        rel = math.floor(self.relevance_ratio * (budget - key) + 0.5)  # round half up
        return key, rel, budget - key - rel

    def select(self, x: PruneInputs) -> torch.Tensor | None:
        n, k = x.num_visual, x.budget
        if k >= n:
            return None
        scores = check_scores(x.semantic, n, "semantic")
        e = x.embeddings
        if e is None or e.dim() != 2 or e.shape[0] != n:
            shape = None if e is None else tuple(e.shape)
            raise ValueError(f"efficientvla needs embeddings [{n}, D], got {shape}")
        key, rel, div = self.split(k)
        # Steps 1 + 2 are one top-(key + rel) by relevance: the anchors are its first `key`.
        kept = torch.zeros(n, dtype=torch.bool, device=scores.device)
        kept[topk_indices(scores, key + rel)] = True
        if div:
            picks = _diverse_fill(e, kept.to(e.device), div)
            kept[picks.to(kept.device)] = True
        return torch.nonzero(kept).squeeze(1)


def _diverse_fill(embeddings: torch.Tensor, kept: torch.Tensor, m: int) -> torch.Tensor:
    """m more tokens, each the one farthest (max of min cosine distance) from all kept so far;
    with nothing kept yet, the first is DivPrune's (largest nearest-neighbour distance).

    The m greedy steps run in numpy on the torch distances (only min / argmax after them, so
    the picks are exactly those of the torch loop, ties -> lower index): a numpy step costs
    ~1 us where each torch op costs several."""
    d = cosine_distance(embeddings).cpu().numpy().copy()  # scratch: the diagonal changes
    kept_np = kept.cpu().numpy()
    if kept_np.any():
        mind = d[:, kept_np].min(axis=1)
    else:
        np.fill_diagonal(d, np.inf)
        mind = d.min(axis=1)
    mind[kept_np] = -np.inf
    np.fill_diagonal(d, -np.inf)  # a pick's own distance: its running min drops to -inf
    picks = []
    for _ in range(m):
        j = int(mind.argmax())  # first maximum: ties -> lower index
        picks.append(j)
        np.minimum(mind, d[j], out=mind)
    return torch.tensor(picks, dtype=torch.long, device=embeddings.device)

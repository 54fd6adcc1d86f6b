"""Deterministic selection helpers shared by the strategies: top-k and greedy max-min diversity.

Ties always go to the LOWER token index, so a selection never depends on the sort kernel.
"""

from __future__ import annotations

import numpy as np
import torch


def check_scores(scores: torch.Tensor | None, n: int, name: str) -> torch.Tensor:
    """A [n] float score vector, or a clear error naming the missing/misshapen input."""
    if scores is None:
        raise ValueError(f"this strategy needs PruneInputs.{name}, got None")
    if scores.dim() != 1 or scores.shape[0] != n:
        raise ValueError(f"PruneInputs.{name} must have shape [{n}], got {tuple(scores.shape)}")
    return scores.float()


def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, sorted ascending; ties -> lower index.

    A stable descending sort keeps equal scores in index order (torch.topk's tie order is
    unspecified and differs between CPU and CUDA).
    """
    k = max(0, min(int(k), scores.shape[0]))
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:k].sort().values


def cosine_distance(embeddings: torch.Tensor) -> torch.Tensor:
    """[N, N] matrix of 1 - cosine similarity (zero vectors are at distance 1 from everything)."""
    e = embeddings.float()
    e = e / e.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return 1.0 - e @ e.T


def maxmin_diversity(
    embeddings: torch.Tensor,
    k: int,
    candidates: torch.Tensor | None = None,
    return_order: bool = False,
) -> torch.Tensor:
    """DivPrune's greedy max-min selection of k tokens on cosine distance.

    First pick: the candidate whose nearest neighbour (among the candidates, not itself) is
    farthest. Then repeatedly the candidate whose distance to the chosen set (its minimum
    distance to any chosen token) is largest. Ties -> lowest index (torch.argmax returns the
    first maximum). Returns the picks sorted ascending, or in pick order if `return_order`.
    """
    n = embeddings.shape[0]
    dev = embeddings.device
    cand = np.arange(n) if candidates is None else np.unique(candidates.cpu().numpy())
    m = cand.shape[0]
    k = max(0, min(int(k), m))
    if k == 0:
        return torch.empty(0, dtype=torch.long, device=dev)

    # A few hundred tokens: numpy does each of the k tiny greedy steps in ~1 us where torch
    # ops cost ~10 us (and a GPU would sync on every argmax anyway). One copy off the device.
    e = embeddings.detach().float().cpu().numpy()[cand]
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    d = 1.0 - e @ e.T  # [m, m] cosine distance, computed once
    nn = d.copy()
    np.fill_diagonal(nn, np.inf)
    first = int(np.argmax(nn.min(axis=1)))  # m == 1: inf, still picks the one

    picks = [first]
    mind = d[first].copy()  # running min distance of every candidate to the chosen set
    mind[first] = -np.inf  # chosen ones can't be picked again, even among duplicates
    for _ in range(k - 1):
        j = int(np.argmax(mind))  # first maximum -> ties go to the lowest index
        picks.append(j)
        np.minimum(mind, d[j], out=mind)
        mind[j] = -np.inf

    order = torch.as_tensor(cand[picks], dtype=torch.long, device=dev)
    return order if return_order else order.sort().values

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


def check_rows(scores: torch.Tensor | None, n: int, name: str) -> torch.Tensor:
    """check_scores for a batch: a [B, n] float score matrix, or a clear error."""
    if scores is None:
        raise ValueError(f"this strategy needs BatchInputs.{name}, got None")
    if scores.dim() != 2 or scores.shape[1] != n:
        raise ValueError(f"BatchInputs.{name} must have shape [B, {n}], got {tuple(scores.shape)}")
    return scores if scores.dtype == torch.float32 else scores.float()


def check_embeddings(e: torch.Tensor | None, b: int, n: int, name: str) -> torch.Tensor:
    """[B, n, D] embeddings, or a clear error naming the strategy."""
    if e is None or e.dim() != 3 or e.shape[:2] != (b, n):
        shape = None if e is None else tuple(e.shape)
        raise ValueError(f"{name} needs embeddings [{b}, {n}, D], got {shape}")
    return e


def host(x: torch.Tensor) -> np.ndarray:
    """x as a numpy array: a view on the CPU, one copy off it."""
    return (x if x.device.type == "cpu" else x.cpu()).numpy()


def to_device(rows: list[np.ndarray], device: torch.device) -> torch.Tensor:
    """Equal-length per-slot arrays as one [B, ...] tensor on `device`."""
    out = torch.from_numpy(rows[0][None] if len(rows) == 1 else np.stack(rows))
    return out if device.type == "cpu" else out.to(device)


def host_f32(x: torch.Tensor) -> np.ndarray:
    """A float32 numpy view (a copy only off the CPU or from another dtype)."""
    if x.requires_grad:
        x = x.detach()
    return host(x if x.dtype == torch.float32 else x.float())


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


def topk_rows(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Per row of [B, N] scores, the indices of its k largest, in descending score order with
    ties -> lower index (the same stable sort as topk_indices, one call for every row)."""
    k = max(0, min(int(k), scores.shape[-1]))
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]


def maxmin_diversity(
    embeddings: torch.Tensor,
    k: int,
    candidates: torch.Tensor | None = None,
    return_order: bool = False,
) -> torch.Tensor:
    """DivPrune's greedy max-min selection of k tokens on cosine distance.

    First pick: the candidate whose nearest neighbour (among the candidates, not itself) is
    farthest. Then repeatedly the candidate whose distance to the chosen set (its minimum
    distance to any chosen token) is largest. Ties -> lowest index (argmax returns the first
    maximum). Returns the picks sorted ascending, or in pick order if `return_order`.
    """
    n = embeddings.shape[0]
    dev = embeddings.device
    cand = np.arange(n) if candidates is None else np.unique(candidates.cpu().numpy())
    m = cand.shape[0]
    k = max(0, min(int(k), m))
    if k == 0:
        return torch.empty(0, dtype=torch.long, device=dev)
    # One copy off the device; the greedy loop runs in numpy (see greedy_maxmin).
    e = embeddings.detach().float().cpu().numpy()[cand]
    picks = greedy_maxmin([cosine_distance_np(e)], k)[0]
    order = torch.as_tensor(cand[picks], dtype=torch.long, device=dev)
    return order if return_order else order.sort().values


def cosine_distance_np(e: np.ndarray) -> np.ndarray:
    """[m, m] cosine distance 1 - cos of the rows of a float32 [m, D] array (zero rows are at
    distance 1 from everything): maxmin_diversity's distance.

    The product goes through torch, not numpy: numpy's BLAS (OpenBLAS) keeps its own thread
    pool, which torch.set_num_threads doesn't govern. For the products of tiny/small-openvla
    (m * m * D above ~2.6e5) it wakes its workers, which then spin and take the cores from the
    model: on a 2-core VM, tiny-openvla DivPrune's prune stage took 7.8 ms (1.1 ms with
    OPENBLAS_NUM_THREADS=1) and every step of the process ran ~2x slower. The normalization
    is numpy's, as before; torch's MKL product rounded exactly like OpenBLAS's in a sweep of
    the shipped sizes (D = 256 / 512, m >= 16), but at D >= 1024 the two can differ by a few
    ulp, which could flip a pick only between candidates that tie to within that.
    """
    # np.linalg.norm(e, axis=1) is exactly sqrt(add.reduce(e * e, axis=1)), minus its checks
    norm = np.sqrt(np.add.reduce(e * e, axis=1, keepdims=True))
    t = torch.from_numpy(e / np.maximum(norm, 1e-12, out=norm))
    d = torch.mm(t, t.T).numpy()
    return np.subtract(1.0, d, out=d)


def greedy_maxmin(dists: list[np.ndarray], k: int) -> np.ndarray:
    """maxmin_diversity's greedy on the [m_b, m_b] distance matrices of several batch slots at
    once: [B, k] picks per slot in pick order (positions 0..m_b-1), k <= every m_b. The
    matrices are scratch: they may be overwritten.

    A few hundred tokens: numpy does each of the k tiny greedy steps in ~1 us where torch ops
    cost several (and a GPU would sync on every argmax anyway). Every slot takes the same k
    steps, so one argmax and one minimum per step serve the whole batch. Only comparisons
    after the distances: the picks are exactly those of the one-slot loop, ties included.
    """
    if k < 1:
        return np.empty((len(dists), 0), dtype=np.int64)
    if any(d.shape[0] < k for d in dists):
        raise ValueError(f"greedy_maxmin: k={k} exceeds a slot's {min(len(d) for d in dists)}")
    if len(dists) == 1:
        return _greedy_one(dists[0], k)[None]
    b, m = len(dists), max(d.shape[0] for d in dists)
    # Padded to m: a padding column never lowers a nearest-neighbour distance (+inf) and a
    # padding row never wins the first pick (-inf score).
    d = np.full((b, m, m), np.inf, dtype=np.float32)
    for i, di in enumerate(dists):
        d[i, : di.shape[0], : di.shape[0]] = di
    diag = np.arange(m)
    d[:, diag, diag] = np.inf
    score = d.min(axis=2)
    for i, di in enumerate(dists):
        score[i, di.shape[0] :] = -np.inf
    rows = np.arange(b)
    first = score.argmax(axis=1)
    # The same buffer becomes the greedy's: -inf on the diagonal (a chosen token's running
    # distance drops to -inf, so it is never picked again, even among duplicates) and in the
    # padding columns.
    d[:, diag, diag] = -np.inf
    for i, di in enumerate(dists):
        d[i, :, di.shape[0] :] = -np.inf
    picks = np.empty((b, k), dtype=np.int64)
    picks[:, 0] = first
    mind = d[rows, first]  # running min distance of every candidate to the chosen set
    for step in range(1, k):
        j = mind.argmax(axis=1)  # first maximum -> ties go to the lowest index
        picks[:, step] = j
        np.minimum(mind, d[rows, j], out=mind)
    return picks


def _greedy_one(dist: np.ndarray, k: int) -> np.ndarray:
    """greedy_maxmin of one slot: the loop of maxmin_diversity, one argmax + one minimum a step."""
    d = np.ascontiguousarray(dist)  # scratch (see greedy_maxmin); contiguous for the view:
    diag = d.reshape(-1)[:: d.shape[0] + 1]  # the diagonal
    diag[:] = np.inf
    first = int(d.min(axis=1).argmax())  # m == 1: inf, still picks the one
    diag[:] = -np.inf  # chosen -> -inf via the minimum below (see greedy_maxmin)
    picks = [first]
    mind = d[first].copy()
    for _ in range(k - 1):
        j = int(mind.argmax())  # first maximum -> ties go to the lowest index
        picks.append(j)
        np.minimum(mind, d[j], out=mind)
    return np.array(picks, dtype=np.int64)

"""Property tests: on random inputs every method keeps exactly `budget` sorted unique indices."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vla_prune.config import PruneConfig
from vla_prune.pruning.base import PruneInputs, available, make_pruner
from vla_prune.pruning.select import maxmin_diversity

make_pruner(PruneConfig())  # registers the strategies
# methods that prune to the budget ("vla-cache" alone reuses K/V and keeps every token)
METHODS = [m for m in available() if m not in ("fixed", "none", "vla-cache")]


def inputs(rows: int, cols: int, budget: int, seed: int, ties: bool, hist: int) -> PruneInputs:
    """Random scores/embeddings; with `ties`, small integers so ties and duplicates abound."""
    rng = np.random.default_rng(seed)
    n = rows * cols

    def draw(*shape: int) -> torch.Tensor:
        a = rng.integers(-2, 3, shape) if ties else rng.standard_normal(shape)
        return torch.tensor(a, dtype=torch.float32)

    return PruneInputs(
        budget=budget,
        num_visual=n,
        grid=(rows, cols),
        semantic=draw(n).abs(),
        text_attention=draw(int(rng.integers(1, 4)), n).abs(),
        embeddings=draw(n, 3),
        action_history=[draw(n).abs() for _ in range(hist)],
        rng=rng,
        step=10,
    )


def check(kept: torch.Tensor, budget: int, n: int) -> None:
    assert kept.dtype == torch.long and kept.dim() == 1
    assert kept.shape[0] == budget
    assert bool((kept[1:] > kept[:-1]).all())  # sorted, unique
    assert budget == 0 or (0 <= int(kept[0]) and int(kept[-1]) < n)


@settings(max_examples=50, deadline=None)
@given(
    rows=st.integers(1, 8),
    cols=st.integers(1, 8),
    frac=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31),
    ties=st.booleans(),
    hist=st.integers(0, 5),
)
def test_every_method_keeps_exactly_budget(rows, cols, frac, seed, ties, hist):
    n = rows * cols
    budget = max(1, min(n, round(frac * n)))
    for method in METHODS:
        x = inputs(rows, cols, budget, seed, ties, hist)
        kept = make_pruner(PruneConfig(method=method, window=3)).select(x)
        if budget >= n:
            assert kept is None, method
        else:
            assert kept is not None, method
            check(kept, budget, n)


@settings(max_examples=50, deadline=None)
@given(
    n=st.integers(1, 40),
    frac=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31),
    ties=st.booleans(),
    use_cand=st.booleans(),
)
def test_maxmin_unique_in_candidates(n, frac, seed, ties, use_cand):
    rng = np.random.default_rng(seed)
    a = rng.integers(-1, 2, (n, 2)) if ties else rng.standard_normal((n, 2))
    emb = torch.tensor(a, dtype=torch.float32)
    cand = torch.arange(n)
    if use_cand:
        cand = torch.tensor(np.sort(rng.choice(n, int(rng.integers(1, n + 1)), replace=False)))
    k = round(frac * len(cand))
    order = maxmin_diversity(emb, k, candidates=cand if use_cand else None, return_order=True)
    assert len(set(order.tolist())) == k and set(order.tolist()) <= set(cand.tolist())
    check(maxmin_diversity(emb, k, candidates=cand if use_cand else None), k, n)

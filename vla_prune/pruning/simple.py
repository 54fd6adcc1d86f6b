"""Score-free baselines: random and uniform (even spatial spread over the patch grid)."""

from __future__ import annotations

import math

import numpy as np
import torch

from ..config import PruneConfig
from .base import PruneInputs, register


@register("random")
class RandomKeep:
    """`budget` tokens without replacement from x.rng (default: a fresh rng from cfg.seed)."""

    needs = frozenset()

    def __init__(self, cfg: PruneConfig):
        self.cfg = cfg

    def select(self, x: PruneInputs) -> torch.Tensor | None:
        if x.budget >= x.num_visual:
            return None
        rng = x.rng if x.rng is not None else np.random.default_rng(self.cfg.seed)
        idx = rng.choice(x.num_visual, size=x.budget, replace=False)
        return torch.from_numpy(np.sort(idx)).long()


def _centers(count: int, size: int) -> list[int]:
    """`count` distinct cell centres spread evenly over range(size): floor((i + 1/2) size/count)."""
    return [math.floor((i + 0.5) * size / count) for i in range(count)]


def uniform_grid(budget: int, rows: int, cols: int) -> torch.Tensor:
    """Exactly `budget` indices of a rows x cols row-major grid, spread evenly.

    Rule: a lattice of r x c points with r ~ sqrt(budget * rows / cols) (so r/c follows the grid's
    aspect), c = ceil(budget / r), r raised if needed so r * c >= budget; lattice rows/cols are
    cell centres _centers(r, rows), _centers(c, cols). The r * c - budget surplus lattice points
    are dropped by keeping lattice points _centers(budget, r * c) in row-major order.
    """
    r = min(rows, max(1, math.floor(math.sqrt(budget * rows / cols) + 0.5)))
    c = min(cols, math.ceil(budget / r))
    r = max(r, min(rows, math.ceil(budget / c)))  # if c was capped at cols; budget <= rows * cols
    lattice = [i * cols + j for i in _centers(r, rows) for j in _centers(c, cols)]
    return torch.tensor([lattice[p] for p in _centers(budget, len(lattice))], dtype=torch.long)


@register("uniform")
class UniformKeep:
    """Even spatial spread over the patch grid (deterministic; see `uniform_grid`).

    Several images (num_visual a multiple of rows * cols) are treated as one grid of the images
    stacked vertically, so the spread covers every image.
    """

    needs = frozenset()

    def __init__(self, cfg: PruneConfig):
        self.cfg = cfg

    def select(self, x: PruneInputs) -> torch.Tensor | None:
        if x.budget >= x.num_visual:
            return None
        cols = x.grid[1]
        if x.num_visual % cols != 0:
            raise ValueError(f"uniform: num_visual={x.num_visual} doesn't fit grid {x.grid}")
        return uniform_grid(x.budget, x.num_visual // cols, cols)

"""DiT feature caching across denoising steps (EfficientVLA's action-head acceleration).

Consecutive DDIM steps change the DiT's input only a little, so each block's attention and MLP
outputs (the residual branches) are nearly the same from one step to the next. We compute them
in full at steps 0, N, 2N, ... and reuse the stored branches in between: a cached step costs the
embedders, 2 additions per block and the final layer. N = 1 recomputes every step and is exactly
the uncached head (the same operations in the same order).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.dit import DiT, DiTConfig, forward_flops


@dataclass(frozen=True)
class CacheConfig:
    """enabled=False (default) runs every block at every step; `interval` is N."""

    interval: int = 5  # EfficientVLA: recompute every 5 of 10 DDIM steps -> 2 full steps
    enabled: bool = False

    def __post_init__(self):
        if not isinstance(self.interval, int) or isinstance(self.interval, bool):
            raise ValueError(f"CacheConfig.interval must be an int, got {self.interval!r}")
        if self.interval < 1:
            raise ValueError(f"CacheConfig.interval must be >= 1, got {self.interval}")


class DiTFeatureCache:
    """Per-block (attention, MLP) outputs of the last full step, for one sampling run."""

    def __init__(self, interval: int):
        if interval < 1:
            raise ValueError(f"cache interval must be >= 1, got {interval}")
        self.interval = interval
        self.branches: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.computed = 0  # block evaluations run in full
        self.skipped = 0  # block evaluations served from the cache

    def is_full_step(self, step: int) -> bool:
        return step % self.interval == 0 or not self.branches


def forward(
    net: DiT,
    x: torch.Tensor,
    t: torch.Tensor,
    z: torch.Tensor,
    step: int,
    cache: DiTFeatureCache | None = None,
) -> torch.Tensor:
    """The DiT forward of denoising step `step`, with or without feature caching."""
    h = net.embed(x, t, z)
    if cache is None:
        for block in net.blocks:
            h = block(h)
        return net.head(h)
    full = cache.is_full_step(step)
    for i, block in enumerate(net.blocks):
        if full:
            a = block.attn_branch(h)
            h = h + a
            m = block.mlp_branch(h)
            h = h + m
            cache.branches[i] = (a, m)
            cache.computed += 1
        else:
            a, m = cache.branches[i]
            h = h + a
            h = h + m
            cache.skipped += 1
    return net.head(h)


def sampling_flops(
    cfg: DiTConfig, batch: int, steps: int, cfg_scale: float, cache: CacheConfig | None = None
) -> int:
    """FLOPs of one DDIM sampling run of the head: `steps` forwards (on 2 x batch with guidance),
    of which only the full steps (0, N, 2N, ...) run the blocks when caching is on."""
    f = forward_flops(cfg, batch * (2 if cfg_scale != 1.0 else 1))
    full = steps if cache is None or not cache.enabled else len(range(0, steps, cache.interval))
    return steps * (f["embed"] + f["final"]) + full * f["blocks"]

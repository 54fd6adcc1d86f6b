"""The pruning protocol: a strategy is a small pure function of scores -> kept indices.

Strategies never touch model internals. The engine computes what a strategy says it `needs`
(scores from the attention probe, layer-0 embeddings, the action-score history) and hands it
over as `PruneInputs` for ONE sample; the strategy returns the kept visual indices, sorted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from ..config import PruneConfig


@dataclass
class PruneInputs:
    budget: int  # visual tokens to keep
    num_visual: int  # e.g. 256
    grid: tuple[int, int] = (16, 16)  # patch grid (rows, cols), row-major token order
    semantic: torch.Tensor | None = None  # [N] head-averaged attention of the semantic query
    text_attention: torch.Tensor | None = None  # [n_text, N] head-averaged, one row per text token
    action_history: list[torch.Tensor] = field(default_factory=list)  # [N] each, oldest first
    embeddings: torch.Tensor | None = None  # [N, D] layer-0 visual embeddings
    rng: np.random.Generator | None = None
    step: int = 0  # control steps completed since reset() (temporal methods warm up on it)


@dataclass
class BatchInputs:
    """PruneInputs for every batch slot at once, one row per slot. A strategy may offer
    `select_batch(x: BatchInputs) -> (kept [B, budget] sorted, origin [B, budget] int8 | None)
    | None`; select_tokens then calls it once instead of `select` per slot (the per-slot Python
    loop and its small tensors cost more than the selection at these sizes)."""

    budget: int
    num_visual: int
    steps: list[int]  # per slot: control steps completed since reset()
    semantic: torch.Tensor | None = None  # [B, N]
    # [B, N] temporal (smoothed) action score; rows of slots without history are unused
    action: torch.Tensor | None = None
    has_action: list[bool] | None = None  # per slot: has action history (None = no slot has)
    # [B, N, D] layer-0 visual embeddings, or a function computing them when first asked for
    embeddings: torch.Tensor | Callable[[], torch.Tensor] | None = None

    def visual_embeddings(self) -> torch.Tensor | None:
        if callable(self.embeddings):
            self.embeddings = self.embeddings()
        return self.embeddings

    @classmethod
    def one(cls, x: PruneInputs, action: torch.Tensor | None = None) -> BatchInputs:
        """A one-slot batch of `x` (with its smoothed action score, if the strategy uses one)."""
        return cls(
            budget=x.budget,
            num_visual=x.num_visual,
            steps=[x.step],
            semantic=None if x.semantic is None else x.semantic[None],
            action=None if action is None else action[None],
            has_action=None if action is None else [True],
            embeddings=None if x.embeddings is None else x.embeddings[None],
        )


class Pruner(Protocol):
    name: str
    needs: frozenset[str]  # subset of {"semantic", "text_attention", "action", "embeddings"}

    def select(self, x: PruneInputs) -> torch.Tensor | None:
        """Sorted unique kept indices (LongTensor [budget]), or None to keep every token."""
        ...


_REGISTRY: dict[str, type] = {}


def register(name: str):
    def deco(cls):
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def available() -> list[str]:
    return sorted(_REGISTRY)


def make_pruner(cfg: PruneConfig) -> Pruner:
    """The strategy of cfg.method. "<method>+vla-cache" prunes with <method> (VLA-Cache's K/V
    reuse is not a token choice: the policy runs it, vla_prune/pruning/vla_cache.py)."""
    try:
        cls = _REGISTRY[cfg.token_method]
    except KeyError:
        raise ValueError(
            f"unknown pruning method {cfg.method!r}; available: {available()} "
            "(and <method>+vla-cache for any of them)"
        ) from None
    return cls(cfg)


@register("none")
class KeepAll:
    needs = frozenset()

    def __init__(self, cfg: PruneConfig):
        self.cfg = cfg

    def select(self, x: PruneInputs) -> torch.Tensor | None:
        return None


@register("fixed")
class FixedIndices:
    """Keep a given set of visual tokens (for experiments and exactness tests)."""

    needs = frozenset()

    def __init__(self, cfg: PruneConfig):
        if cfg.indices is None:
            raise ValueError("method 'fixed' needs PruneConfig.indices")
        self.indices = torch.tensor(sorted(set(cfg.indices)), dtype=torch.long)

    def select(self, x: PruneInputs) -> torch.Tensor | None:
        if len(self.indices) and (self.indices.min() < 0 or self.indices.max() >= x.num_visual):
            raise ValueError(f"fixed indices must lie in [0, {x.num_visual})")
        return self.indices

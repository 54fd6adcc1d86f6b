"""Dataclass configs, loadable from configs/*.yaml."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

SEMANTIC_QUERIES = ("last", "prefill-mean", "text-mean")


@dataclass(frozen=True)
class PruneConfig:
    """How to drop visual tokens inside the LLM.

    Layer fields left as None follow the scaling rule of `resolve_layers` (VLA-Pruner's
    K = 3 and action layer 15 on 32 layers, scaled to the model's depth).
    """

    method: str = "none"
    keep_ratio: float | None = None
    keep_count: int | None = None
    layer: int | None = None  # pruning point K: layers >= K see only kept visual tokens
    semantic_layer: int | None = None  # default K - 1
    action_layer: int | None = None  # default: the middle layer (15 of 32)
    semantic_query: str = "last"  # "last" (FastV, upstream default) | "prefill-mean" | "text-mean"
    window: int = 3  # temporal window w of action scores
    gamma: float = 0.8  # decay per step back in the window
    warmup: int | None = None  # steps after reset() without pruning; default = window
    seed: int = 0
    indices: tuple[int, ...] | None = None  # method "fixed": keep exactly these visual tokens
    # SparseVLM-style token recycling: the dropped visual tokens, weighted by their score, are
    # merged into one token that stays in the sequence (after the kept ones).
    recycle: bool = False

    def __post_init__(self):
        if not isinstance(self.method, str) or not self.method:
            raise ValueError(f"PruneConfig.method must be a non-empty string, got {self.method!r}")
        if self.keep_ratio is not None and self.keep_count is not None:
            raise ValueError("PruneConfig: give keep_ratio or keep_count, not both")
        if self.keep_ratio is not None and not (0.0 < float(self.keep_ratio) <= 1.0):
            raise ValueError(f"PruneConfig.keep_ratio must be in (0, 1], got {self.keep_ratio}")
        if self.keep_count is not None and int(self.keep_count) < 1:
            raise ValueError(f"PruneConfig.keep_count must be >= 1, got {self.keep_count}")
        for name in ("layer", "semantic_layer", "action_layer", "warmup"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 0):
                raise ValueError(f"PruneConfig.{name} must be a non-negative int, got {v!r}")
        if self.layer is not None and self.layer < 1:
            raise ValueError("PruneConfig.layer must be >= 1 (layer 0 has no attention yet)")
        if self.semantic_query not in SEMANTIC_QUERIES:
            raise ValueError(
                f"PruneConfig.semantic_query must be one of {SEMANTIC_QUERIES}, "
                f"got {self.semantic_query!r}"
            )
        if not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"PruneConfig.window must be an int >= 1, got {self.window!r}")
        if not (0.0 < float(self.gamma) <= 1.0):
            raise ValueError(f"PruneConfig.gamma must be in (0, 1], got {self.gamma}")
        if self.indices is not None:
            object.__setattr__(self, "indices", tuple(int(i) for i in self.indices))

    def budget(self, num_visual: int) -> int:
        """Visual tokens kept after the pruning point."""
        if self.method == "fixed" and self.indices is not None:
            return len(self.indices)
        if self.keep_count is not None:
            return min(int(self.keep_count), num_visual)
        if self.keep_ratio is not None:
            return max(1, min(num_visual, round(float(self.keep_ratio) * num_visual)))
        return num_visual

    def resolve_layers(self, num_layers: int) -> tuple[int, int, int]:
        """(K, semantic layer, action layer) for a model of `num_layers` decoder layers.

        Scaling rule: K = max(1, round(3 L / 32)), semantic = K - 1,
        action = min(L - 1, round(15 L / 32)) — exactly (3, 2, 15) for L = 32.
        """
        k = self.layer if self.layer is not None else max(1, round(3 * num_layers / 32))
        sem = self.semantic_layer if self.semantic_layer is not None else k - 1
        act = self.action_layer
        if act is None:
            act = min(num_layers - 1, round(15 * num_layers / 32))
        for name, v in (("layer", k), ("semantic_layer", sem), ("action_layer", act)):
            if v >= num_layers:
                raise ValueError(f"PruneConfig.{name}={v} but the model has {num_layers} layers")
        if sem >= k:
            raise ValueError(f"semantic_layer ({sem}) must come before the pruning layer ({k})")
        return k, sem, act

    @property
    def warmup_steps(self) -> int:
        return self.window if self.warmup is None else self.warmup


@dataclass(frozen=True)
class EngineConfig:
    """How the engine runs, beside what it prunes.

    compile: the static-shape decode step (engine/static_decode.py) compiled with
        torch.compile (inductor on CPU, CUDA graphs on a GPU); False = the eager engine.
    weights: "fp32" (as loaded) | "bf16" (the whole model) | "int8" (bf16, with int8
        weight-only linears in the LLM's decoder layers; engine/weights.py). A conversion
        only goes down in precision: load the policy again to go back.
    """

    compile: bool = False
    weights: str = "fp32"

    def __post_init__(self):
        from .engine.weights import WEIGHT_FORMATS

        if not isinstance(self.compile, bool):
            raise ValueError(f"EngineConfig.compile must be a bool, got {self.compile!r}")
        if self.weights not in WEIGHT_FORMATS:
            raise ValueError(
                f"EngineConfig.weights must be one of {WEIGHT_FORMATS}, got {self.weights!r}"
            )


T = TypeVar("T")


def from_dict(cls: type[T], data: dict[str, Any], source: str = "config") -> T:
    """Build a dataclass from a dict, naming unknown keys instead of a bare TypeError."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(
            f"{source}: unknown keys {unknown} for {cls.__name__}; known: {sorted(names)}"
        )
    return cls(**data)


def load_yaml(cls: type[T], path: str | Path) -> T:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"cannot read config {path}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return from_dict(cls, data, source=str(path))

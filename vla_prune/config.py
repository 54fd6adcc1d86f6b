"""Dataclass configs, loadable from configs/*.yaml."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

SEMANTIC_QUERIES = ("last", "prefill-mean", "text-mean")
# VLA-Cache's layers of reuse on OpenVLA's 32 layers (its fork's LlamaModel: pruning_loc).
VLA_CACHE_LAYERS_32 = (2, 6, 9, 11)
VLA_CACHE = "vla-cache"  # the method name; "<method>+vla-cache" prunes with <method> first


@dataclass(frozen=True)
class VLACacheConfig:
    """VLA-Cache (arXiv 2502.02175): reuse the previous step's K/V of visually static tokens.

    Upstream's values on OpenVLA's 256 visual tokens: a patch is static at cosine similarity
    >= 0.996 of its raw pixels, at most the top 130 of them, minus the 100 the text attended to
    most at the middle layer. The two counts are kept here as fractions of the token count
    (130/256, 100/256), so a 64-token model reuses at most 32 and filters 25.
    """

    similarity_threshold: float = 0.996
    max_reused: float = 130 / 256  # fraction of the visual tokens (upstream: 130 of 256)
    relevance_top_k: float = 100 / 256  # fraction of the visual tokens (upstream: 100 of 256)
    entropy_damping: float = 0.55  # upward jumps of the per-layer reuse fraction are damped
    relevance_layer: int | None = None  # default: the middle layer (15 of 32), as action_layer
    # Layers where the reused set may grow (it never shrinks: a row not computed at layer l has
    # no input for layer l + 1); default: (2, 6, 9, 11) of 32, scaled to the model's depth.
    layers: tuple[int, ...] | None = None
    # Steps between recomputing the per-layer entropy schedule (1 = every step, as upstream,
    # whose eager attention maps give it for free; here it costs a probe of every layer's text
    # rows, ~7 ms a step on small-openvla's CPU step). In between, the last schedule is kept.
    schedule_every: int = 1

    def __post_init__(self):
        t = self.similarity_threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not -1.0 <= t <= 1.0:
            raise ValueError(f"VLACacheConfig.similarity_threshold must be in [-1, 1], got {t!r}")
        for name in ("max_reused", "relevance_top_k"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise ValueError(
                    f"VLACacheConfig.{name} is a fraction of the visual tokens in [0, 1], got {v!r}"
                )
        d = self.entropy_damping
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d <= 1.0:
            raise ValueError(f"VLACacheConfig.entropy_damping must be in [0, 1], got {d!r}")
        e = self.schedule_every
        if isinstance(e, bool) or not isinstance(e, int) or e < 1:
            raise ValueError(f"VLACacheConfig.schedule_every must be an int >= 1, got {e!r}")
        r = self.relevance_layer
        if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 0):
            raise ValueError(f"VLACacheConfig.relevance_layer must be an int >= 0, got {r!r}")
        if self.layers is not None:
            layers = tuple(self.layers)
            if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers):
                raise ValueError(f"VLACacheConfig.layers must be ints >= 0, got {self.layers!r}")
            object.__setattr__(self, "layers", tuple(sorted(set(layers))))

    def counts(self, num_visual: int) -> tuple[int, int]:
        """(most tokens reused, tokens the relevance filter removes) for this token count."""
        return round(self.max_reused * num_visual), round(self.relevance_top_k * num_visual)

    def resolve_layers(self, num_layers: int) -> tuple[tuple[int, ...], int]:
        """(layers where the reused set may grow, relevance layer) for `num_layers` layers."""
        layers = self.layers
        if layers is None:  # never layer 0: the first layers build the context (upstream)
            layers = tuple(
                sorted({max(1, round(i * num_layers / 32)) for i in VLA_CACHE_LAYERS_32})
            )
        rel = self.relevance_layer
        if rel is None:
            rel = min(num_layers - 1, round(15 * num_layers / 32))
        bad = [i for i in (*layers, rel) if i >= num_layers]
        if bad:
            raise ValueError(
                f"VLACacheConfig layers {bad} out of range: the model has {num_layers}"
            )
        return layers, rel


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
    # VLA-Cache's parameters, for the methods that reuse K/V ("vla-cache", "<method>+vla-cache");
    # None = VLACacheConfig() defaults. A mapping (from YAML) is turned into a VLACacheConfig.
    vla_cache: VLACacheConfig | None = None

    def __post_init__(self):
        if not isinstance(self.method, str) or not self.method:
            raise ValueError(f"PruneConfig.method must be a non-empty string, got {self.method!r}")
        if isinstance(self.vla_cache, dict):
            cache = from_dict(VLACacheConfig, self.vla_cache, source="PruneConfig.vla_cache")
            object.__setattr__(self, "vla_cache", cache)
        elif self.vla_cache is not None and not isinstance(self.vla_cache, VLACacheConfig):
            raise ValueError(
                "PruneConfig.vla_cache must be a VLACacheConfig or a mapping, "
                f"got {self.vla_cache!r}"
            )
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

    @property
    def prunes(self) -> bool:
        """False for the methods that keep every token ("none", "vla-cache" alone)."""
        return self.method not in ("none", VLA_CACHE)

    @property
    def reuses_kv(self) -> bool:
        """True for VLA-Cache ("vla-cache" alone or "<method>+vla-cache")."""
        return self.method == VLA_CACHE or self.method.endswith("+" + VLA_CACHE)

    @property
    def token_method(self) -> str:
        """The method that chooses the kept tokens: "vla-pruner+vla-cache" -> "vla-pruner"
        ("vla-cache" alone is registered as a keep-all method)."""
        suffix = "+" + VLA_CACHE
        return self.method[: -len(suffix)] if self.method.endswith(suffix) else self.method

    @property
    def cache_config(self) -> VLACacheConfig:
        return self.vla_cache if self.vla_cache is not None else VLACacheConfig()


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

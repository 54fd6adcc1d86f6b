"""Skipping recomputation: DiT feature caching across denoising steps (dit_cache) and LLM
layer skipping (layer_skip)."""

from .dit_cache import CacheConfig, DiTFeatureCache, sampling_flops

__all__ = ["CacheConfig", "DiTFeatureCache", "sampling_flops"]

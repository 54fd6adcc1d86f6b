"""CogACTPolicy: the Policy step composed with CogACT's head (heads/diffusion.py) — one
prefill, then DiT denoising. Everything else (preprocessing, the engine, pruning) is shared.

Outputs: StepResult.actions is the un-normalized [16, 7] chunk, or — with the adaptive action
ensemble on — the ensembled current action as [1, 7]; extra["chunk"] always holds the raw
(un-normalized, un-ensembled) [16, 7] chunk. Feature caching and sampling are set with
configure(cache=CacheConfig(...), sampling=SamplingConfig(...)).
"""

from __future__ import annotations

from pathlib import Path

from .caching.dit_cache import CacheConfig
from .heads.diffusion import AdaptiveEnsembler, DiffusionHead
from .models.cogact import CogACTModel, SamplingConfig
from .policy import Policy

__all__ = ["AdaptiveEnsembler", "CogACTPolicy"]


class CogACTPolicy(Policy):
    head: DiffusionHead

    def __init__(self, model: CogACTModel, tokenizer, norm_stats, unnorm_key=None):
        head = DiffusionHead(model.action_model.net, model.config)
        super().__init__(model, tokenizer, norm_stats, unnorm_key, head=head)

    @property
    def cache_config(self) -> CacheConfig:
        return self.head.cache_config

    @property
    def sampling(self) -> SamplingConfig:
        return self.head.sampling

    def save(self, path: str | Path) -> Path:
        """CogACT's layout: checkpoints/<name>.pt, config.json, dataset_statistics.json."""
        from .models.cogact_checkpoints import save_cogact

        return save_cogact(self.model, self.tokenizer, self.norm_stats, Path(path))

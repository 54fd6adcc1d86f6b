"""CogACTPolicy: the Policy step with CogACT's head — one prefill, then DiT denoising.

What differs from OpenVLA (everything else — preprocessing, the engine, pruning — is shared):
- the prompt ends with the cognition token; the prefill returns its final-norm hidden state;
- the action head samples a [16, 7] chunk with DDIM + classifier-free guidance, optionally with
  DiT feature caching (configure(cache=CacheConfig(...)));
- the action-level pruning score is the cognition token's attention to the visual tokens at the
  action layer of this step's prefill (there is no decode to probe);
- outputs: StepResult.actions is the un-normalized [16, 7] chunk, or — with the adaptive action
  ensemble on — the ensembled current action as [1, 7]; extra["chunk"] always holds the raw
  (un-normalized, un-ensembled) [16, 7] chunk.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .caching.dit_cache import CacheConfig, DiTFeatureCache
from .caching.dit_cache import forward as dit_forward
from .config import EngineConfig, PruneConfig
from .engine.runner import PrefillResult
from .models.cogact import CogACTConfig, CogACTModel, DDIMSampler, SamplingConfig, guided_eps
from .models.openvla import unnormalize
from .policy import HeadOutput, Policy


class AdaptiveEnsembler:
    """CogACT's adaptive action ensemble for one robot (one batch slot).

    Keeps the last `horizon` chunks. For the current step, chunk k steps old predicts it at its
    row k; those predictions a_i are averaged with weights exp(alpha * cos(a_i, a_now)),
    normalized, where a_now is the newest chunk's first action.
    """

    def __init__(self, horizon: int, alpha: float):
        self.horizon, self.alpha = horizon, alpha
        self.chunks: deque[np.ndarray] = deque(maxlen=horizon)

    def reset(self) -> None:
        self.chunks.clear()

    def predictions(self) -> np.ndarray:
        """[n, dim] predictions of the current step, oldest chunk first."""
        n = len(self.chunks)
        return np.stack([c[n - 1 - j] for j, c in enumerate(self.chunks)])

    def weights(self, preds: np.ndarray) -> np.ndarray:
        now = preds[-1]
        cos = preds @ now / (np.linalg.norm(preds, axis=1) * np.linalg.norm(now) + 1e-7)
        w = np.exp(self.alpha * cos)
        return w / w.sum()

    def push(self, chunk: np.ndarray) -> np.ndarray:
        """Add this step's [chunk, dim] prediction; returns the ensembled action [dim]."""
        self.chunks.append(np.asarray(chunk, dtype=np.float64))
        preds = self.predictions()
        return (self.weights(preds)[:, None] * preds).sum(0).astype(np.float32)


class CogACTPolicy(Policy):
    prefill_output = "hidden"
    head_stage = "action_head"

    def __init__(self, model: CogACTModel, tokenizer, norm_stats, unnorm_key=None):
        cfg: CogACTConfig = model.config
        # Set before Policy.__init__, which calls reset().
        self.sampling: SamplingConfig = _check_sampling(cfg.sampling, cfg)
        self.cache_config = CacheConfig()
        super().__init__(model, tokenizer, norm_stats, unnorm_key)

    @property
    def max_new_tokens(self) -> int:
        return 0  # one prefill, no decode

    # -- configuration ------------------------------------------------------------------------

    def configure(
        self,
        prune: PruneConfig | None = None,
        unnorm_key: str | None = None,
        reset: bool = True,
        skip_layers: Sequence[int] | None = None,
        cache: CacheConfig | None = None,
        sampling: SamplingConfig | None = None,
        engine: EngineConfig | None = None,
    ) -> CogACTPolicy:
        """Policy.configure plus the DiT feature cache and the sampling / ensemble settings.

        Ours are validated before Policy.configure runs and applied only if it succeeds.
        (Ensembles and noise streams are created lazily per slot, after any reset.)"""
        if cache is not None and not isinstance(cache, CacheConfig):
            raise TypeError(f"cache must be a CacheConfig, got {type(cache).__name__}")
        if sampling is not None:
            if not isinstance(sampling, SamplingConfig):
                raise TypeError(f"sampling must be a SamplingConfig, got {type(sampling).__name__}")
            _check_sampling(sampling, self.config)
            if not reset and sampling.ensemble_horizon != self.sampling.ensemble_horizon:
                raise ValueError("changing the ensemble horizon needs reset=True")
        super().configure(prune, unnorm_key, reset, skip_layers, engine)
        if cache is not None:
            self.cache_config = cache
        if sampling is not None:
            self.sampling = sampling
            for e in self._ensemblers:  # reset=False keeps their history
                e.alpha = sampling.ensemble_alpha
        return self

    def reset(self) -> None:
        super().reset()
        self._ensemblers: list[AdaptiveEnsembler] = []
        self._noise: list[torch.Generator] = []

    _EPISODE_STATE = (*Policy._EPISODE_STATE, "_ensemblers", "_noise")

    def reset_slot(self, i: int) -> None:
        super().reset_slot(i)  # also creates the slot's noise stream and ensembler if missing
        s = self.sampling
        self._noise[i] = torch.Generator().manual_seed(s.seed * 1_000_003)  # slot 0's stream
        self._ensemblers[i] = AdaptiveEnsembler(s.ensemble_horizon, s.ensemble_alpha)

    def _slots(self, n: int):
        super()._slots(n)
        s = self.sampling
        while len(self._noise) < n:
            g = torch.Generator().manual_seed(s.seed * 1_000_003 + len(self._noise))
            self._noise.append(g)
            self._ensemblers.append(AdaptiveEnsembler(s.ensemble_horizon, s.ensemble_alpha))

    # -- inputs -------------------------------------------------------------------------------

    def token_ids(self, instruction: str) -> list[int]:
        """OpenVLA's prompt ids (with the "▁" suffix on Llama-2), then the cognition token."""
        return super().token_ids(instruction) + [self.config.cognition_token_id]

    # -- the head -----------------------------------------------------------------------------

    def _record_layers(self, sem_layer: int, act_layer: int) -> tuple[int, ...]:
        layers = super()._record_layers(sem_layer, act_layer)
        if "action" in self._pruner.needs:
            layers = (*layers, act_layer)
        return layers

    def _action_head(self, pre: PrefillResult, probe_layer: int | None) -> HeadOutput:
        """DDIM + CFG from per-slot seeded noise; with `probe_layer`, the cognition token's
        head-averaged attention to the visual tokens at that layer (pruned ones are 0)."""
        hidden = pre.output
        b = hidden.shape[0]
        scores, probe_ms = None, 0.0
        if probe_layer is not None:
            t0 = self.engine.clock()  # synchronizes on a GPU: the probe pays for its own kernels
            rows = torch.full((b, 1), -1, dtype=torch.long, device=hidden.device)
            scores = pre.context.attention(probe_layer, rows).mean(dim=1)[:, 0]
            probe_ms = (self.engine.clock() - t0) * 1e3

        net = self.model.action_model.net
        s = self.sampling
        sampler = DDIMSampler(s.train_steps, s.ddim_steps)
        cache = DiTFeatureCache(self.cache_config.interval) if self.cache_config.enabled else None
        shape = (self.config.chunk, self.config.dit.in_channels)
        noise = torch.stack([torch.randn(shape, generator=self._noise[i]) for i in range(b)])
        cognition = hidden[:, None].to(net.positional_embedding.dtype)  # [B, 1, D]
        uncond = getattr(net.z_embedder, "uncondition", None)
        if uncond is None and s.cfg_scale != 1.0:
            raise ValueError("this DiT has no unconditional embedding: use cfg_scale=1.0")

        def eps_fn(x: torch.Tensor, t: int, i: int) -> torch.Tensor:
            def net_fn(xx, tt, zz):
                return dit_forward(net, xx, tt, zz, step=i, cache=cache)

            return guided_eps(net_fn, x, t, cognition, uncond, s.cfg_scale)

        sample = sampler.sample(eps_fn, noise.to(hidden.device))
        normalized = sample.clamp(-1.0, 1.0).cpu().numpy()
        # As CogACT: the gripper (last dimension) is binarized at 0.5 before un-normalizing.
        normalized[..., -1] = np.where(normalized[..., -1] < 0.5, 0.0, 1.0)
        normalized = normalized.astype(np.float32)
        steps = len(sampler.timesteps) * len(net.blocks)
        computed = cache.computed if cache is not None else steps
        skipped = cache.skipped if cache is not None else 0
        extra = {
            "chunk": self._unnormalize(normalized),
            "dit_blocks_computed": np.full(b, computed),
            "dit_blocks_skipped": np.full(b, skipped),
        }
        return HeadOutput(normalized, None, scores, extra, probe_ms)

    def _unnormalize(self, normalized: np.ndarray) -> np.ndarray:
        return unnormalize(normalized, self.norm_stats[self.unnorm_key]["action"])

    def _postprocess(self, normalized: np.ndarray) -> np.ndarray:
        """[B, 16, dim] -> the un-normalized chunk, or with the ensemble on [B, 1, dim]."""
        chunks = self._unnormalize(normalized)
        if not self.sampling.ensemble:
            return chunks
        return np.stack([self._ensemblers[i].push(c)[None] for i, c in enumerate(chunks)])

    # -- persistence --------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """CogACT's layout: checkpoints/<name>.pt, config.json, dataset_statistics.json."""
        from .models.cogact_checkpoints import save_cogact

        return save_cogact(self.model, self.tokenizer, self.norm_stats, Path(path))


def _check_sampling(s: SamplingConfig, cfg: CogACTConfig) -> SamplingConfig:
    if s.ensemble_horizon > cfg.chunk:
        # a chunk k steps old predicts the current step at row k: it must have that row
        raise ValueError(
            f"ensemble_horizon {s.ensemble_horizon} exceeds the chunk length {cfg.chunk}"
        )
    return s

"""CogACT's head: DDIM + classifier-free guidance on the cognition token's hidden state, with
optional DiT feature caching and CogACT's adaptive action ensemble.

- the prompt ends with the cognition token; the prefill returns its final-norm hidden state;
- it samples a [chunk, dim] action chunk from per-slot seeded noise;
- the action-level pruning score is the cognition token's attention to the visual tokens at the
  action layer of this step's prefill (there is no decode to probe);
- actions: the un-normalized chunk, or with the ensemble on the ensembled current action as
  [1, dim]; extra["chunk"] always holds the raw (un-normalized, un-ensembled) chunk.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np
import torch

from ..caching.dit_cache import CacheConfig, DiTFeatureCache, sampling_flops
from ..caching.dit_cache import forward as dit_forward
from ..models.cogact import CogACTConfig, DDIMSampler, SamplingConfig, guided_eps
from ..roofline import action_head_bytes
from .base import ActionHead, HeadOutput, Unnormalize


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


class DiffusionHead(ActionHead):
    stage = "action_head"
    prefill_output = "hidden"

    def __init__(self, net: torch.nn.Module, config: CogACTConfig):
        self.net = net  # models.dit.DiT
        self.config = config
        self.sampling: SamplingConfig = check_sampling(config.sampling, config)
        self.cache_config = CacheConfig()
        self.reset()

    def prompt_suffix(self) -> list[int]:
        return [self.config.cognition_token_id]

    def probe_layers(self, act_layer: int) -> tuple[int, ...]:
        return (act_layer,)  # the cognition token's attention, read from the prefill

    def configure(self, cache=None, sampling=None, reset: bool = True) -> None:
        """Ensembles and noise streams are created lazily per slot, after any reset."""
        if cache is not None and not isinstance(cache, CacheConfig):
            raise TypeError(f"cache must be a CacheConfig, got {type(cache).__name__}")
        if sampling is not None:
            if not isinstance(sampling, SamplingConfig):
                raise TypeError(f"sampling must be a SamplingConfig, got {type(sampling).__name__}")
            check_sampling(sampling, self.config)
            if not reset and sampling.ensemble_horizon != self.sampling.ensemble_horizon:
                raise ValueError("changing the ensemble horizon needs reset=True")

    def apply(self, cache=None, sampling=None) -> None:
        """Set what configure() validated (after the whole policy configuration succeeded)."""
        if cache is not None:
            self.cache_config = cache
        if sampling is not None:
            self.sampling = sampling
            for e in self._ensemblers:  # reset=False keeps their history
                e.alpha = sampling.ensemble_alpha

    # -- per-slot state -----------------------------------------------------------------------

    def reset(self) -> None:
        self._ensemblers: list[AdaptiveEnsembler] = []
        self._noise: list[torch.Generator] = []

    def ensure_slots(self, n: int) -> None:
        s = self.sampling
        while len(self._noise) < n:
            g = torch.Generator().manual_seed(s.seed * 1_000_003 + len(self._noise))
            self._noise.append(g)
            self._ensemblers.append(AdaptiveEnsembler(s.ensemble_horizon, s.ensemble_alpha))

    def reset_slot(self, i: int) -> None:
        self.ensure_slots(i + 1)
        s = self.sampling
        self._noise[i] = torch.Generator().manual_seed(s.seed * 1_000_003)  # slot 0's stream
        self._ensemblers[i] = AdaptiveEnsembler(s.ensemble_horizon, s.ensemble_alpha)

    def episode_state(self) -> dict[str, Any]:
        return {"ensemblers": self._ensemblers, "noise": self._noise}

    def set_episode_state(self, state: dict[str, Any]) -> None:
        self._ensemblers, self._noise = state["ensemblers"], state["noise"]

    # -- the step -----------------------------------------------------------------------------

    def run(self, pre, engine, probe_layer: int | None, unnormalize: Unnormalize) -> HeadOutput:
        hidden = pre.output
        b = hidden.shape[0]
        self.ensure_slots(b)
        scores, probe_ms = None, 0.0
        if probe_layer is not None:
            t0 = engine.clock()  # synchronizes on a GPU: the probe pays for its own kernels
            rows = torch.full((b, 1), -1, dtype=torch.long, device=hidden.device)
            scores = pre.context.attention(probe_layer, rows).mean(dim=1)[:, 0]
            probe_ms = (engine.clock() - t0) * 1e3

        net, s = self.net, self.sampling
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
        chunks = unnormalize(normalized)
        extra = {
            "chunk": chunks,
            "dit_blocks_computed": np.full(b, cache.computed if cache is not None else steps),
            "dit_blocks_skipped": np.full(b, cache.skipped if cache is not None else 0),
        }
        if s.ensemble:
            actions = np.stack([self._ensemblers[i].push(c)[None] for i, c in enumerate(chunks)])
        else:
            actions = chunks
        return HeadOutput(actions, normalized, None, scores, extra, probe_ms)

    # -- accounting ---------------------------------------------------------------------------

    def flops(self) -> int:
        s = self.sampling
        return sampling_flops(self.config.dit, 1, s.ddim_steps, s.cfg_scale, self.cache_config)

    def weight_bytes(self, dtype_bytes: float) -> float:
        return action_head_bytes(self.net, self.sampling.ddim_steps, self.cache_config, dtype_bytes)


def check_sampling(s: SamplingConfig, cfg: CogACTConfig) -> SamplingConfig:
    if s.ensemble_horizon > cfg.chunk:
        # a chunk k steps old predicts the current step at row k: it must have that row
        raise ValueError(
            f"ensemble_horizon {s.ensemble_horizon} exceeds the chunk length {cfg.chunk}"
        )
    return s

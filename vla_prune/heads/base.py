"""The action-head interface a Policy composes with.

A head says what it needs from the prefill (`prefill_output`, `max_new_tokens`, the layers its
attention probe reads), runs after it, and owns its per-episode, per-batch-slot state (noise
streams, action ensembles). Capabilities that only some heads have (a DiT feature cache, a
sampling configuration) are attributes that are None on heads without them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from ..engine.runner import LlamaEngine, PrefillResult

# [B, chunk, dim] in [-1, 1] -> robot actions (the policy's un-normalization)
Unnormalize = Callable[[np.ndarray], np.ndarray]


@dataclass
class HeadOutput:
    actions: np.ndarray  # [B, chunk, action_dim] float32, un-normalized (ensembled if on)
    normalized: np.ndarray  # [B, chunk, action_dim] in [-1, 1]
    action_tokens: np.ndarray | None = None  # [B, action_dim] (token-decoding heads)
    action_scores: torch.Tensor | None = None  # [B, N] action-level attention this step
    extra: dict[str, Any] = field(default_factory=dict)  # per-sample extras ([B, ...] each)
    probe_ms: float = 0.0  # time spent on action_scores (charged to "prune", not the head)


class ActionHead:
    stage = "action_head"  # the timing stage it reports
    prefill_output = "hidden"  # what it needs from the prefill: "logits" | "hidden"
    cache_config = None  # a DiT feature cache's CacheConfig; None: this head has none
    sampling = None  # a diffusion head's SamplingConfig; None: not a sampling head

    @property
    def max_new_tokens(self) -> int:
        """KV-cache rows to reserve after the prefill (tokens the head decodes)."""
        return 0

    @property
    def decode_steps(self) -> int:
        """Single-token LLM passes per step (FLOPs and roofline accounting)."""
        return 0

    def prompt_suffix(self) -> list[int]:
        """Token ids appended to the prompt (e.g. CogACT's cognition token)."""
        return []

    def probe_layers(self, act_layer: int) -> tuple[int, ...]:
        """Prefill layers whose inputs its action-level probe reads (recorded in the prefill)."""
        return ()

    def run(
        self,
        pre: PrefillResult,
        engine: LlamaEngine,
        probe_layer: int | None,
        unnormalize: Unnormalize,
    ) -> HeadOutput:
        """The head's work for one batched step. With `probe_layer`, also the action-level
        pruning score (attention of the head's queries to the visual tokens at that layer)."""
        raise NotImplementedError

    def configure(self, cache=None, sampling=None, reset: bool = True) -> None:
        """Validate and apply head settings (feature cache, sampling); heads without them
        reject them with a clear error."""
        if cache is not None:
            raise ValueError(f"{type(self).__name__} has no feature cache to configure")
        if sampling is not None:
            raise ValueError(f"{type(self).__name__} does not sample: no sampling to configure")

    def apply(self, cache=None, sampling=None) -> None:
        """Set what configure() validated, once the whole policy configuration succeeded."""

    # -- per-episode state, per batch slot ----------------------------------------------------

    def reset(self) -> None:
        """New episode in every slot."""

    def ensure_slots(self, n: int) -> None:
        """State for slots 0..n-1 (created lazily, after any reset)."""

    def reset_slot(self, i: int) -> None:
        """New episode in slot i: the same streams as slot 0 of a fresh head."""

    def episode_state(self) -> dict[str, Any]:
        return {}

    def set_episode_state(self, state: dict[str, Any]) -> None:
        pass

    # -- accounting ---------------------------------------------------------------------------

    def flops(self) -> int:
        """FLOPs of the head's own network per step (0: the head runs only the LLM)."""
        return 0

    def weight_bytes(self, dtype_bytes: float) -> float:
        """Weight bytes its own network reads per step (roofline)."""
        return 0.0

"""Temporal smoothing of action scores: a decaying window over the last w control steps.

score_t = sum_{i=1..w} gamma^(i-1) * s_{t-i}, normalized to sum 1 — the NEWEST step has weight 1
and older ones decay. (An early upstream release weighted the oldest step highest: a bug.)
"""

from __future__ import annotations

from collections import deque
from functools import lru_cache

import torch


def window_weights(window: int, gamma: float, n: int) -> torch.Tensor:
    """Weights for the n most recent steps, newest first: [1, g, g^2, ...] / sum; n <= window."""
    n = min(int(n), int(window))
    if n < 1:
        raise ValueError(f"window_weights needs at least one step, got n={n}")
    w = torch.tensor(float(gamma)) ** torch.arange(n, dtype=torch.float32)
    return w / w.sum()


@lru_cache(maxsize=64)
def _weights(window: int, gamma: float, n: int) -> torch.Tensor:
    """window_weights, built once per (window, gamma, n): shared, never modified in place
    (a normal tensor, not an inference-mode one)."""
    with torch.inference_mode(False):
        return window_weights(window, gamma, n)


@lru_cache(maxsize=64)
def _weights_batch(window: int, gamma: float, n: int) -> torch.Tensor:
    """_weights shaped [1, n, 1] for a [B, n, N] stack."""
    with torch.inference_mode(False):
        return _weights(window, gamma, n)[None, :, None]


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float32 else x.float()


def smooth_action_scores(
    history: list[torch.Tensor], window: int, gamma: float
) -> torch.Tensor | None:
    """Weighted sum of the last `window` score vectors (history oldest first); None if empty."""
    if len(history) == 0:
        return None
    recent = list(history)[-window:][::-1]  # newest first, to line up with the weights
    s = torch.stack([_f32(h) for h in recent])  # [n, N]
    w = _weights(window, float(gamma), len(recent)).to(s.device)
    return (w[:, None] * s).sum(dim=0)


def smooth_action_batch(
    histories: list[list[torch.Tensor]], window: int, gamma: float
) -> tuple[torch.Tensor | None, list[bool]]:
    """smooth_action_scores of every batch slot as one [B, N] tensor (zeros for slots without
    history; None if no slot has any), and which slots have history.

    Slots whose windows hold the same number of steps (the usual case) share one stacked
    product and sum; the per-row result is bit-identical to smooth_action_scores.
    """
    recents = [list(h)[-window:][::-1] for h in histories]
    has = [len(r) > 0 for r in recents]
    if not any(has):
        return None, has
    steps = len(recents[0])
    if all(len(r) == steps for r in recents):
        s = torch.stack([_f32(h) for r in recents for h in r])  # [B * n, N]
        w = _weights_batch(window, float(gamma), steps)
        w = w if w.device == s.device else w.to(s.device)
        return (w * s.view(len(recents), steps, -1)).sum(dim=1), has
    rows = [smooth_action_scores(h, window, gamma) for h in histories]
    like = next(r for r in rows if r is not None)
    return torch.stack([torch.zeros_like(like) if r is None else r for r in rows]), has


class ActionScoreHistory:
    """The last `window` action-score vectors of an episode; clear() at episode reset."""

    def __init__(self, window: int):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = window
        self._buf: deque[torch.Tensor] = deque(maxlen=window)

    def push(self, scores: torch.Tensor) -> None:
        if scores.dim() != 1:
            raise ValueError(f"action scores must be 1-D [N], got {tuple(scores.shape)}")
        # detach + clone: the engine may reuse the buffer it hands us
        self._buf.append(scores.detach().clone())

    def clear(self) -> None:
        self._buf.clear()

    def as_list(self) -> list[torch.Tensor]:
        """Oldest first, as PruneInputs.action_history expects."""
        return list(self._buf)

    def __len__(self) -> int:
        return len(self._buf)

"""Temporal smoothing of action scores: a decaying window over the last w control steps.

score_t = sum_{i=1..w} gamma^(i-1) * s_{t-i}, normalized to sum 1 — the NEWEST step has weight 1
and older ones decay. (An early upstream release weighted the oldest step highest: a bug.)
"""

from __future__ import annotations

from collections import deque

import torch


def window_weights(window: int, gamma: float, n: int) -> torch.Tensor:
    """Weights for the n most recent steps, newest first: [1, g, g^2, ...] / sum; n <= window."""
    n = min(int(n), int(window))
    if n < 1:
        raise ValueError(f"window_weights needs at least one step, got n={n}")
    w = torch.tensor(float(gamma)) ** torch.arange(n, dtype=torch.float32)
    return w / w.sum()


def smooth_action_scores(
    history: list[torch.Tensor], window: int, gamma: float
) -> torch.Tensor | None:
    """Weighted sum of the last `window` score vectors (history oldest first); None if empty."""
    if len(history) == 0:
        return None
    recent = list(history)[-window:][::-1]  # newest first, to line up with the weights
    s = torch.stack([h.float() for h in recent])  # [n, N]
    w = window_weights(window, gamma, len(recent)).to(s.device)
    return (w[:, None] * s).sum(dim=0)


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

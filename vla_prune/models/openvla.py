"""OpenVLA's conventions: the prompt, action tokens <-> bins, and un-normalization."""

from __future__ import annotations

from typing import Any

import numpy as np


def build_prompt(instruction: str) -> str:
    return f"In: What action should the robot take to {instruction.lower()}?\nOut:"


class ActionTokenizer:
    """Maps continuous actions in [-1, 1] to the last `n_bins` ids of the tokenizer vocabulary.

    As upstream: bins = linspace(-1, 1, n_bins); a value goes to the token
    `vocab_size - digitize(value, bins)`; decoding takes d = vocab_size - id, clips d - 1 to
    [0, n_bins - 2] and returns that bin center. (So there are n_bins - 1 distinct values.)
    """

    def __init__(self, vocab_size: int, n_bins: int = 256):
        self.vocab_size = vocab_size
        self.n_bins = n_bins
        self.bins = np.linspace(-1.0, 1.0, n_bins)
        self.bin_centers = (self.bins[:-1] + self.bins[1:]) / 2.0

    @property
    def first_action_id(self) -> int:
        return self.vocab_size - self.n_bins

    def encode(self, actions: np.ndarray) -> np.ndarray:
        a = np.clip(np.asarray(actions, dtype=np.float64), -1.0, 1.0)
        return (self.vocab_size - np.digitize(a, self.bins)).astype(np.int64)

    def decode(self, token_ids: np.ndarray) -> np.ndarray:
        d = self.vocab_size - np.asarray(token_ids, dtype=np.int64)
        idx = np.clip(d - 1, 0, self.bin_centers.shape[0] - 1)
        return self.bin_centers[idx].astype(np.float32)


def unnormalize(actions: np.ndarray, stats: dict[str, Any]) -> np.ndarray:
    """a = 0.5 (a_norm + 1)(q99 - q01) + q01 where mask is true; other dims pass through."""
    q01 = np.asarray(stats["q01"], dtype=np.float32)
    q99 = np.asarray(stats["q99"], dtype=np.float32)
    mask = np.asarray(stats.get("mask", np.ones_like(q01, dtype=bool)), dtype=bool)
    out = np.where(mask, 0.5 * (actions + 1.0) * (q99 - q01) + q01, actions)
    return out.astype(np.float32)


def identity_stats(action_dim: int = 7) -> dict[str, Any]:
    """Statistics that leave [-1, 1] actions unchanged (gripper unmasked as upstream)."""
    return {
        "action": {
            "q01": [-1.0] * action_dim,
            "q99": [1.0] * action_dim,
            "mask": [True] * (action_dim - 1) + [False],
        }
    }

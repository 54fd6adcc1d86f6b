"""vla-prune: fast Vision-Language-Action policies without retraining."""

from __future__ import annotations

from pathlib import Path

import torch

from .config import PruneConfig
from .models.checkpoints import CheckpointError
from .policy import Policy, StepResult
from .preprocess import InputError

__all__ = [
    "CheckpointError",
    "InputError",
    "Policy",
    "PruneConfig",
    "StepResult",
    "build_policy",
    "load_policy",
]
__version__ = "0.1.0"


def build_policy(
    name: str,
    seed: int = 0,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> Policy:
    """A policy from a named preset with random weights (seeded).

    Full-size presets (openvla-7b) go on the meta device unless a device is given: shapes,
    parameter counts and FLOPs without allocating 30 GB.
    """
    from .models.openvla import identity_stats
    from .models.presets import FULL_SIZE, get_preset
    from .models.prismatic import OpenVLAModel
    from .models.tokenizer import build_word_tokenizer

    cfg = get_preset(name)
    if device is None:
        device = "meta" if name in FULL_SIZE else "cpu"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device):
            model = OpenVLAModel(cfg)
    if dtype is not None:
        model.to(dtype=dtype)
    tokenizer = build_word_tokenizer(cfg.tokenizer_vocab_size, cfg.n_action_bins)
    return Policy(model, tokenizer, {"identity": identity_stats(cfg.action_dim)})


def load_policy(
    path: str | Path,
    unnorm_key: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> Policy:
    """Load a local checkpoint directory (OpenVLA Hugging Face layout). Nothing is downloaded."""
    from .models.checkpoints import load_openvla

    return load_openvla(path, unnorm_key=unnorm_key, device=device, dtype=dtype)

"""vla-prune: fast Vision-Language-Action policies without retraining."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

from .config import EngineConfig, PruneConfig
from .models.checkpoints import CheckpointError
from .policy import Policy, StepResult
from .preprocess import InputError

__all__ = [
    "CheckpointError",
    "EngineConfig",
    "InputError",
    "Policy",
    "PruneConfig",
    "StepResult",
    "build_policy",
    "load_policy",
    "policy_from",
    "shipped_checkpoint",
]
__version__ = "0.1.0"


# Trained checkpoints shipped as package data (e.g. "embedded-openvla"): found through the
# installed package, so they work from a wheel as well as from an editable checkout.
CHECKPOINTS = Path(str(resources.files(__name__) / "checkpoints"))


def shipped_checkpoint(name: str) -> Path | None:
    """The folder of a checkpoint shipped with the package, or None if `name` is not one."""
    folder = CHECKPOINTS / name
    return folder if (folder / "config.json").is_file() else None


def policy_from(
    name_or_path: str | Path,
    unnorm_key: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    seed: int = 0,
) -> Policy:
    """A checkpoint directory, a shipped checkpoint name, or a preset name."""
    if Path(name_or_path).is_dir():
        return load_policy(name_or_path, unnorm_key, device=device or "cpu", dtype=dtype)
    policy = build_policy(str(name_or_path), seed=seed, device=device, dtype=dtype)
    if unnorm_key is not None:
        policy.configure(unnorm_key=unnorm_key)
    return policy


def build_policy(
    name: str,
    seed: int = 0,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> Policy:
    """A policy from a named preset with random weights (seeded), or a shipped checkpoint.

    Full-size presets (openvla-7b) go on the meta device unless a device is given: shapes,
    parameter counts and FLOPs without allocating 30 GB.
    """
    from .models.cogact import CogACTConfig, CogACTModel
    from .models.openvla import identity_stats
    from .models.presets import FULL_SIZE, PRESETS, get_preset
    from .models.prismatic import OpenVLAModel
    from .models.tokenizer import build_word_tokenizer

    shipped = shipped_checkpoint(name)
    if name not in PRESETS and shipped is not None:
        return load_policy(shipped, device=device or "cpu", dtype=dtype)
    cfg = get_preset(name)
    if device is None:
        device = "meta" if name in FULL_SIZE else "cpu"
    default_dtype = torch.get_default_dtype()
    try:  # allocate in the target dtype: a 7 B model in fp32 first would need 30 GB
        torch.set_default_dtype(dtype or default_dtype)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            with torch.device(device):
                model = (CogACTModel if isinstance(cfg, CogACTConfig) else OpenVLAModel)(cfg)
    finally:
        torch.set_default_dtype(default_dtype)
    if dtype is not None:
        model.to(dtype=dtype)  # anything created in fp32 regardless (e.g. integer-sized buffers)
    tokenizer = build_word_tokenizer(cfg.tokenizer_vocab_size, cfg.n_action_bins)
    stats = {"identity": identity_stats(cfg.action_dim)}
    if isinstance(cfg, CogACTConfig):
        from .cogact import CogACTPolicy

        return CogACTPolicy(model, tokenizer, stats)
    return Policy(model, tokenizer, stats)


def load_policy(
    path: str | Path,
    unnorm_key: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> Policy:
    """Load a local checkpoint directory (OpenVLA's Hugging Face layout, or CogACT's:
    checkpoints/*.pt + config.json — or that .pt itself). Nothing is downloaded."""
    from .models.checkpoints import load_openvla
    from .models.cogact_checkpoints import is_cogact_dir, load_cogact

    # The loaders return the parts; the Policy classes are built here (models/ imports no policy).
    if is_cogact_dir(path):
        from .cogact import CogACTPolicy

        parts = load_cogact(path, unnorm_key=unnorm_key, device=device, dtype=dtype)
        return CogACTPolicy(parts.model, parts.tokenizer, parts.norm_stats, parts.unnorm_key)
    parts = load_openvla(path, unnorm_key=unnorm_key, device=device, dtype=dtype)
    return Policy(parts.model, parts.tokenizer, parts.norm_stats, unnorm_key=parts.unnorm_key)

"""Pieces every command shares: loading a policy, pruning flags, JSON output."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_policy_arg(name: str, device: str, dtype: str, seed: int):
    import vla_prune

    return vla_prune.policy_from(name, device=device, dtype=DTYPES[dtype], seed=seed)


def prune_config_from(args):
    from vla_prune import PruneConfig
    from vla_prune.config import load_yaml

    if args.prune_config:
        return load_yaml(PruneConfig, args.prune_config)
    if args.pruner == "none":
        return PruneConfig()
    return PruneConfig(method=args.pruner, keep_ratio=args.keep, layer=args.layer)


def write_json(path: str, data: dict) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2, default=str))
    print(f"wrote {out}")


def require_sim(command: str) -> bool:
    import os

    os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering; before mujoco is imported
    logging.getLogger("OpenGL").setLevel(logging.WARNING)  # PyOpenGL's INFO chatter
    try:
        import gymnasium  # noqa: F401
        import mujoco  # noqa: F401
    except ImportError as e:
        print(
            f'vla-prune {command} needs the simulation extra: pip install -e ".[sim]" ({e})',
            file=sys.stderr,
        )
        return False
    return True

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


def run_spec_from(args):
    """The run spec of --run, else of --pruner/--keep (the same grammar: --keep 64 is a count)."""
    from vla_prune.config import PruneConfig, load_yaml
    from vla_prune.runspec import RunSpec, parse_run_spec

    if getattr(args, "prune_config", None):
        return RunSpec(label="prune-config", prune=load_yaml(PruneConfig, args.prune_config))
    if getattr(args, "run", None):
        return parse_run_spec(args.run)
    if args.pruner in ("none", "dense"):
        return parse_run_spec("dense")
    return parse_run_spec(f"{args.pruner}@{args.keep}")


def engine_from(args):
    """The run spec's +compile / +bf16 / +int8, else --compile / --weights."""
    from vla_prune import EngineConfig

    default = EngineConfig(
        compile=bool(getattr(args, "compile", False)), weights=getattr(args, "weights", "fp32")
    )
    if not hasattr(args, "pruner"):  # bench: each of its --configs names its own
        return default
    return run_spec_from(args).engine(default)


def prune_config_from(args):
    spec = run_spec_from(args)
    if args.layer is not None:
        import dataclasses

        return dataclasses.replace(spec.prune, layer=args.layer)
    return spec.prune


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

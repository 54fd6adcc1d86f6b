"""Grounding probe: does a training run find the named target in scenes it never saw?

Reads a run's `train_state.pt` (which, unlike the exported policy, keeps the auxiliary
geometry head of `--aux-weight`), shows the first frame of each episode in a dataset, and
reads off where the head thinks the episode's target is (`sim.dataset.aux_targets`' source
x, y). It counts the episode as grounded when the nearest candidate (button, or object) to
that prediction is the real target; with 3 objects, chance is 1/3.

Run it on held-out scenes (seeds no training set uses) and on training scenes: a large gap
is a model that memorized layouts instead of learning to read the instruction.

    python -m sim.demos --out data/heldout --episodes-per-task 40 --seed-start 1900000
    python -m sim.probe --state runs/e112/train_state.pt --data data/heldout
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence

import numpy as np
import torch

import vla_prune
from sim.dataset import AUX_DIM, AUX_SCALE, iter_episodes
from sim.envs.embedded import EmbeddedEnv
from sim.train import TrainConfig, last_hidden
from vla_prune.preprocess import image_to_pixels

log = logging.getLogger(__name__)


@torch.no_grad()
def probe(state_path: str, data: str, per_family: int = 40) -> dict[str, dict[str, float]]:
    """Per family: fraction of episodes whose predicted target is the real one, and the
    median prediction error in metres."""
    state = torch.load(state_path, weights_only=True)
    if not state.get("aux_head"):
        raise ValueError(f"{state_path} has no auxiliary head (trained without --aux-weight)")
    cfg = TrainConfig(**state["config"])
    policy = vla_prune.build_policy(cfg.preset, seed=cfg.seed)
    policy.model.load_state_dict(state["model"])
    policy.model.eval()
    head = torch.nn.Linear(policy.config.llm_dim, AUX_DIM)
    head.load_state_dict(state["aux_head"])
    pc = policy.config
    envs: dict[str, EmbeddedEnv] = {}
    hits: dict[str, list[bool]] = {}
    errors: dict[str, list[float]] = {}
    for ep in iter_episodes(data):
        if len(hits.setdefault(ep.family, [])) >= per_family:
            continue
        env = envs.setdefault(ep.family, EmbeddedEnv(ep.family, image_size=16))
        env.reset(seed=ep.seed)
        task = env.task_instance
        if task.target_object is None:  # press: the target is a button
            target = task.fixtures[task.target_fixture].xy
            candidates = [f.xy for f in task.fixtures]
        else:
            target = task.objects[task.target_object].xy
            candidates = [o.xy for o in task.objects]
        pixels = image_to_pixels(ep.images[0], pc.image_size, pc.image_means, pc.image_stds)
        hidden, lengths = last_hidden(policy, pixels, [policy.token_ids(ep.instruction)])
        predicted = head(hidden[0, lengths[0] - 1]).numpy()[4:6] / AUX_SCALE
        dist = [float(np.linalg.norm(predicted - np.asarray(c))) for c in candidates]
        hits[ep.family].append(bool(np.allclose(candidates[int(np.argmin(dist))], target)))
        errors.setdefault(ep.family, []).append(float(np.linalg.norm(predicted - target)))
    for env in envs.values():
        env.close()
    return {
        f: {
            "episodes": len(hits[f]),
            "grounded": round(float(np.mean(hits[f])), 3),
            "median_error_m": round(float(np.median(errors[f])), 4),
        }
        for f in hits
    }


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--state", required=True, help="a run's train_state.pt")
    ap.add_argument("--data", required=True, help="dataset dir(s), a,b,...")
    ap.add_argument("--per-family", type=int, default=40)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(json.dumps(probe(args.state, args.data, args.per_family), indent=2))


if __name__ == "__main__":
    main()

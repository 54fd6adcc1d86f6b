"""How forgiving is each expert style of an imprecise position estimate?

A cloned policy never knows where an object is to the millimetre; an expert whose behaviour
hinges on millimetres (descend only within 5 mm) teaches a decision the policy cannot make.
This diagnostic runs each expert style with its object positions seen through noise: a fixed
per-episode xy bias per object (a policy's systematic error) plus fresh per-step noise, and
reports success. The env itself is untouched; only what the expert reads is perturbed.

    python -m sim.expert_noise --episodes 20 --tasks push,pick_place,stack
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

import numpy as np

from sim.envs.embedded import EmbeddedEnv
from sim.experts import STYLES, Expert

logger = logging.getLogger(__name__)


class NoisyView:
    """`env` as an expert sees it, with object xy positions perturbed."""

    def __init__(self, env: EmbeddedEnv, rng: np.random.Generator, bias_m: float, step_m: float):
        self._env, self._rng, self._step_m = env, rng, step_m
        self._bias = [rng.normal(0.0, bias_m, 2) for _ in range(env.family.n_objects)]

    def __getattr__(self, name: str):
        return getattr(self._env, name)

    def object_pos(self, i: int) -> np.ndarray:
        pos = self._env.object_pos(i).copy()
        pos[:2] += self._bias[i] + self._rng.normal(0.0, self._step_m, 2)
        return pos


def success_rate(
    task: str, style: str, bias_m: float, step_m: float, seeds: Sequence[int]
) -> float:
    """Fraction of `seeds` the `style` expert solves when it sees positions through noise."""
    env = EmbeddedEnv(task, image_size=32)  # the image is not used
    wins = 0
    try:
        for seed in seeds:
            env.reset(seed=seed)
            view = NoisyView(env, np.random.default_rng(seed), bias_m, step_m)
            expert = Expert(env, style=style, view=view)
            info = {"success": False}
            for _ in range(env.max_episode_steps):
                _, _, terminated, truncated, info = env.step(expert())
                if terminated or truncated:
                    break
            wins += bool(info["success"])
    finally:
        env.close()
    return wins / max(1, len(seeds))


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--episodes", type=int, default=20)
    ap.add_argument("--tasks", default="push,pick_place,stack")
    ap.add_argument("--seed-start", type=int, default=0)
    ap.add_argument(
        "--noise", default="0:0,0.005:0.003,0.01:0.005", help="bias_m:step_m pairs, comma-separated"
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    levels = [tuple(float(x) for x in pair.split(":")) for pair in args.noise.split(",")]
    seeds = range(args.seed_start, args.seed_start + args.episodes)
    print("| task | bias (m) | per-step (m) | " + " | ".join(STYLES) + " |")
    print("|---|---|---|" + "---|" * len(STYLES))
    for task in args.tasks.split(","):
        for bias_m, step_m in levels:
            rates = [success_rate(task, s, bias_m, step_m, seeds) for s in STYLES]
            cells = " | ".join(f"{r * len(seeds):.0f}/{len(seeds)}" for r in rates)
            print(f"| {task} | {bias_m} | {step_m} | {cells} |", flush=True)


if __name__ == "__main__":
    main()

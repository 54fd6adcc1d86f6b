"""DAgger for the embedded suite: the policy drives, the scripted expert labels.

Behaviour cloning only sees the states the expert visits; a policy that drifts a few
centimetres off them meets states it was never taught to recover from. DAgger (Ross et al.,
2011) rolls the *policy* out, asks the expert what it would have done in every state the
policy reached, and adds those (image, expert action) pairs to the training set. The experts
here are closed-loop and stateless (they re-plan from the env's privileged state every step),
so the expert's label at any state is well defined.

Each step executes the expert's action with probability `beta`, else the policy's (the
classic mixture policy; beta=0 is pure DAgger). Episodes are written in the demo dataset
format (`sim.demos`), failures included: the labels are the expert's even when the episode
fails. Rollouts run `batch` envs in lockstep through one batched policy call.

CLI::

    python -m sim.dagger --policy vla_prune/checkpoints/embedded-openvla --out data/dagger1 \\
        --episodes-per-task 100 --seed-start 3000000 --beta 0.5

Train on the union with ``python -m sim.train --data data/demos,data/dagger1 ...``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from sim.demos import MANIFEST, DemoEpisode, check_seeds_and_tasks, prepare_out_dir, store_episode
from sim.envs.embedded import TASKS, EmbeddedConfig, EmbeddedEnv
from sim.experts import STYLES, expert_for

logger = logging.getLogger(__name__)

DAGGER_SEED_START = 3_000_000  # demos use 1_000_000+, evaluation 0..9999


@dataclass
class DaggerConfig:
    policy: str
    out_dir: Path
    tasks: tuple[str, ...] = TASKS
    episodes_per_task: int = 100
    seed_start: int = DAGGER_SEED_START
    beta: float = 0.5  # probability of executing the expert's action at a step
    batch: int = 16  # envs rolled out in lockstep
    threads: int = 1
    seed: int = 0
    expert_style: str = "smooth"  # sim.experts.STYLES
    overwrite: bool = False
    env: EmbeddedConfig = field(default_factory=EmbeddedConfig)


def rollout_batch(
    policy,
    envs: Sequence[EmbeddedEnv],
    seeds: Sequence[int],
    beta: float,
    rng,
    expert_style: str = "smooth",
) -> list[DemoEpisode]:
    """Roll out len(envs) episodes together; every stored action is the expert's label."""
    obs = [env.reset(seed=int(s))[0] for env, s in zip(envs, seeds)]
    experts = [expert_for(env, style=expert_style) for env in envs]
    policy.reset()
    buf = [{"images": [], "states": [], "actions": []} for _ in envs]
    done = [False] * len(envs)
    success = [False] * len(envs)
    while not all(done):
        # Finished envs keep feeding their last frame so every slot keeps its place.
        results = policy.step_batch([o["image"] for o in obs], [o["instruction"] for o in obs])
        for i, env in enumerate(envs):
            if done[i]:
                continue
            label = experts[i](obs[i])
            buf[i]["images"].append(obs[i]["image"])
            buf[i]["states"].append(obs[i]["state"])
            buf[i]["actions"].append(label)
            act = label if rng.random() < beta else results[i].actions[0]
            obs[i], _, terminated, truncated, info = env.step(act)
            if terminated or truncated:
                done[i], success[i] = True, bool(info["success"])
    return [
        DemoEpisode(
            images=np.stack(b["images"]),
            actions=np.stack(b["actions"]).astype(np.float32),
            states=np.stack(b["states"]).astype(np.float32),
            instruction=env.instruction,
            family=env.task,
            seed=int(s),
            success=ok,
        )
        for b, env, s, ok in zip(buf, envs, seeds, success)
    ]


def collect(cfg: DaggerConfig) -> list[dict]:
    """Write cfg.episodes_per_task DAgger episodes per task; returns the manifest records."""
    import torch

    import vla_prune

    check_seeds_and_tasks(cfg.seed_start, cfg.tasks)
    if not 0.0 <= cfg.beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {cfg.beta}")
    if cfg.batch < 1 or cfg.episodes_per_task < 1:
        raise ValueError("batch and episodes_per_task must be >= 1")
    torch.set_num_threads(cfg.threads)
    policy = vla_prune.policy_from(cfg.policy, seed=cfg.seed)
    if "embedded" in policy.norm_stats:
        policy.configure(unnorm_key="embedded")
    out = prepare_out_dir(cfg.out_dir, cfg.overwrite)
    rng = np.random.default_rng(cfg.seed)
    records: list[dict] = []
    with open(out / MANIFEST, "w") as manifest:
        for task in cfg.tasks:
            envs = [EmbeddedEnv(task, cfg.env) for _ in range(cfg.batch)]
            t0, wins = time.perf_counter(), 0
            try:
                for first in range(0, cfg.episodes_per_task, cfg.batch):
                    n = min(cfg.batch, cfg.episodes_per_task - first)
                    seeds = [cfg.seed_start + first + j for j in range(n)]
                    for ep in rollout_batch(
                        policy, envs[:n], seeds, cfg.beta, rng, cfg.expert_style
                    ):
                        tag = {"source": "dagger", "beta": cfg.beta, "policy": str(cfg.policy)}
                        records.append(store_episode(out, manifest, ep, **tag))
                        wins += ep.success
                    done = first + n
                    rate = done / (time.perf_counter() - t0)
                    logger.info(
                        "%s: %d/%d episodes, %d successes (%.2f episodes/s)",
                        task, done, cfg.episodes_per_task, wins, rate,
                    )  # fmt: skip
            finally:
                for env in envs:
                    env.close()
    return records


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="DAgger rollouts: policy drives, expert labels.")
    ap.add_argument("--policy", required=True, help="checkpoint directory, name or preset")
    ap.add_argument("--out", type=Path, required=True, help="dataset directory")
    ap.add_argument("--episodes-per-task", type=int, default=100)
    ap.add_argument("--tasks", default=",".join(TASKS), help="comma-separated task names")
    ap.add_argument("--seed-start", type=int, default=DAGGER_SEED_START)
    ap.add_argument("--beta", type=float, default=0.5, help="P(execute the expert's action)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--expert", choices=STYLES, default="smooth", help="expert style")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg = DaggerConfig(
        policy=args.policy,
        out_dir=args.out,
        tasks=tuple(t.strip() for t in args.tasks.split(",") if t.strip()),
        episodes_per_task=args.episodes_per_task,
        seed_start=args.seed_start,
        beta=args.beta,
        batch=args.batch,
        threads=args.threads,
        seed=args.seed,
        expert_style=args.expert,
        overwrite=args.overwrite,
    )
    t0 = time.perf_counter()
    records = collect(cfg)
    steps = sum(r["length"] for r in records)
    wins = sum(r["success"] for r in records)
    print(
        f"wrote {len(records)} DAgger episodes ({steps} steps, {wins} successes) to "
        f"{cfg.out_dir} in {time.perf_counter() - t0:.1f}s; "
        f"config: {json.dumps(asdict(cfg), default=str)}"
    )


if __name__ == "__main__":
    main()

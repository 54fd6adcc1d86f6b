"""Simulation commands: eval (success rate + latency) and viz (kept tokens per step)."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

from .common import load_policy_arg, prune_config_from, require_sim

DEFAULT_EVAL_CONFIG = "configs/eval/embedded.yaml"


def parse_eval_runs(text: str):
    """--configs: specs like dense,vla-pruner@0.25,fastv@64 or a YAML path (argparse type)."""
    from sim.eval.config import parse_runs

    try:
        return parse_runs(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _eval_config_path(path: str | None) -> Path:
    if path is not None:
        return Path(path)
    for root in (Path.cwd(), Path(__file__).resolve().parents[1]):  # cwd, then the checkout
        if (root / DEFAULT_EVAL_CONFIG).is_file():
            return root / DEFAULT_EVAL_CONFIG
    raise ValueError(f"no {DEFAULT_EVAL_CONFIG} here; pass --eval-config FILE")


def cmd_viz(args) -> int:
    """One episode; a PNG per step with the kept tokens over the camera image, and all of
    them as OUT/episode.gif (the control rate's frame time)."""
    if not require_sim("viz"):
        return 2
    from sim.envs import make_env
    from sim.eval.runner import save_gif, video_fps
    from vla_prune.viz import overlay

    policy = load_policy_arg(args.policy, "cpu", "float32", args.seed)
    prune = prune_config_from(args)
    policy.configure(prune=prune)
    if args.unnorm_key:
        policy.configure(unnorm_key=args.unnorm_key)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = make_env(args.suite, args.task)
    try:
        obs, _ = env.reset(seed=args.seed)
        policy.reset()
        n = policy.config.num_patches
        side = int(round(n**0.5))
        frames = []
        for t in range(args.steps):
            r = policy.step(obs["image"], obs["instruction"])
            title = (
                f"step {t} | {prune.method} kept {r.kept_visual_tokens}/{n} | {obs['instruction']}"
            )
            frame = overlay(obs["image"], r.kept_indices, r.origin, (side, side), title=title)
            frame.save(out / f"step_{t:03d}.png")
            frames.append(frame)
            obs, _, terminated, truncated, info = env.step(r.actions[0])
            if terminated or truncated:
                break
        save_gif(frames, out / "episode.gif", video_fps(env))
    finally:
        env.close()
    print(
        f"wrote {t + 1} frames and episode.gif to {out} (success: {bool(info.get('success'))})"
    )
    return 0


def cmd_eval(args) -> int:
    if not require_sim("eval"):
        return 2
    from sim.eval import format_table, load_eval_config, run_eval

    cfg = load_eval_config(
        _eval_config_path(args.eval_config),
        suite=args.suite,
        tasks=args.tasks,  # "press,push" or "all"
        episodes=args.episodes,
        seed=args.seed,
        policy=args.policy,
        unnorm_key=args.unnorm_key,
        runs=args.configs,
        out=args.out,
        max_steps=args.max_steps,
        video=args.video or None,
        threads=args.threads,
        workers=args.workers,
        warmup=args.warmup,
        device=args.device,
        dtype=args.dtype,
        compile=args.compile,
        weights=args.weights,
        backend=args.backend,
        ray_address=args.ray_address,
        envs_per_worker=args.envs_per_worker,
        gpus_per_worker=args.gpus_per_worker,
        cpus_per_worker=args.cpus_per_worker,
        max_retries=args.max_retries,
    )
    workers = min(cfg.workers, len(cfg.runs), os.cpu_count() or 1)  # local: never more than cores
    if cfg.backend == "ray":  # workers are actors on the cluster's resources
        if importlib.util.find_spec("ray") is None:
            print(
                "vla-prune eval --backend ray needs Ray: pip install -e '.[ray]'",
                file=sys.stderr,
            )
            return 2
        from sim.eval.ray_backend import run_eval_ray

        summary = run_eval_ray(cfg, progress=not args.quiet)
    elif workers > 1:
        from sim.eval.parallel import run_eval_parallel

        summary = run_eval_parallel(cfg, workers, progress=not args.quiet)
    else:
        summary = run_eval(cfg, progress=not args.quiet)
    print(format_table(summary))
    print(f"wrote {cfg.out}/episodes.jsonl and summary.md, summary.json, summary.png")
    return 0

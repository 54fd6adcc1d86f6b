"""The eval loop: every configuration runs the same (task, seed) episodes, one JSON line each.

Order: for each task, for each seed, every configuration in turn. Interleaving keeps the
comparison paired even if a run is cut short, and spreads machine-load drift over all
configurations alike. Only `policy.step` is timed (its own per-stage timer); the env's physics
and rendering run in the same process but outside the timed region.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from sim.eval.config import EvalConfig, RunConfig, check_resumable, prune_dict
from sim.eval.records import (
    CONFIG_FILE,
    EPISODES_FILE,
    EpisodeWriter,
    episode_key,
    read_episodes,
    write_json,
)
from sim.eval.stats import latency
from sim.eval.summary import report
from vla_prune.caching.dit_cache import CacheConfig

# Headless rendering unless the user chose a GL backend; must precede the first mujoco import.
os.environ.setdefault("MUJOCO_GL", "egl")

log = logging.getLogger(__name__)


def load_eval_policy(
    name: str,
    unnorm_key: str | None = None,
    suite: str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
):
    """A checkpoint directory (load_policy) or a preset name (build_policy, random weights).

    Without `unnorm_key`, a checkpoint's statistics named after the suite are used if present
    (our embedded checkpoint has "embedded"); a single-statistics checkpoint needs no key.
    """
    import torch

    import vla_prune

    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    if check_policy_name(name) == "preset":
        unnorm_key = None  # random presets carry identity statistics only
    policy = vla_prune.policy_from(name, unnorm_key, device=device, dtype=torch_dtype)
    if unnorm_key is None and suite in policy.norm_stats:
        policy.configure(unnorm_key=suite)
    return policy


def check_policy_name(name: str) -> str:
    """ "checkpoint" or "preset"; ValueError (cheap, before any loading) if it is neither."""
    from vla_prune import shipped_checkpoint
    from vla_prune.models.presets import PRESETS

    if Path(name).is_dir() or shipped_checkpoint(name) is not None:
        return "checkpoint"
    if name in PRESETS:
        return "preset"
    raise ValueError(
        f"policy {name!r} is neither a checkpoint directory (no {Path(name).resolve()}) nor a "
        f"preset {sorted(PRESETS)}; --policy tiny-openvla runs random weights as a smoke test"
    )


class Progress:
    """A one-line progress bar on stderr (a line per update when stderr is not a terminal)."""

    def __init__(self, total: int, done: int = 0, enabled: bool = True, width: int = 24):
        self.total, self.done, self.width = total, done, width
        self.enabled = enabled and total > 0
        self.tty = sys.stderr.isatty()
        self._t0, self._start = time.perf_counter(), done

    def update(self, text: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        frac = self.done / max(self.total, 1)
        bar = "#" * round(frac * self.width)
        rate = (self.done - self._start) / max(time.perf_counter() - self._t0, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        line = (
            f"eval [{bar:<{self.width}}] {self.done}/{self.total} {100 * frac:3.0f}% "
            f"| {text} | {60 * rate:.1f} ep/min, eta {time.strftime('%H:%M:%S', time.gmtime(eta))}"
        )
        sys.stderr.write(f"\r\033[K{line}" if self.tty else line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")


def _safe(name: str) -> str:
    return re.sub(r"[^\w.@=-]+", "_", name)


def save_video(frames: list[np.ndarray], path: Path, fps: float = 10.0) -> Path:
    """MP4 when imageio (+ffmpeg) is installed, else an animated GIF via PIL."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import imageio.v2 as imageio

        mp4 = path.with_suffix(".mp4")
        imageio.mimwrite(mp4, frames, fps=fps)
        return mp4
    except Exception:  # noqa: BLE001 - any imageio/ffmpeg problem: fall back to GIF
        from PIL import Image

        return save_gif([Image.fromarray(f) for f in frames], path.with_suffix(".gif"), fps)


def save_gif(images: list, path: Path, fps: float = 10.0) -> Path:
    """PIL images as an animated GIF at `fps` frames a second, looping."""
    duration = round(1000 / fps)
    images[0].save(path, save_all=True, append_images=images[1:], duration=duration, loop=0)
    return path


def obs_hash(obs: dict[str, Any]) -> str:
    h = hashlib.sha1(np.ascontiguousarray(obs["image"]).tobytes())
    h.update(str(obs["instruction"]).encode())
    return h.hexdigest()[:16]


def _median_p99(values: list[float]) -> dict[str, float]:
    stats = latency(values)
    return {"median": round(stats["median"], 3), "p99": round(stats["p99"], 3)}


def run_engine(run: RunConfig, cfg: EvalConfig):
    """The configuration's EngineConfig: its own +compile / +bf16 / +int8, else the eval's."""
    from vla_prune import EngineConfig

    return EngineConfig(
        compile=cfg.compile if run.compile is None else run.compile,
        weights=cfg.weights if run.weights is None else run.weights,
    )


def configure_run(policy, run: RunConfig, engine=None):
    """Apply a configuration's pruning, layer skipping, engine and (CogACT) DiT caching; a
    policy is shared by the configurations that name it, so every setting is set, none
    inherited."""
    kw: dict[str, Any] = {"prune": run.prune, "skip_layers": run.skip_layers}
    if engine is not None:
        kw["engine"] = engine
    head = policy.head
    if head.cache_config is not None:  # a DiT head: set its cache either way (shared policy)
        interval = run.cache or head.cache_config.interval
        kw["cache"] = CacheConfig(interval=interval, enabled=run.cache is not None)
    if head.sampling is not None:
        kw["sampling"] = dataclasses.replace(head.sampling, ensemble=run.ensemble)
    if run.cache is not None and head.cache_config is None:
        raise ValueError(f"configuration {run.label!r}: cache{run.cache} needs a DiT head (CogACT)")
    if run.ensemble and head.sampling is None:
        raise ValueError(f"configuration {run.label!r}: ensemble needs a DiT head (CogACT)")
    return policy.configure(**kw)


class Rollout:
    """One episode on one env, step by step: the bookkeeping every backend shares (local, Ray,
    batched), so an episode's record does not depend on which of them ran it.

    blind: the policy gets a constant gray frame (the blind honesty control)."""

    def __init__(self, env, seed: int, max_steps: int, video: bool = False, blind: bool = False):
        self.obs, self.info = env.reset(seed=seed)
        self.env, self.max_steps, self.video, self.blind = env, max_steps, video, blind
        self.first, self.instruction = obs_hash(self.obs), self.obs["instruction"]
        self.frames = [self.obs["image"]] if video else []
        self.timings: list[dict[str, float]] = []
        self.kept: list[int] = []
        self.reused: list[float] = []  # VLA-Cache: fraction of visual rows reused per step
        self.actions = hashlib.sha1()  # every executed action, float32 bytes in order
        self.steps, self.done = 0, False
        self._t0 = time.perf_counter()

    def inputs(self) -> tuple[np.ndarray, str]:
        """What the policy sees now: (image, instruction)."""
        image = self.obs["image"]
        return (np.full_like(image, 128) if self.blind else image), self.obs["instruction"]

    def advance(self, result) -> bool:
        """Execute a policy answer (the whole chunk; OpenVLA: one action); True once done."""
        self.timings.append(result.timings_ms)
        self.kept.append(result.kept_visual_tokens)
        if "reused_fraction" in result.extra:
            self.reused.append(float(result.extra["reused_fraction"]))
        for action in result.actions:
            self.actions.update(np.ascontiguousarray(action, dtype=np.float32).tobytes())
            self.obs, _, terminated, truncated, self.info = self.env.step(action)
            self.steps += 1
            if self.video:
                self.frames.append(self.obs["image"])
            if terminated or truncated or self.steps >= self.max_steps:
                self.done = True
                break
        return self.done

    def finish(self) -> dict[str, Any]:
        """The record fields measured here (+ frames)."""
        stages = list(dict.fromkeys(s for t in self.timings for s in t))
        step_ms = {s: [round(t[s], 3) for t in self.timings if s in t] for s in stages}
        return {
            "success": bool(self.info.get("success", False)),
            "steps": self.steps,
            "policy_steps": len(self.timings),
            "instruction": self.instruction,
            "obs_hash": self.first,
            "actions_hash": self.actions.hexdigest()[:16],
            "kept_visual_tokens": float(np.mean(self.kept)),
            "reused_fraction": float(np.mean(self.reused)) if self.reused else None,
            "latency_ms": {s: _median_p99(x) for s, x in step_ms.items()},
            "step_ms": step_ms,
            "wall_s": round(time.perf_counter() - self._t0, 3),
            "frames": self.frames,
        }


def run_episode(
    env, policy, seed: int, max_steps: int, video: bool = False, blind: bool = False
) -> dict[str, Any]:
    """One episode from env.reset(seed); returns the record fields measured here (+ frames).

    blind: the policy gets a constant gray frame (the blind honesty control)."""
    rollout = Rollout(env, seed, max_steps, video, blind)
    policy.reset()
    while not rollout.advance(policy.step(*rollout.inputs())):
        pass
    return rollout.finish()


def run_wave(
    policy,
    envs: list,
    seeds: list[int],
    limits: list[int],
    video: bool = False,
    blind: bool = False,
) -> Iterator[tuple[int, dict[str, Any]]]:
    """len(envs) episodes in lockstep, one `policy.step_batch` call per control step; yields
    (slot, run_episode's fields) as each episode ends.

    The episodes start together (a wave) and a slot whose episode ended sits out until the last
    one ends: the engine prunes every slot of a call to one budget, so a fresh episode (in
    VLA-Pruner's dense warm-up) cannot join slots that are already pruning. Each slot starts
    from the state a lone episode starts from (`reset_slot`), so its answers are run_episode's.
    """
    rollouts = [Rollout(env, s, n, video, blind) for env, s, n in zip(envs, seeds, limits)]
    for i in range(len(rollouts)):
        reset_slot(policy, i)
    while live := [i for i, r in enumerate(rollouts) if not r.done]:
        # Slots are positional: call with every slot up to the last live one; a finished slot
        # below it repeats its last observation and its answer is dropped.
        inputs = [r.inputs() for r in rollouts[: live[-1] + 1]]
        results = policy.step_batch([x[0] for x in inputs], [x[1] for x in inputs])
        for i in live:
            if rollouts[i].advance(results[i]):
                yield i, rollouts[i].finish()


# Policy attributes holding one entry per batch slot (vla_prune/policy.py, vla_prune/cogact.py).
def reset_slot(policy, i: int) -> None:
    """New episode in batch slot i only, from the state a lone episode starts from (empty
    history, step 0, slot 0's random streams): Policy.reset_slot."""
    policy.reset_slot(i)


class EvalPolicies:
    """An eval's policies: each loaded once (per weight format) and configured per
    configuration, with `cfg.warmup` untimed steps before a configuration's first episode."""

    def __init__(self, cfg: EvalConfig):
        self.cfg = cfg
        self._loaded: dict[tuple[str, str], Any] = {}
        self._warm: set[str] = set()

    def configured(self, run: RunConfig, env, seed: int):
        cfg = self.cfg
        name = run.policy or cfg.policy
        engine = run_engine(run, cfg)
        key = (name, engine.weights)  # converted weights don't go back: one policy per format
        if key not in self._loaded:
            self._loaded[key] = load_eval_policy(
                name, cfg.unnorm_key, cfg.suite, device=cfg.device, dtype=cfg.dtype
            )
        policy = configure_run(self._loaded[key], run, engine)
        if run.label not in self._warm:
            # Untimed steps on the episode's own first observation: lazy initialisation and
            # allocator warm-up would otherwise land in whichever configuration runs first.
            obs, _ = env.reset(seed=seed)
            for _ in range(cfg.warmup):
                policy.step(obs["image"], obs["instruction"])
            self._warm.add(run.label)
        return policy


def env_kwargs(cfg: EvalConfig) -> dict[str, Any]:
    kw = dict(cfg.env)
    if cfg.max_steps is not None:
        kw["max_steps"] = cfg.max_steps  # suites take max_steps to move their own limit
    return kw


def video_fps(env) -> float:
    return getattr(getattr(env, "config", None), "control_hz", 10.0)


def video_stem(run: RunConfig, task: str, seed: int) -> Path:
    """Where an episode's video goes, relative to OUT (the suffix is the encoder's)."""
    return Path("videos") / _safe(run.label) / f"{task}_{seed}"


def episode_record(
    cfg: EvalConfig, run: RunConfig, task: str, seed: int, ep: dict[str, Any], video: str | None
) -> dict[str, Any]:
    """One episodes.jsonl line from run_episode's fields (without frames)."""
    return {
        "label": run.label,
        "suite": cfg.suite,
        "task": task,
        "seed": seed,
        "episode": seed - cfg.seed,
        **ep,
        "policy": run.policy or cfg.policy,
        "prune": prune_dict(run.prune),
        "cache": run.cache,
        "skip_layers": list(run.skip_layers),
        "ensemble": run.ensemble,
        **dataclasses.asdict(run_engine(run, cfg)),  # compile, weights
        "video": video,
    }


def _resolve(cfg: EvalConfig) -> EvalConfig:
    """Fill in the suite's tasks; check tasks, seeds and policies before anything is written."""
    from sim.envs import list_tasks
    from sim.envs.base import EVAL_SEEDS

    suite_tasks = list_tasks(cfg.suite)
    tasks = cfg.tasks or tuple(suite_tasks)
    unknown = [t for t in tasks if t not in suite_tasks]
    if unknown:
        raise ValueError(
            f"unknown tasks {unknown} for suite {cfg.suite!r}; choose from {suite_tasks}"
        )
    cfg = dataclasses.replace(cfg, tasks=tuple(tasks))
    if cfg.seeds[0] not in EVAL_SEEDS or cfg.seeds[-1] not in EVAL_SEEDS:
        raise ValueError(
            f"eval seeds {cfg.seeds[0]}..{cfg.seeds[-1]} leave EVAL_SEEDS {EVAL_SEEDS}: "
            "other seeds may be training scenes"
        )
    for run in cfg.runs:
        check_policy_name(run.policy or cfg.policy)
    return cfg


def _open_out(cfg: EvalConfig) -> tuple[Path, list[dict[str, Any]]]:
    """Check (resume) or create OUT/config.json; returns OUT and its finished episodes."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    new = cfg.to_dict()
    config_path, episodes_path = out / CONFIG_FILE, out / EPISODES_FILE
    if config_path.is_file():
        old = json.loads(config_path.read_text())
        check_resumable(old, new, out)
        # Keep configurations run earlier but not named now: their episodes stay in the file.
        names = {r["label"] for r in new["runs"]}
        new["runs"] = [r for r in old.get("runs", []) if r["label"] not in names] + new["runs"]
        new["episodes"] = max(new["episodes"], old.get("episodes", 0))
    elif episodes_path.exists() and episodes_path.stat().st_size:
        raise ValueError(f"{episodes_path} exists without {CONFIG_FILE}; cannot check it matches")
    records = read_episodes(episodes_path, repair=True)
    write_json(config_path, new)
    return out, records


def run_eval(
    cfg: EvalConfig,
    progress: bool = True,
    on_episode: Callable[[dict[str, Any]], None] | None = None,
    video_root: Path | None = None,
) -> dict[str, Any]:
    """Run (or resume) the evaluation; writes OUT/episodes.jsonl and OUT/summary.*.

    `on_episode(record)` is called after each record is on disk (hooks, tests). Returns the
    summary (sim.eval.stats.summarize_episodes) of every episode in OUT. Videos go to
    `video_root`/videos (default OUT; a parallel worker passes its parent's OUT) and records
    name them relative to that root.
    """
    import torch

    from sim.envs import make_env

    cfg = _resolve(cfg)
    out, records = _open_out(cfg)
    done = {episode_key(r) for r in records}
    todo = [
        (task, seed, run)
        for task in cfg.tasks
        for seed in cfg.seeds
        for run in cfg.runs
        if (run.label, task, seed) not in done
    ]
    total = len(cfg.tasks) * len(cfg.seeds) * len(cfg.runs)
    log.info("%s: %d episodes to run, %d already done", out, len(todo), total - len(todo))
    threads_before = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    policies = EvalPolicies(cfg)
    budgets = None
    if cfg.budget_ms > 0:
        from sim.eval.budget import BudgetRuns

        budgets = BudgetRuns(cfg, load_eval_policy, run_engine, run_episode)
    env_kw = env_kwargs(cfg)
    bar = Progress(total, total - len(todo), enabled=progress)
    env, env_task = None, None
    try:
        with EpisodeWriter(out / EPISODES_FILE) as writer:
            for task, seed, run in todo:
                if env_task != task:
                    if env is not None:
                        env.close()
                    env, env_task = make_env(cfg.suite, task, **env_kw), task
                limit = cfg.max_steps or env.max_episode_steps
                if budgets is not None:  # the latency controller picks each step's level
                    ep = budgets.run_episode(run, env, seed, limit, video=cfg.video)
                else:
                    policy = policies.configured(run, env, seed)
                    ep = run_episode(env, policy, seed, limit, video=cfg.video, blind=run.blind)
                frames = ep.pop("frames")
                video = None
                if frames:
                    root = Path(video_root) if video_root is not None else out
                    path = save_video(frames, root / video_stem(run, task, seed), video_fps(env))
                    video = str(path.relative_to(root))
                record = episode_record(cfg, run, task, seed, ep, video)
                writer.write(record)
                if on_episode is not None:
                    on_episode(record)
                mark = "ok" if record["success"] else "fail"
                bar.update(f"{run.label} {task} seed {seed} {mark} ({ep['steps']} steps)")
    finally:
        bar.close()
        if env is not None:
            env.close()
        torch.set_num_threads(threads_before)  # the caller's process setting, not ours to keep
    return report(out)

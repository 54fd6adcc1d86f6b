"""Demonstrations from the scripted experts, stored as one compressed .npz per episode.

Dataset layout::

    DIR/manifest.jsonl               one JSON object per stored episode, in generation order
    DIR/episodes/<task>_<seed>.npz   images uint8 [T,H,W,3], actions float32 [T,7],
                                     states float32 [T,4], instruction, family, seed, success
                                     (+ wrist_images uint8 [T,H,W,3] if recorded)

``images[t]`` / ``states[t]`` are the observation the expert acted on with ``actions[t]``; the
observation after the last action is not stored.

Seeds: demonstrations use seeds from ``DEMO_SEED_START`` (1_000_000) upwards, evaluation uses
``EVAL_SEEDS`` (0..9999), so no training scene is ever an evaluation scene. Each task uses the
consecutive seeds ``seed_start, seed_start + 1, ...`` until it has enough episodes.

CLI::

    python -m sim.demos --out data/demos --episodes-per-task 100 \\
        --tasks press,push,pick_place,stack --seed-start 1000000
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from sim.envs.base import DEMO_SEED_START, EVAL_SEEDS
from sim.envs.embedded import TASKS, EmbeddedConfig, EmbeddedEnv
from sim.experts import STYLES, expert_for

logger = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"
EPISODE_DIR = "episodes"
_ARRAY_KEYS = ("images", "actions", "states")


class DemoDatasetError(ValueError):
    """A demo dataset on disk is corrupt or inconsistent."""


@dataclass
class DemoConfig:
    out_dir: Path
    tasks: tuple[str, ...] = TASKS
    episodes_per_task: int = 50
    seed_start: int = DEMO_SEED_START
    noise_std: float = 0.0  # expert action noise (metres) for diversity; 0 = clean demos
    expert_style: str = "smooth"  # sim.experts.STYLES; "gated": the shipped policies' experts
    keep_failures: bool = False  # store unsuccessful episodes too (success=False)
    max_attempts_factor: float = 2.0  # per task, stop after factor * episodes_per_task tries
    overwrite: bool = False  # replace an existing dataset in out_dir
    env: EmbeddedConfig = field(default_factory=EmbeddedConfig)


@dataclass
class DemoEpisode:
    images: np.ndarray  # uint8 [T, H, W, 3]
    actions: np.ndarray  # float32 [T, 7]
    states: np.ndarray  # float32 [T, state_dim]
    instruction: str
    family: str
    seed: int
    success: bool
    wrist_images: np.ndarray | None = None  # uint8 [T, H, W, 3]
    path: Path | None = None

    def __len__(self) -> int:
        return len(self.actions)


def record_episode(
    env: EmbeddedEnv, seed: int, noise_std: float = 0.0, expert_style: str = "smooth"
) -> DemoEpisode:
    """Run the family's expert on `env` from `reset(seed)` until success or the step limit."""
    obs, _ = env.reset(seed=seed)
    expert = expert_for(env, noise_std=noise_std, seed=seed, style=expert_style)
    images, wrist, states, actions = [], [], [], []
    info: dict = {"success": False}
    while True:
        action = expert(obs)
        images.append(obs["image"])
        states.append(obs["state"])
        if "wrist_image" in obs:
            wrist.append(obs["wrist_image"])
        actions.append(action)
        obs, _, terminated, truncated, info = env.step(action)
        if terminated or truncated:
            break
    return DemoEpisode(
        images=np.stack(images),
        actions=np.stack(actions).astype(np.float32),
        states=np.stack(states).astype(np.float32),
        instruction=env.instruction,
        family=env.task,
        seed=seed,
        success=bool(info["success"]),
        wrist_images=np.stack(wrist) if wrist else None,
    )


def save_episode(episode: DemoEpisode, path: Path) -> None:
    """Write one episode atomically (a crash never leaves a half-written file behind)."""
    arrays = {
        "images": episode.images,
        "actions": episode.actions,
        "states": episode.states,
        "instruction": np.array(episode.instruction),
        "family": np.array(episode.family),
        "seed": np.array(episode.seed, dtype=np.int64),
        "success": np.array(episode.success),
    }
    if episode.wrist_images is not None:
        arrays["wrist_images"] = episode.wrist_images
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    os.replace(tmp, path)


def check_seeds_and_tasks(seed_start: int, tasks: Sequence[str]) -> None:
    """Training data never uses eval seeds, and only known task families."""
    if seed_start < EVAL_SEEDS.stop:
        raise ValueError(
            f"seed_start={seed_start} overlaps the eval seeds {EVAL_SEEDS}; demo seeds "
            f"start at {DEMO_SEED_START} by convention"
        )
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; choose from {list(TASKS)}")


def prepare_out_dir(out_dir: str | os.PathLike, overwrite: bool) -> Path:
    """An empty dataset directory (an existing one only with `overwrite`)."""
    out = Path(out_dir)
    manifest = out / MANIFEST
    if manifest.exists():
        if not overwrite:
            raise FileExistsError(
                f"{manifest} exists; pass overwrite=True (--overwrite) to replace it"
            )
        manifest.unlink()
        for old in (out / EPISODE_DIR).glob("*.npz"):
            old.unlink()
    (out / EPISODE_DIR).mkdir(parents=True, exist_ok=True)
    return out


def store_episode(out: Path, manifest: IO[str], episode: DemoEpisode, **extra: Any) -> dict:
    """Save `episode` under out/episodes/ and append its manifest line; returns the record."""
    rel = f"{EPISODE_DIR}/{episode.family}_{episode.seed}.npz"
    save_episode(episode, out / rel)
    record = {
        "file": rel,
        "suite": "embedded",
        "task": episode.family,
        "family": episode.family,
        "seed": episode.seed,
        "instruction": episode.instruction,
        "length": len(episode),
        "success": episode.success,
        **extra,
    }
    manifest.write(json.dumps(record) + "\n")
    manifest.flush()
    return record


def generate_demos(cfg: DemoConfig) -> list[dict]:
    """Generate the dataset described by `cfg`; returns the manifest records."""
    check_seeds_and_tasks(cfg.seed_start, cfg.tasks)
    out = prepare_out_dir(cfg.out_dir, cfg.overwrite)
    records: list[dict] = []
    max_attempts = max(1, int(cfg.max_attempts_factor * cfg.episodes_per_task))
    want = cfg.episodes_per_task
    log_every = max(1, want // 10)
    with open(out / MANIFEST, "w") as manifest:
        for task in cfg.tasks:
            env = EmbeddedEnv(task, cfg.env)
            kept = tried = 0
            t0 = time.perf_counter()
            try:
                while kept < want and tried < max_attempts:
                    seed = cfg.seed_start + tried
                    tried += 1
                    episode = record_episode(env, seed, cfg.noise_std, cfg.expert_style)
                    if not episode.success and not cfg.keep_failures:
                        continue
                    record = store_episode(out, manifest, episode)
                    records.append(record)
                    kept += 1
                    if kept % log_every == 0 or kept == want:
                        rate = tried / (time.perf_counter() - t0)
                        msg = "%s: %d/%d kept (%d tried, %.1f episodes/s)"
                        logger.info(msg, task, kept, want, tried, rate)
            finally:
                env.close()
            if kept < want:
                logger.warning("%s: only %d/%d episodes after %d tries", task, kept, want, tried)
    return records


def _read_manifest(root: Path) -> list[tuple[int, dict]]:
    if not root.is_dir():
        raise FileNotFoundError(f"demo directory {root} does not exist")
    manifest = root / MANIFEST
    if not manifest.is_file():
        raise FileNotFoundError(
            f"no {MANIFEST} in {root}; generate a dataset with `python -m sim.demos --out {root}`"
        )
    entries = []
    for lineno, line in enumerate(manifest.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            record["file"]  # noqa: B018 - presence check
        except (json.JSONDecodeError, TypeError, KeyError) as err:
            raise DemoDatasetError(f"{manifest}:{lineno}: corrupt manifest line ({err})") from err
        entries.append((lineno, record))
    return entries


def load_episode(path: Path) -> DemoEpisode:
    """Read and validate one episode file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"demo episode file {path} is missing")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        raise DemoDatasetError(f"corrupt demo episode file {path}: {err}") from err
    missing = [
        k for k in (*_ARRAY_KEYS, "instruction", "family", "seed", "success") if k not in arrays
    ]
    if missing:
        raise DemoDatasetError(f"demo episode file {path} lacks {missing}")
    images, actions, states = (arrays[k] for k in _ARRAY_KEYS)
    n = len(actions)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise DemoDatasetError(f"{path}: images must be uint8 [T,H,W,3], got {images.shape}")
    if actions.shape != (n, 7) or len(images) != n or len(states) != n or n == 0:
        raise DemoDatasetError(
            f"{path}: inconsistent lengths images={images.shape} actions={actions.shape} "
            f"states={states.shape}"
        )
    return DemoEpisode(
        images=images,
        actions=actions,
        states=states,
        instruction=str(arrays["instruction"]),
        family=str(arrays["family"]),
        seed=int(arrays["seed"]),
        success=bool(arrays["success"]),
        wrist_images=arrays.get("wrist_images"),
        path=path,
    )


def load_demos(
    directory: str | os.PathLike, tasks: Sequence[str] | None = None
) -> Iterator[DemoEpisode]:
    """Yield the episodes listed in `directory`/manifest.jsonl (optionally only `tasks`).

    Raises FileNotFoundError for a missing directory, manifest or episode file (all episode
    files are checked before the first one is yielded) and DemoDatasetError for corrupt data.
    """
    root = Path(directory)
    entries = [(n, r) for n, r in _read_manifest(root) if tasks is None or r.get("task") in tasks]
    for lineno, record in entries:
        if not (root / record["file"]).is_file():
            raise FileNotFoundError(
                f"{root / MANIFEST}:{lineno} lists {record['file']}, which is missing"
            )
    for _, record in entries:
        yield load_episode(root / record["file"])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate expert demos for the embedded suite.")
    parser.add_argument("--out", type=Path, required=True, help="dataset directory")
    parser.add_argument("--episodes-per-task", type=int, default=50)
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated task names")
    parser.add_argument("--seed-start", type=int, default=DEMO_SEED_START)
    parser.add_argument("--noise", type=float, default=0.0, help="expert action noise (m)")
    parser.add_argument("--expert", choices=STYLES, default="smooth", help="expert style")
    parser.add_argument("--image-size", type=int, default=EmbeddedConfig.image_size)
    parser.add_argument("--wrist", action="store_true", help="also record the wrist camera")
    parser.add_argument("--keep-failures", action="store_true")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    cfg = DemoConfig(
        out_dir=args.out,
        tasks=tuple(t.strip() for t in args.tasks.split(",") if t.strip()),
        episodes_per_task=args.episodes_per_task,
        seed_start=args.seed_start,
        noise_std=args.noise,
        expert_style=args.expert,
        keep_failures=args.keep_failures,
        overwrite=args.overwrite,
        env=EmbeddedConfig(image_size=args.image_size, wrist_image=args.wrist),
    )
    t0 = time.perf_counter()
    records = generate_demos(cfg)
    steps = sum(r["length"] for r in records)
    print(
        f"wrote {len(records)} episodes ({steps} steps) to {cfg.out_dir} "
        f"in {time.perf_counter() - t0:.1f}s; config: {json.dumps(asdict(cfg), default=str)}"
    )


if __name__ == "__main__":
    main()

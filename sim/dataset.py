"""The training data in memory: demo/DAgger episodes -> normalized action tokens, frames, aux.

OpenVLA's action normalization (q01/q99, gripper passed through), the episodes of one or more
dataset directories, and `DemoBatches`, which holds the sampled transitions and serves random
batches (with random-shift augmentation) to `sim.train`.
"""

from __future__ import annotations

import logging
from typing import Protocol

import numpy as np
import torch

import vla_prune
from sim.demos import load_demos
from vla_prune.preprocess import image_to_pixels

log = logging.getLogger(__name__)


class BatchOptions(Protocol):
    """What DemoBatches reads of a training config (sim.train.TrainConfig has these fields);
    a protocol, so this module needs nothing from the trainer that imports it."""

    batch_size: int
    frame_stride: int
    aux_weight: float
    blind: bool
    shift: int


def action_stats(actions: np.ndarray) -> dict:
    """OpenVLA-style statistics; the gripper (last dim) is not normalized."""
    mask = [True] * (actions.shape[1] - 1) + [False]
    return {
        "action": {
            "q01": np.quantile(actions, 0.01, axis=0).tolist(),
            "q99": np.quantile(actions, 0.99, axis=0).tolist(),
            "mean": actions.mean(0).tolist(),
            "std": actions.std(0).tolist(),
            "mask": mask,
        },
        "num_transitions": int(actions.shape[0]),
    }


def normalize(actions: np.ndarray, stats: dict) -> np.ndarray:
    """Inverse of vla_prune.models.openvla.unnormalize (clipped to [-1, 1], as upstream)."""
    s = stats["action"]
    q01, q99 = np.asarray(s["q01"]), np.asarray(s["q99"])
    mask = np.asarray(s["mask"], dtype=bool)
    norm = np.clip(2 * (actions - q01) / (q99 - q01 + 1e-8) - 1, -1, 1)
    return np.where(mask, norm, actions).astype(np.float32)


def iter_episodes(data: str):
    """The episodes of one dataset directory, or of several given comma-separated
    (e.g. ``data/demos,data/dagger1``: expert demos plus DAgger corrections)."""
    dirs = [d.strip() for d in data.split(",") if d.strip()]
    if not dirs:
        raise ValueError(f"no dataset directory in data={data!r}")
    for d in dirs:
        yield from load_demos(d)


class DemoBatches:
    """The training transitions in memory (128x128 frames), sampled uniformly.

    frame_stride > 1 keeps every k-th frame of each episode (from a per-episode phase), so
    many more distinct scenes fit in memory: neighbouring frames are near-duplicates, and a
    policy learns to find the target from seeing many scenes, not many frames of one."""

    def __init__(
        self, data: str, policy: vla_prune.Policy, cfg: BatchOptions, stats: dict | None = None
    ):
        """stats: discretize with these statistics (a validation set uses the training set's)."""
        if cfg.frame_stride < 1:
            raise ValueError(f"frame_stride must be >= 1, got {cfg.frame_stride}")
        images, actions, prompts, anchors, chunk_rows, aux = [], [], [], [], [], []
        families: list[str] = []
        chunk = getattr(policy.config, "chunk", 0)  # CogACT: the DiT predicts action chunks
        envs: dict = {}
        start = 0
        for ep in iter_episodes(data):
            n = len(ep.actions)
            keep = np.arange(ep.seed % cfg.frame_stride, n, cfg.frame_stride)
            if len(keep) == 0:  # an episode shorter than the stride's phase
                keep = np.arange(n)
            images.append(ep.images[keep])  # a copy: the episode's full arrays can go
            actions.append(ep.actions)
            prompts += [ep.instruction] * len(keep)
            families += [ep.family] * len(keep)
            anchors += (start + keep).tolist()
            # rows t .. t+chunk-1 of the episode, the last one repeated
            chunk_rows += [[start + min(t + j, n - 1) for j in range(chunk)] for t in keep]
            if cfg.aux_weight > 0:
                aux.append(episode_aux(ep, envs)[keep])
            start += n
        for env in envs.values():
            env.close()
        self.images = np.concatenate(images)
        self.families = families  # per row: the episode's task family
        self.aux = torch.from_numpy(np.concatenate(aux)) if aux else None
        raw = np.concatenate(actions).astype(np.float32)
        self.stats = stats or action_stats(raw[anchors])
        normalized = normalize(raw, self.stats)
        tokens = policy.action_tokenizer.encode(normalized[anchors])
        self.action_tokens = torch.from_numpy(tokens)
        self.chunks = torch.from_numpy(normalized[np.asarray(chunk_rows)]) if chunk else None
        ids = {p: policy.token_ids(p) for p in set(prompts)}
        self.prompt_ids = [ids[p] for p in prompts]
        self.policy, self.cfg = policy, cfg
        log.info(
            "%d transitions (of %d) from %d episodes, %d distinct prompts",
            len(self.images),
            start,
            len(images),
            len(ids),
        )

    def __len__(self) -> int:
        return len(self.images)

    def sample(self, gen: torch.Generator):
        idx = torch.randint(len(self), (self.cfg.batch_size,), generator=gen)
        return self.batch(idx, gen)

    def batch(self, idx: torch.Tensor, gen: torch.Generator | None = None):
        """Rows `idx` as (pixels, prompt ids, targets, aux); random shifts only with `gen`."""
        pc = self.policy.config
        pixels = []
        for i in idx.tolist():
            img = self.images[i]
            if self.cfg.blind:
                img = np.full_like(img, 128)
            elif self.cfg.shift and gen is not None:
                img = _random_shift(img, self.cfg.shift, gen)
            pixels.append(image_to_pixels(img, pc.image_size, pc.image_means, pc.image_stds))
        prompts = [self.prompt_ids[i] for i in idx.tolist()]
        targets = self.action_tokens[idx] if self.chunks is None else self.chunks[idx]
        aux = self.aux[idx] if self.aux is not None else None
        return torch.cat(pixels), prompts, targets, aux


AUX_DIM = 8
AUX_SCALE = 1 / 0.3  # metres -> roughly [-1, 1] over the table


def aux_targets(data: str) -> np.ndarray:
    """Per transition: [gripper x, y, z, opening, source x, y, destination x, y] (scaled).

    A training-only signal: the demos' gripper state plus where the episode's target starts
    (the button / object to move) and where it must go (button / pad / plate / base object),
    recovered by resetting the env with the episode's seed. Regressing it from the same hidden
    state that predicts the first action token teaches the vision tower and the LLM *where
    things are* far sooner than the action loss alone, which on a from-scratch model sits at
    the marginal action for thousands of steps. The exported checkpoint does not contain the
    regression head: it is plain OpenVLA.
    """
    envs: dict = {}
    rows = [episode_aux(ep, envs) for ep in iter_episodes(data)]
    for env in envs.values():
        env.close()
    return np.concatenate(rows).astype(np.float32)


def episode_aux(ep, envs: dict) -> np.ndarray:
    """aux_targets' rows for one episode; `envs` caches one small env per family."""
    from sim.envs.embedded import EmbeddedEnv

    if ep.family not in envs:
        envs[ep.family] = EmbeddedEnv(ep.family, image_size=16)
    env = envs[ep.family]
    env.reset(seed=ep.seed)
    task = env.task_instance
    if task.fixtures:
        dst = task.fixtures[task.target_fixture].xy
        src = dst if task.target_object is None else task.objects[task.target_object].xy
    else:  # stack: the target object goes onto the base object
        src, dst = task.objects[task.target_object].xy, task.objects[task.base_object].xy
    geo = np.asarray([*src, *dst], dtype=np.float32) * AUX_SCALE
    state = ep.states.astype(np.float32).copy()
    state[:, :3] *= AUX_SCALE
    return np.concatenate([state, np.broadcast_to(geo, (len(state), 4))], axis=1)


def _random_shift(img: np.ndarray, pad: int, gen: torch.Generator) -> np.ndarray:
    dx, dy = torch.randint(0, 2 * pad + 1, (2,), generator=gen).tolist()
    padded = np.pad(img, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    return padded[dy : dy + img.shape[0], dx : dx + img.shape[1]]

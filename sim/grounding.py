"""Grounding objective for behaviour cloning: from the action-query position, point at the
visual tokens that hold the instruction's target and its goal.

The shipped policy regresses the target's coordinates (`--aux-weight`) and memorized the
layouts of its training scenes instead of reading the instruction (TRAINING.md: grounding
probe 0.23-0.38 on held-out scenes). Here the query (the final hidden state of the last prompt
token, the row that predicts the first action) is scored against the final hidden states of
the visual tokens — a classification over patches, trained against the patches the
segmentation render says show the target / goal. The scenes are fresh ones rendered on the fly
(`sim.seglabels`), so thousands of distinct layouts per family are seen and none can be
memorized. Training-only: the head is not exported.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

import vla_prune
from sim.seglabels import ENT_GRIPPER, SceneSampler, entity_patches, patch_labels
from vla_prune.preprocess import image_to_pixels

GROUND_SEED_START = 6_000_000  # training scenes: GROUND_SEED_START + step * batch + j
GROUND_HELDOUT_SEED_START = 4_100_000  # held-out scenes (never trained on)
FAMILIES = ("press", "push", "pick_place", "stack")
ROLES = ("target", "goal")  # what the grounding head points at
MASK_ROLES = (*ROLES, "gripper")  # the masks a scene carries (sim.query_attention uses all)


class GroundingHead(torch.nn.Module):
    """Scaled dot product between one query per role and every visual token: [B, 2, P]."""

    def __init__(self, dim: int, key_dim: int = 64):
        super().__init__()
        self.q = torch.nn.Linear(dim, len(ROLES) * key_dim)
        self.k = torch.nn.Linear(dim, key_dim)
        self.key_dim = key_dim

    def forward(self, query: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        q = self.q(query).view(query.shape[0], len(ROLES), self.key_dim)
        return torch.einsum("brd,bpd->brp", q, self.k(visual)).float() / self.key_dim**0.5


class GroundingBatch(NamedTuple):
    pixels: torch.Tensor  # [B, C, H, W]
    prompts: list[list[int]]
    masks: torch.Tensor  # [B, 3, P] bool: the patches showing each of MASK_ROLES
    families: list[str]
    offsets: torch.Tensor  # [B, P, 2] sub-patch (col, row) offset of the thing each patch shows
    has_thing: torch.Tensor  # [B, P] bool: the patch shows a thing (offsets are defined)
    xy: torch.Tensor  # [B, 3, 2] world x, y (metres) of each of MASK_ROLES


class GroundingScenes:
    """Labelled scenes for the grounding loss (a `GroundingBatch`)."""

    def __init__(self, policy: vla_prune.Policy, families: Sequence[str] = FAMILIES):
        self.policy = policy
        self.families = tuple(families)
        self.samplers = {f: SceneSampler(f) for f in self.families}
        self.grid = policy.config.dino.image_size // policy.config.dino.patch

    def scenes(self, seeds: Sequence[int], rng: np.random.Generator | None):
        """Scene k uses family k % len(families); rng=None: first-frame gripper pose, else a
        random state for half of them (the target may already be in the gripper)."""
        pc = self.policy.config
        pixels, prompts, masks, families, offsets, has_thing, xy = [], [], [], [], [], [], []
        for seed in seeds:
            family = self.families[seed % len(self.families)]
            home = rng is None or rng.random() < 0.5
            f = self.samplers[family].frame(seed, rng, home=home)
            lab = patch_labels(f.entities, f.ent_class, f.ent_uv, f.ent_z, self.grid)
            size = f.image.shape[0]
            masks.append(
                np.stack(
                    [
                        entity_patches(lab, e, f.ent_uv[e], self.grid, size)
                        for e in (f.target, f.goal, ENT_GRIPPER)
                    ]
                )
            )
            xy.append(f.ent_xy[[f.target, f.goal, ENT_GRIPPER]])
            offsets.append(lab["offset"])
            has_thing.append(lab["reg_mask"])
            pixels.append(image_to_pixels(f.image, pc.image_size, pc.image_means, pc.image_stds))
            prompts.append(self.policy.token_ids(f.instruction))
            families.append(family)
        return GroundingBatch(
            torch.cat(pixels),
            prompts,
            torch.from_numpy(np.stack(masks)),
            families,
            torch.from_numpy(np.stack(offsets)),
            torch.from_numpy(np.stack(has_thing)),
            torch.from_numpy(np.stack(xy)),
        )

    def for_step(self, step: int, batch: int, seed: int):
        """The training scenes of one step: a pure function of (step, seed), so a resumed run
        sees exactly what the uninterrupted one would have."""
        rng = np.random.default_rng([seed, step])
        seeds = [GROUND_SEED_START + step * batch + j for j in range(batch)]
        return self.scenes(seeds, rng)

    def close(self) -> None:
        for s in self.samplers.values():
            s.close()


def grounding_logits(
    head: GroundingHead, hidden: torch.Tensor, lengths: Sequence[int], n_patches: int
) -> torch.Tensor:
    """From `sim.train.last_hidden`'s output: the last prompt row queries rows 1..P."""
    query = hidden[torch.arange(hidden.shape[0]), torch.tensor(lengths) - 1]
    return head(query, hidden[:, 1 : 1 + n_patches])


def grounding_loss(logits: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy against a uniform distribution over the labelled patches (an object can
    span two); accuracy = the top patch is one of them. Both averaged over scenes and roles."""
    masks = masks[:, : logits.shape[1]]  # the scene also carries the gripper's mask
    target = masks.float() / masks.sum(-1, keepdim=True).clamp(min=1)
    loss = -(target * F.log_softmax(logits, dim=-1)).sum(-1).mean()
    top = logits.argmax(-1)
    acc = masks.gather(-1, top[..., None])[..., 0].float().mean()
    return loss, acc


@torch.no_grad()
def evaluate_grounding(
    policy: vla_prune.Policy,
    head: GroundingHead,
    scenes: GroundingScenes,
    n: int,
    last_hidden: Callable,
    bf16: bool = True,
    batch: int = 32,
) -> dict[str, float]:
    """Held-out grounding accuracy per family and role on scenes GROUND_HELDOUT_SEED_START +
    k (first-frame gripper pose, as at the start of an episode). `last_hidden` is
    sim.train's (passed in: this module must not import the trainer that imports it)."""
    was = policy.model.training
    policy.model.eval()
    hits: dict[str, list[float]] = {}
    for start in range(0, n, batch):
        seeds = range(
            GROUND_HELDOUT_SEED_START + start, GROUND_HELDOUT_SEED_START + min(n, start + batch)
        )
        pixels, prompts, masks, families, *_ = scenes.scenes(list(seeds), None)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            hidden, lengths = last_hidden(policy, pixels, prompts)
            logits = grounding_logits(head, hidden, lengths, masks.shape[-1])
        top = logits.argmax(-1)
        masks = masks[:, : len(ROLES)]
        ok = masks.gather(-1, top[..., None])[..., 0].float()
        for b, family in enumerate(families):
            for r, role in enumerate(ROLES):
                hits.setdefault(f"{family}_{role}", []).append(ok[b, r].item())
    policy.model.train(was)
    out = {k: round(float(np.mean(v)), 4) for k, v in sorted(hits.items())}
    out["all"] = round(float(np.mean([x for v in hits.values() for x in v])), 4)
    return out

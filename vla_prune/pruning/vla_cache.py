"""VLA-Cache (arXiv 2502.02175, siyuhsu/vla-cache): reuse the K/V of visually static tokens.

As its code does it, per control step and batch slot:
1. static tokens: the previous and current frames (the model's input resolution, uint8) cut
   into the model's 14x14 patches; a patch is static when the cosine similarity of its raw
   pixels is >= 0.996 (upstream's formula: dot / (|a| |b| + 1e-8)); at most the top 130 of 256
   by similarity (VLACacheConfig keeps both counts as fractions of the token count);
2. relevance filter: the 100 of 256 tokens the text attended to most at the middle layer of the
   *previous* step are removed; the rest is the reusable list, in token order (upstream sorts
   it by index and each layer takes a prefix of it);
3. per layer: reuse fraction f_l = 1 - normalized attention entropy of the previous step,
   upward jumps damped by 0.55; at its reuse layers (2, 6, 9, 11 of 32 — the layers its
   LlamaModel fork reuses at, as a derivative of that fork documents; the fork itself is not in
   our mirror) a layer reuses max(1, int(f_l * len(list))) of the list, never fewer than the
   layer before (a skipped row has no input for the next layer).
The engine (engine/reuse.py) skips those rows and keeps their K/V from the last step.

Differences, said once: upstream's entropy and relevance come from eager attention maps of
every row (output_attentions); here they come from the attention probe for the text rows only
(the queries that matter, microseconds instead of a T x T map per layer): entropy = the mean
over text rows of the entropy of their head-averaged attention over all keys.

"<method>+vla-cache" (ours, e.g. vla-pruner+vla-cache): <method> prunes at layer K, then the
static tokens among the kept ones are reused from layer K on, when the previous step kept them
too (their K/V at those layers exist). Layers before K compute every row, so the pruning
hook's scores are the dense ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..config import VLA_CACHE, PruneConfig, VLACacheConfig
from ..engine.attention_probe import attention_rows
from ..engine.reuse import PrefillStamp, ReusePlan
from ..engine.runner import PrefillContext, PrefillResult
from .base import PruneInputs, register


@register(VLA_CACHE)
class VLACacheKeepAll:
    """VLA-Cache alone prunes nothing (its reuse runs in the policy step)."""

    needs = frozenset()

    def __init__(self, cfg: PruneConfig):
        if (cfg.keep_ratio is not None and cfg.keep_ratio < 1.0) or cfg.keep_count is not None:
            raise ValueError(
                "vla-cache keeps every token (it reuses K/V, it does not prune): give no keep "
                "value, or combine it with a pruner, e.g. vla-pruner+vla-cache@0.25"
            )

    def select(self, x: PruneInputs) -> torch.Tensor | None:
        return None


@dataclass
class SlotMemory:
    """What one batch slot carries from its last step to the next (cleared at reset)."""

    frame: np.ndarray | None = None  # [N, 14 * 14 * 3] float32 raw pixel patches
    relevance: np.ndarray | None = None  # [N] text -> visual attention, relevance layer
    fractions: np.ndarray | None = None  # [L] per-layer reuse fraction (entropy schedule)
    schedule_age: int = 0  # steps since `fractions` was computed (VLACacheConfig.schedule_every)
    kept: np.ndarray | None = None  # visual tokens kept at layer K (None: all)
    stamp: PrefillStamp | None = None  # the prefill whose cache holds this slot's K/V


def frame_patches(image: np.ndarray, size: int, patch: int) -> np.ndarray:
    """HxWx3 uint8 at the model's input size (resized as preprocessing does: PIL bicubic) ->
    [N, patch * patch * 3] float32, patches row-major (the visual token order)."""
    if image.shape[:2] != (size, size):
        image = np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))
    g = size // patch
    x = np.asarray(image, dtype=np.float32)[: g * patch, : g * patch]
    return x.reshape(g, patch, g, patch, 3).transpose(0, 2, 1, 3, 4).reshape(g * g, -1)


def patch_similarity(prev: np.ndarray, cur: np.ndarray) -> np.ndarray:
    """Cosine similarity [N] of two frames' patches, upstream's formula."""
    dot = (prev * cur).sum(1)
    return dot / (np.linalg.norm(prev, axis=1) * np.linalg.norm(cur, axis=1) + 1e-8)


def reusable_tokens(
    similarity: np.ndarray,
    relevance: np.ndarray | None,
    cfg: VLACacheConfig,
    held: np.ndarray | None = None,
) -> np.ndarray:
    """Static tokens (similarity >= threshold, the top max_reused by similarity) minus the
    relevance_top_k most attended ones, sorted by token index (upstream's order).

    held: the tokens whose previous K/V exist after the pruning point (the last step's kept
    set, "<method>+vla-cache"); both counts then scale with their number, not N."""
    n = similarity.shape[0]
    held = np.arange(n) if held is None else np.asarray(held, dtype=np.int64)
    most, top_k = cfg.counts(len(held))
    static = held[similarity[held] >= cfg.similarity_threshold]
    order = np.argsort(-similarity[static], kind="stable")  # ties -> lower index first
    static = static[order[:most]]
    if relevance is not None and top_k > 0:
        relevant = held[np.argsort(-relevance[held], kind="stable")[:top_k]]
        static = np.setdiff1d(static, relevant)
    return np.sort(static)


def layer_fractions(entropy: np.ndarray, damping: float) -> np.ndarray:
    """Upstream's get_layer_mask_schedule on per-layer entropies [L] (NaN: a layer that did not
    run, fraction 0): 1 - min-max normalized entropy, each upward step scaled by `damping`."""
    ran = np.isfinite(entropy)
    out = np.zeros(entropy.shape, dtype=np.float64)
    if not ran.any():
        return out
    e = entropy[ran].astype(np.float64)
    reuse = 1.0 - (e - e.min()) / (e.max() - e.min() + 1e-10)
    for i in range(1, len(reuse)):
        delta = reuse[i] - reuse[i - 1]
        if delta > 0:
            reuse[i] = reuse[i - 1] + delta * damping
    out[ran] = reuse
    return out


def layer_counts(
    fractions: np.ndarray, n_reusable: int, layers: tuple[int, ...], first: int = 0
) -> np.ndarray:
    """Rows reused per layer [L]: at each reuse layer, max(1, int(f * n)) of the list, never
    fewer than the layer before; 0 before the first reuse layer and before layer `first` (the
    pruning point of "<method>+vla-cache": from it on, the count upstream would have there)."""
    counts = np.zeros(len(fractions), dtype=np.int64)
    if n_reusable == 0:
        return counts
    for layer in layers:
        counts[layer] = max(1, int(fractions[layer] * n_reusable))
    counts = np.maximum.accumulate(counts)
    counts[:first] = 0
    return counts


def text_rows(ctx: PrefillContext) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows [B, R] of the text tokens, counted from the end so they hold after the pruning
    point too; weight [B, R] 1 for real text, 0 for left padding)."""
    b, t = ctx.embeds.shape[:2]
    r = t - ctx.num_visual - 1
    dev = ctx.pad.device
    rows = torch.arange(-r, 0, device=dev)[None].expand(b, -1)
    weight = (torch.arange(r, device=dev)[None] >= ctx.pad[:, None]).float()
    return rows, weight


@torch.inference_mode()
def relevance_scores(ctx: PrefillContext, layer: int) -> torch.Tensor:
    """[B, N] mean over text rows of their head-averaged attention to each visual token."""
    rows, weight = text_rows(ctx)
    attn = ctx.attention(layer, rows).float().mean(dim=1)  # [B, R, N]
    return (attn * weight[..., None]).sum(1) / weight.sum(1, keepdim=True)


@torch.inference_mode()
def layer_entropies(ctx: PrefillContext, layers: list[int]) -> torch.Tensor:
    """[B, L] mean over text rows of the entropy of their head-averaged attention over every
    cached key, per decoder layer (NaN for layers not in `layers`)."""
    engine = ctx.engine
    rows, weight = text_rows(ctx)
    b, r = rows.shape
    out = torch.full((b, len(engine.layers)), float("nan"), device=rows.device)
    for i in layers:
        # the text rows are the last r rows of every layer's sequence: a slice, not a gather
        h, pos = ctx.hidden_in[i][:, -r:], ctx.positions_in[i][:, -r:]
        attn = attention_rows(
            engine.layers[i], engine.lm.model.rotary_emb, engine.cache, i, h, pos, engine.num_heads
        ).mean(dim=1)  # [B, R, S]
        attn = attn / (attn.sum(-1, keepdim=True) + 1e-10)
        ent = -(attn * torch.log(attn + 1e-10)).sum(-1)  # [B, R]
        out[:, i] = (ent * weight).sum(1) / weight.sum(1)
    return out


class VLACache:
    """VLA-Cache for one policy: turns slots' memories and this step's frames into the
    engine's ReusePlan, and the prefill's probes into the memories for the next step."""

    def __init__(
        self, cfg: VLACacheConfig, num_visual: int, num_layers: int, image_size: int, patch: int
    ):
        if (image_size // patch) ** 2 != num_visual:
            raise ValueError(
                f"VLA-Cache needs one visual token per {patch}x{patch} patch: {image_size}px "
                f"gives {(image_size // patch) ** 2} patches, the model has {num_visual} tokens"
            )
        self.cfg = cfg
        self.num_visual, self.num_layers = num_visual, num_layers
        self.image_size, self.patch = image_size, patch
        self.layers, self.relevance_layer = cfg.resolve_layers(num_layers)

    def frames(self, images: list[np.ndarray]) -> list[np.ndarray]:
        return [frame_patches(im, self.image_size, self.patch) for im in images]

    def plan(
        self, memories: list[SlotMemory], frames: list[np.ndarray], first_layer: int = 0
    ) -> ReusePlan | None:
        """The reuse plan of this step (None: no slot has a previous step to reuse from).
        first_layer: no reuse before it (the pruning point of "<method>+vla-cache")."""
        stamps = {m.stamp for m in memories if m.stamp is not None and m.frame is not None}
        if len(stamps) != 1:  # none yet, or slots from different prefills: nothing to reuse
            return None
        stamp = stamps.pop()
        tokens, counts = [], []
        for m, frame in zip(memories, frames):
            ids = np.zeros(0, dtype=np.int64)
            count = np.zeros(self.num_layers, dtype=np.int64)
            if m.stamp == stamp and m.frame is not None and m.fractions is not None:
                sim = patch_similarity(m.frame, frame)
                ids = reusable_tokens(sim, m.relevance, self.cfg, m.kept)
                count = layer_counts(m.fractions, len(ids), self.layers, first_layer)
            tokens.append(torch.from_numpy(ids))
            counts.append(torch.from_numpy(count))
        return ReusePlan(tokens, torch.stack(counts), stamp)

    def record_layers(self, skip_layers: frozenset[int]) -> tuple[int, ...]:
        """Layers whose inputs the probes after the prefill read (entropy: every layer that
        runs; relevance: the middle layer)."""
        return tuple(i for i in range(self.num_layers) if i not in skip_layers)

    def observe(
        self, memories: list[SlotMemory], frames: list[np.ndarray], pre: PrefillResult
    ) -> None:
        """Remember this step for the next: frame, relevance, entropy schedule, stamp."""
        ctx = pre.context
        ran = sorted(i for i in pre.stamp.ran if i in ctx.hidden_in)
        relevance = None
        if self.relevance_layer in ctx.hidden_in:
            relevance = relevance_scores(ctx, self.relevance_layer).cpu().numpy()
        # One probe serves the batch: recomputed when any slot's schedule is due (or missing).
        every = self.cfg.schedule_every
        due = any(m.fractions is None or m.schedule_age + 1 >= every for m in memories)
        entropy = layer_entropies(ctx, ran).cpu().numpy() if due else None
        for i, m in enumerate(memories):
            m.frame = frames[i]
            m.relevance = None if relevance is None else relevance[i]
            if entropy is not None:
                m.fractions = layer_fractions(entropy[i], self.cfg.entropy_damping)
                m.schedule_age = 0
            else:
                m.schedule_age += 1
            m.kept = None if pre.kept is None else pre.kept[i].cpu().numpy()
            m.stamp = pre.stamp

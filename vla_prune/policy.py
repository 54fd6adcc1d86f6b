"""Policy: reset() + step(image, instruction) -> StepResult. The one interface everything uses.

One control step, one path:
  image + instruction -> preprocess -> vision backbone -> projector -> LLM prefill (pruning
  point at layer K) -> greedy decode of action tokens -> de-tokenize / un-normalize.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import EngineConfig, PruneConfig
from .engine.flops import step_flops
from .engine.runner import LlamaEngine, PrefillContext, PruneDecision
from .heads import ActionHead, TokenDecodingHead
from .models.openvla import ActionTokenizer, build_prompt, unnormalize
from .models.prismatic import OpenVLAModel
from .preprocess import InputError, image_to_pixels, validate_image, validate_instruction
from .pruning.base import make_pruner
from .pruning.scoring import select_tokens
from .pruning.temporal import ActionScoreHistory
from .pruning.vla_cache import SlotMemory, VLACache
from .runtime.timing import StageTimer

log = logging.getLogger(__name__)

# "decode" is OpenVLA's token decoding; diffusion heads (CogACT) report "action_head" instead.
STAGES = (
    "preprocess",
    "vision",
    "projector",
    "prefill",
    "prune",
    "decode",
    "action_head",
    "post",
    "total",
)


@dataclass
class StepResult:
    actions: np.ndarray  # [chunk, action_dim] float32, un-normalized
    action_tokens: np.ndarray | None  # [action_dim] decoded token ids (OpenVLA-style policies)
    timings_ms: dict[str, float]
    kept_visual_tokens: int
    normalized_actions: np.ndarray | None = None  # [chunk, action_dim] in [-1, 1]
    # Pruning report (None when nothing was pruned or the method doesn't compute it).
    kept_indices: np.ndarray | None = None  # sorted visual indices kept at layer K
    semantic_scores: np.ndarray | None = None  # [N] score the pruner saw this step
    action_scores: np.ndarray | None = None  # [N] action-level attention recorded this step
    smoothed_action_scores: np.ndarray | None = None  # [N] temporal action score the pruner used
    origin: np.ndarray | None = None  # per kept token: 1 semantic, 2 action, 3 both
    extra: dict[str, Any] = field(default_factory=dict)


class Policy:
    def __init__(
        self,
        model: OpenVLAModel,
        tokenizer,
        norm_stats: dict[str, Any],
        unnorm_key: str | None = None,
        head: ActionHead | None = None,
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.norm_stats = norm_stats
        cfg = model.config
        self.action_tokenizer = ActionTokenizer(cfg.tokenizer_vocab_size, cfg.n_action_bins)
        self.head = head or TokenDecodingHead(self.action_tokenizer, cfg.action_dim)
        self.engine = LlamaEngine(model.language_model, cfg.num_patches)
        self.unnorm_key = self._check_unnorm_key(unnorm_key)
        self.prune_config = PruneConfig()
        self._pruner = make_pruner(self.prune_config)
        self._vla_cache: VLACache | None = None  # K/V reuse across steps (VLA-Cache methods)
        from .engine.weights import weight_format

        fmt = weight_format(self.model)  # a model loaded in bf16 is a bf16 engine already
        known = fmt in ("fp32", "bf16", "int8")  # else e.g. fp16: as loaded, named fp32
        self.engine_config = EngineConfig(weights=fmt if known else "fp32")
        self.reset()

    # -- configuration ------------------------------------------------------------------------

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to(self, device=None, dtype=None) -> Policy:
        self.model.to(device=device, dtype=dtype)
        self.engine.cache = None
        return self

    def _check_unnorm_key(self, key: str | None) -> str | None:
        keys = sorted(self.norm_stats)
        if key is None:
            return keys[0] if len(keys) == 1 else None
        if key not in self.norm_stats:
            raise ValueError(f"unknown unnorm_key {key!r}; this checkpoint has {keys}")
        return key

    def configure(
        self,
        prune: PruneConfig | None = None,
        unnorm_key: str | None = None,
        reset: bool = True,
        skip_layers: Sequence[int] | None = None,
        engine: EngineConfig | None = None,
        cache=None,
        sampling=None,
    ) -> Policy:
        """Set the pruning configuration, dataset statistics, LLM layers to skip, how the
        engine runs (compiled decode, weight format) and/or the action head's settings
        (`cache`: a DiT feature cache's CacheConfig, `sampling`: a SamplingConfig — heads
        without them reject them).

        reset=False keeps the episode's temporal history (a latency controller changing the
        budget or the engine mid-episode); otherwise this starts a new episode, like reset().
        skip_layers: decoder layers not run at all (see vla_prune.caching.layer_skip); () = none.
        """
        self.head.configure(cache, sampling, reset)  # validates before anything changes
        if engine is not None:
            self._set_engine(engine)
        if skip_layers is not None:
            self.engine.skip_layers = self._check_skips(skip_layers, prune or self.prune_config)
        elif prune is not None:
            self._check_skips(self.engine.skip_layers, prune)
        if prune is not None:
            pruner = make_pruner(prune)  # validates the method name
            prune.resolve_layers(self.config.num_layers)  # validates layer indices
            vla_cache = self._make_vla_cache(prune)  # validates its layers
            if not reset and prune.window != self.prune_config.window:
                raise ValueError("changing the temporal window needs reset=True")
            self.prune_config, self._pruner, self._vla_cache = prune, pruner, vla_cache
        if unnorm_key is not None:
            self.unnorm_key = self._check_unnorm_key(unnorm_key)
        if cache is not None or sampling is not None:
            self.head.apply(cache, sampling)
        if reset:
            self.reset()
        return self

    def _make_vla_cache(self, prune: PruneConfig) -> VLACache | None:
        if not prune.reuses_kv:
            return None
        cfg = self.config
        return VLACache(
            prune.cache_config, cfg.num_patches, cfg.num_layers, cfg.image_size, cfg.dino.patch
        )

    def _set_engine(self, engine: EngineConfig) -> None:
        if not isinstance(engine, EngineConfig):
            raise TypeError(f"engine must be an EngineConfig, got {type(engine).__name__}")
        if engine == self.engine_config:
            return
        from .engine.weights import convert_weights

        convert_weights(self.model, engine.weights)  # ValueError if it would go back up
        self.engine.use_static_decode(engine.compile, compile=engine.compile)
        self.engine.cache = None  # dtype or capacity may have changed
        self.engine_config = engine

    def _check_skips(self, skips: Sequence[int], prune: PruneConfig) -> frozenset[int]:
        n = self.config.num_layers
        skips = frozenset(int(i) for i in skips)
        bad = sorted(i for i in skips if not 0 <= i < n)
        if bad:
            raise ValueError(f"skip_layers {bad} out of range: the model has {n} layers")
        _, sem, act = prune.resolve_layers(n)
        needs = make_pruner(prune).needs
        probed = ({sem} if needs & {"semantic", "text_attention"} else set()) | (
            {act} if "action" in needs else set()
        )
        if skips & probed:
            raise ValueError(
                f"cannot skip layers {sorted(skips & probed)}: {prune.method} reads their "
                "attention (choose other layers or another action_layer/semantic_layer)"
            )
        return skips

    def reset(self) -> None:
        """New episode: clears the temporal history of every batch slot."""
        self._histories: list[ActionScoreHistory] = []
        self._steps: list[int] = []
        self._rngs: list[np.random.Generator] = []
        self._reuse: list[SlotMemory] = []  # VLA-Cache: what each slot's next step reuses
        self.head.reset()

    # Per-episode state (what reset() clears), besides the head's own.
    _EPISODE_STATE: tuple[str, ...] = ("_histories", "_steps", "_rngs", "_reuse")

    def episode_state(self) -> dict[str, Any]:
        """The running episode's state of every slot (temporal history, step counts, random
        streams, the head's state), to continue it on another copy of the same policy."""
        state = {name: getattr(self, name) for name in self._EPISODE_STATE}
        return {**state, "head": self.head.episode_state()}

    def set_episode_state(self, state: dict[str, Any]) -> None:
        for name in self._EPISODE_STATE:
            setattr(self, name, state[name])
        self.head.set_episode_state(state["head"])

    def reset_slot(self, i: int) -> None:
        """New episode in batch slot i only (batched rollouts whose episodes end at different
        steps). The slot starts from the same streams as slot 0 of a fresh policy, so an
        episode's outcome does not depend on which slot it runs in."""
        self._slots(i + 1)
        self._histories[i] = ActionScoreHistory(self.prune_config.window)
        self._steps[i] = 0
        self._rngs[i] = np.random.default_rng([self.prune_config.seed, 0])
        self._reuse[i] = SlotMemory()
        self.head.reset_slot(i)

    def _slots(self, n: int):
        while len(self._histories) < n:
            self._histories.append(ActionScoreHistory(self.prune_config.window))
            self._steps.append(0)
            self._rngs.append(np.random.default_rng([self.prune_config.seed, len(self._rngs)]))
            self._reuse.append(SlotMemory())
        self.head.ensure_slots(n)

    # -- inputs -------------------------------------------------------------------------------

    def token_ids(self, instruction: str) -> list[int]:
        """Prompt token ids for an instruction (BOS first), with OpenVLA's suffix rule."""
        ids = self.tokenizer(build_prompt(instruction)).input_ids
        suffix = self.config.prompt_suffix_token_id
        if suffix is not None and ids[-1] != suffix:
            ids = ids + [suffix]
        ids = ids + self.head.prompt_suffix()
        budget = min(
            self.config.max_length, self.model.language_model.config.max_position_embeddings
        )
        need = len(ids) + self.config.num_patches + self.config.action_dim
        if need > budget:
            raise InputError(
                f"instruction too long: {len(ids)} prompt tokens + {self.config.num_patches} "
                f"visual + {self.config.action_dim} action tokens = {need} > context {budget}"
            )
        return ids

    def prepare(self, image: np.ndarray, instruction: str) -> dict[str, torch.Tensor]:
        """{"pixel_values": [1, 6, H, W], "input_ids": [1, T]}, as the model consumes them."""
        image = validate_image(image)
        ids = self.token_ids(validate_instruction(instruction))
        cfg = self.config
        pixels = image_to_pixels(image, cfg.image_size, cfg.image_means, cfg.image_stds)
        return {
            "pixel_values": pixels.to(self.device, self.dtype),
            "input_ids": torch.tensor([ids], dtype=torch.long, device=self.device),
        }

    # -- the control step ---------------------------------------------------------------------

    def step(self, image: np.ndarray, instruction: str) -> StepResult:
        return self.step_batch([image], [instruction])[0]

    @torch.inference_mode()
    def step_batch(
        self, images: Sequence[np.ndarray], instructions: Sequence[str]
    ) -> list[StepResult]:
        """Batched control step; slot i keeps its own temporal history across calls."""
        if isinstance(instructions, str) or len(images) != len(instructions):
            raise InputError(
                "step_batch needs a list of images and a list of instructions of equal length"
            )
        if len(images) == 0:
            raise InputError("step_batch got an empty batch")
        if self.unnorm_key is None:
            raise ValueError(
                f"this checkpoint has several dataset statistics {sorted(self.norm_stats)}: "
                "choose one with policy.configure(unnorm_key=...)"
            )
        timer = StageTimer(self.device)
        b = len(images)
        with timer.stage("preprocess"):
            inputs = [self.prepare(im, ins) for im, ins in zip(images, instructions)]
            pixels = torch.cat([x["pixel_values"] for x in inputs])
        self._slots(b)  # only after every input validated: a bad input changes no state
        with timer.stage("vision"):
            features = self.model.vision_backbone(pixels)
        with timer.stage("projector"):
            patches = self.model.projector(features)
            embeds, pad = self._embed(patches, [x["input_ids"][0] for x in inputs])

        prune_cfg = self.prune_config
        k_layer, sem_layer, act_layer = prune_cfg.resolve_layers(self.config.num_layers)
        needs = self._pruner.needs
        report: dict[str, Any] = {}
        prune_ms = [0.0]

        def hook(ctx: PrefillContext):
            t0 = time.perf_counter()
            kept = self._select(ctx, sem_layer, report)
            prune_ms[0] = (time.perf_counter() - t0) * 1e3
            return kept

        with timer.stage("prefill"):
            t0 = time.perf_counter()
            plan, frames = self._reuse_plan(images, k_layer)
            reuse_ms = (time.perf_counter() - t0) * 1e3
            pre = self.engine.prefill(
                embeds,
                pad,
                self.head.max_new_tokens,
                prune_layer=k_layer,
                prune_hook=hook,
                record_layers=self._record_layers(sem_layer, act_layer),
                output=self.head.prefill_output,
                reuse=plan,
            )
            if frames is not None:  # before the head: decode rows would join the probed keys
                t0 = self.engine.clock()
                self._vla_cache.observe(self._reuse[:b], frames, pre)
                reuse_ms += (self.engine.clock() - t0) * 1e3
        kept = pre.kept
        with timer.stage(self.head.stage):
            probe_layer = act_layer if "action" in needs else None
            head = self.head.run(pre, self.engine, probe_layer, self.unnormalize)
        # "prune" = scoring + selection: the hook at layer K and the attention probes after it,
        # each measured where it ran and moved out of the stage that contains it.
        timer.move("prefill", "prune", prune_ms[0] + reuse_ms)
        timer.move(self.head.stage, "prune", head.probe_ms)
        actions = head.actions
        with timer.stage("post"):
            for i in range(b):
                if head.action_scores is not None:
                    self._histories[i].push(head.action_scores[i].float().cpu())
                self._steps[i] += 1
        timings = timer.finish()
        n_kept = kept.shape[1] if kept is not None else self.config.num_patches
        extra = dict(head.extra)
        if frames is not None:
            extra.update(self._reuse_report(pre, [len(x["input_ids"][0]) for x in inputs], k_layer))
        return [
            StepResult(
                actions=actions[i],
                action_tokens=None if head.action_tokens is None else head.action_tokens[i],
                timings_ms=timings,
                kept_visual_tokens=n_kept,
                normalized_actions=head.normalized[i],
                kept_indices=None if kept is None else kept[i].cpu().numpy(),
                semantic_scores=_np(report.get("semantic"), i),
                action_scores=_np(head.action_scores, i),
                smoothed_action_scores=_np(report.get("action"), i),
                origin=_np(report.get("origin"), i),
                extra={k: v[i] for k, v in extra.items()},
            )
            for i in range(b)
        ]

    def _record_layers(self, sem_layer: int, act_layer: int) -> tuple[int, ...]:
        """Layers whose prefill inputs the attention probe will need."""
        needs = self._pruner.needs
        layers = (sem_layer,) if needs & {"semantic", "text_attention"} else ()
        if "action" in needs:
            layers = (*layers, *self.head.probe_layers(act_layer))
        if self._vla_cache is not None:
            layers = (*layers, *self._vla_cache.record_layers(self.engine.skip_layers))
        return layers

    def _reuse_plan(self, images: Sequence[np.ndarray], k_layer: int):
        """VLA-Cache: (the engine's ReusePlan for this step or None, this step's frame patches
        or None when the method reuses nothing). "<method>+vla-cache" reuses from layer K on:
        the layers before it compute every row, so the pruning scores are the dense ones."""
        if self._vla_cache is None:
            return None, None
        frames = self._vla_cache.frames(list(images))
        first = 0 if self._pruner.name == "vla-cache" else k_layer
        return self._vla_cache.plan(self._reuse[: len(images)], frames, first), frames

    def _reuse_report(self, pre, prompt_tokens: list[int], k_layer: int) -> dict[str, Any]:
        """Per slot: visual rows reused per decoder layer [L], the prefill FLOPs they saved
        (engine/flops.py) and the fraction of the visual rows of the layers that ran."""
        n_layers, b = self.config.num_layers, len(prompt_tokens)
        reused = np.zeros((b, n_layers), dtype=np.int64)
        if pre.reused is not None:
            reused = pre.reused.cpu().numpy()
        kept = None if pre.kept is None else pre.kept.shape[1]
        n_vis = self.config.num_patches
        rows = sum(n_vis if kept is None or i < k_layer else kept for i in pre.stamp.ran)
        saved = []
        for i in range(b):
            args = (self.config, prompt_tokens[i], kept, k_layer if kept is not None else None)
            dense = step_flops(*args, skip_layers=self.engine.skip_layers)
            cached = step_flops(*args, skip_layers=self.engine.skip_layers, reused=reused[i])
            saved.append(dense.stages["prefill"] - cached.stages["prefill"])
        return {
            "reused_rows": reused,
            "reuse_flops_saved": np.array(saved, dtype=np.int64),
            "reused_fraction": reused.sum(1) / max(rows, 1),
        }

    def unnormalize(self, normalized: np.ndarray) -> np.ndarray:
        """[B, chunk, dim] in [-1, 1] -> robot actions (un-normalized with q01/q99)."""
        return unnormalize(normalized, self.norm_stats[self.unnorm_key]["action"])

    def _embed(self, patches: torch.Tensor, ids: list[torch.Tensor]):
        """Left-pad to a common length: [pad, BOS, visual, text] per sample."""
        embed = self.model.language_model.get_input_embeddings()
        longest = max(len(x) for x in ids)
        pad_id = self.model.language_model.config.pad_token_id or 0
        rows, pads = [], []
        for i, x in enumerate(ids):
            n_pad = longest - len(x)
            e = embed(torch.cat([torch.full((n_pad,), pad_id, device=x.device), x]))
            rows.append(torch.cat([e[: n_pad + 1], patches[i], e[n_pad + 1 :]]))
            pads.append(n_pad)
        return torch.stack(rows), torch.tensor(pads, device=patches.device)

    def _select(
        self, ctx: PrefillContext, sem_layer: int, report: dict
    ) -> torch.Tensor | PruneDecision | None:
        """The pruning hook at layer K: scores for the pruner, its choice per batch slot."""
        b = ctx.embeds.shape[0]
        return select_tokens(
            ctx,
            self._pruner,
            self.prune_config,
            sem_layer,
            self._histories[:b],
            self._rngs[:b],
            self._steps[:b],
            report,
        )

    # -- persistence --------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """OpenVLA's Hugging Face layout, with upstream's weight names and config fields."""
        from .models.checkpoints import save_openvla

        return save_openvla(self.model, self.tokenizer, self.norm_stats, Path(path))


def _np(x: torch.Tensor | None, i: int) -> np.ndarray | None:
    if x is None:
        return None
    x = x[i].cpu()
    return (x.float() if x.is_floating_point() else x).numpy()

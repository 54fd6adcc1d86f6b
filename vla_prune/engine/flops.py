"""Analytic FLOPs of one control step, per stage and per decoder layer.

Conventions (1 multiply-add = 2 FLOPs): linear layers 2·in·out per token; attention
4·T_q·T_k·d per layer (scores + weighted sum, the full square as dense kernels compute it).
Only what our engine runs is counted: each ViT stops after its second-to-last block, and the
LM head runs for the last position only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..models.arch import VLAConfig
from ..models.vit import ViTConfig


def vit_flops(cfg: ViTConfig) -> int:
    n = cfg.num_patches + int(cfg.class_token) + cfg.reg_tokens
    d, m = cfg.width, cfg.mlp_dim
    patch = 2 * cfg.num_patches * 3 * cfg.patch**2 * d
    block = 2 * n * (4 * d * d + 2 * d * m) + 4 * n * n * d
    return patch + (cfg.depth - 1) * block


def projector_flops(cfg: VLAConfig) -> int:
    v, d = cfg.vision_dim, cfg.llm_dim
    return 2 * cfg.num_patches * (v * 4 * v + 4 * v * d + d * d)


def _llm_dims(cfg: VLAConfig) -> tuple[int, int, int, int]:
    llm = cfg.llm
    d = llm["hidden_size"]
    heads = llm["num_attention_heads"]
    kv_dim = llm.get("num_key_value_heads", heads) * (d // heads)
    return d, kv_dim, llm["intermediate_size"], llm["vocab_size"]


def layer_flops(cfg: VLAConfig, t_q: int, t_k: int) -> int:
    """One decoder layer: t_q new rows attending to t_k keys."""
    d, kv, f, _ = _llm_dims(cfg)
    linear = 2 * t_q * (2 * d * d + 2 * d * kv + 3 * d * f)
    return linear + 4 * t_q * t_k * d


@dataclass
class StepFlops:
    vision: int
    projector: int
    prefill_layers: list[int]
    decode_layers: list[int]  # summed over the decode steps
    lm_head: int  # prefill's last position + each decode step
    decode_steps: int = 0
    action_head: int = 0  # a diffusion head's sampling (CogACT)
    stages: dict[str, int] = field(init=False)

    def __post_init__(self):
        self.stages = {
            "vision": self.vision,
            "projector": self.projector,
            "prefill": sum(self.prefill_layers),
            "decode": sum(self.decode_layers),
            "lm_head": self.lm_head,
        }
        if self.action_head:
            self.stages["action_head"] = self.action_head

    @property
    def total(self) -> int:
        return sum(self.stages.values())


def step_flops(
    cfg: VLAConfig,
    prompt_tokens: int,
    kept_visual: int | None = None,
    prune_layer: int | None = None,
    decode_steps: int | None = None,
    skip_layers: frozenset[int] = frozenset(),
    lm_head: bool = True,
    reused: Sequence[int] | None = None,
) -> StepFlops:
    """FLOPs of one OpenVLA step. prompt_tokens counts the text ids including BOS.
    lm_head=False: a head that reads the final hidden state (CogACT) skips the vocabulary.
    reused: per decoder layer, visual rows the prefill took from the previous step's K/V
    (VLA-Cache): they are neither projected nor MLP'd, but stay keys for the others."""
    n_vis = cfg.num_patches
    t_full = prompt_tokens + n_vis
    kept = n_vis if kept_visual is None else kept_visual
    t_kept = t_full - n_vis + kept
    k = cfg.num_layers if prune_layer is None else prune_layer
    steps = cfg.action_dim - 1 if decode_steps is None else decode_steps
    prefill, decode = [], []
    for layer in range(cfg.num_layers):
        if layer in skip_layers:
            prefill.append(0)
            decode.append(0)
            continue
        t = t_full if layer < k else t_kept
        prefill.append(layer_flops(cfg, t - (reused[layer] if reused is not None else 0), t))
        decode.append(sum(layer_flops(cfg, 1, t + i + 1) for i in range(steps)))
    d, _, _, vocab = _llm_dims(cfg)
    head = 2 * d * vocab * (1 + steps) if lm_head else 0
    vision = vit_flops(cfg.dino) + vit_flops(cfg.siglip)
    return StepFlops(vision, projector_flops(cfg), prefill, decode, head, steps)

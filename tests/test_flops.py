"""Analytic FLOPs vs torch's FlopCounterMode on the tiny model.

FlopCounterMode does not count CPU SDPA, so the test subtracts the attention term
(4·T_q·T_k·d per layer), computed here by hand, and expects exact equality for the rest.
"""

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import vla_prune
from vla_prune import PruneConfig
from vla_prune.engine.flops import step_flops


def counted(fn):
    with FlopCounterMode(display=False) as fc:
        out = fn()
    return fc.get_total_flops(), out


def test_flops_match_torch_counter_dense_and_pruned():
    policy = vla_prune.build_policy("tiny-openvla")
    cfg = policy.config
    inputs = policy.prepare(np.zeros((224, 224, 3), np.uint8), "pick up the red block")
    n_text = inputs["input_ids"].shape[1]
    t = n_text + 256
    d = cfg.llm_dim
    layers = cfg.num_layers

    f = step_flops(cfg, n_text)
    vit_attn = sum(
        4 * (v.num_patches + v.reg_tokens + v.class_token) ** 2 * v.width * (v.depth - 1)
        for v in (cfg.dino, cfg.siglip)
    )
    got, feats = counted(lambda: policy.model.vision_backbone(inputs["pixel_values"]))
    assert got == f.vision - vit_attn
    got, _ = counted(lambda: policy.model.projector(feats))
    assert got == f.projector

    embeds = policy.model.embed_inputs(inputs["pixel_values"], inputs["input_ids"])
    engine = policy.engine
    head = f.lm_head // cfg.action_dim
    for kept, k_layer in [(None, None), (64, 1), (32, 3)]:
        f = step_flops(cfg, n_text, kept, k_layer)
        t_kept = t if kept is None else t - 256 + kept
        hook = None if kept is None else (lambda ctx, kept=kept: torch.arange(kept)[None])
        got, pre = counted(
            lambda k_layer=k_layer, hook=hook: engine.prefill(
                embeds, torch.zeros(1, dtype=torch.long), 7, prune_layer=k_layer, prune_hook=hook
            )
        )
        k = layers if k_layer is None else k_layer
        attn = 4 * d * (k * t * t + (layers - k) * t_kept * t_kept)
        assert got == f.stages["prefill"] + head - attn
        tok = pre.output.argmax(-1)

        def decode(tok=tok):
            for _ in range(cfg.action_dim - 1):
                lg = engine.decode(tok).logits
            return lg

        got, _ = counted(decode)
        attn = sum(
            4 * d * ((t if i < k else t_kept) + s + 1)
            for i in range(layers)
            for s in range(cfg.action_dim - 1)
        )
        assert got == f.stages["decode"] + head * (cfg.action_dim - 1) - attn


def test_openvla_7b_flops_in_the_published_range():
    """FACTS.md: vision 384 G (all 24/27 blocks), projector 37 G, prefill 3.69 T (logits for
    every position). We run one block less per ViT and logits for the last row only."""
    cfg = vla_prune.build_policy("openvla-7b").config
    f = step_flops(cfg, 20)
    assert 360e9 < f.vision < 384e9
    assert abs(f.projector - 36.5e9) < 0.1e9
    assert 3.55e12 < f.stages["prefill"] < 3.69e12
    pruned = step_flops(cfg, 20, kept_visual=64, prune_layer=3)
    assert pruned.stages["prefill"] < 0.4 * f.stages["prefill"]
    assert PruneConfig().resolve_layers(cfg.num_layers) == (3, 2, 15)

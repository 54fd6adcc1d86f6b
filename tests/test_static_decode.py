"""The static-shape decode step (engine/static_decode.py) against the eager engine.

Eager stays the reference: static (whole-cache attention with a validity mask, fused
projections) and compiled must give identical action tokens and logits within fp32 round-off,
over pruning budgets, instruction lengths, batches with left padding and a layer-skip set —
and the compiled one with a single compilation.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vla_prune
from tests.conftest import INSTRUCTIONS, random_image, tiny_policy
from tests.test_engine_exact import assert_logits_close

CONFIGS = [
    vla_prune.PruneConfig(),
    vla_prune.PruneConfig(method="fastv", keep_ratio=0.5),
    vla_prune.PruneConfig(method="fastv", keep_count=16),
    vla_prune.PruneConfig(method="vla-pruner", keep_ratio=0.25, warmup=1),
]


def _decode_logits(policy, images, instructions):
    """The prefill's logits and each decode step's, for the greedy tokens: [B, 7, V]."""
    out = []
    engine = policy.engine
    prefill, greedy = engine.prefill, engine.greedy_decode

    def spy_prefill(*a, **kw):
        pre = prefill(*a, **kw)
        out.append(pre.output[:, None].clone())
        return pre

    def spy_greedy(*a, **kw):
        dec = greedy(*a, **kw)
        out.append(dec.logits.clone())
        return dec

    engine.prefill, engine.greedy_decode = spy_prefill, spy_greedy
    try:
        results = policy.step_batch(images, instructions)
    finally:
        engine.prefill, engine.greedy_decode = prefill, greedy
    return results, torch.cat(out, dim=1)


def _episode(policy, cfg, skip=None, steps=3, batch=1):
    policy.configure(prune=cfg, skip_layers=skip)
    out = []
    for t in range(steps):
        images = [random_image(10 * t + i) for i in range(batch)]
        instructions = [INSTRUCTIONS[(t + i) % len(INSTRUCTIONS)] for i in range(batch)]
        out.append(_decode_logits(policy, images, instructions))
    return out


def _same(got, want):
    for (r_got, l_got), (r_want, l_want) in zip(got, want):
        for a, b in zip(r_got, r_want):
            assert np.array_equal(a.action_tokens, b.action_tokens)
            assert a.kept_visual_tokens == b.kept_visual_tokens
            if b.action_scores is not None:  # the decode-time probe VLA-Pruner feeds on
                np.testing.assert_allclose(a.action_scores, b.action_scores, rtol=1e-4, atol=1e-7)
            # the prefill's semantic probe: the static layer computes the last row itself (from
            # its fused q/k), eager recomputes it; fp32 round-off of softmax inputs ~1e-6
            assert (a.semantic_scores is None) == (b.semantic_scores is None)
            if b.semantic_scores is not None:
                np.testing.assert_allclose(
                    a.semantic_scores, b.semantic_scores, rtol=1e-4, atol=1e-7
                )
        assert_logits_close(l_got, l_want)


@pytest.mark.parametrize("batch", [1, 2])
def test_static_decode_equals_eager(batch):
    eager, static = tiny_policy(0), tiny_policy(0)
    static.engine.use_static_decode(True, compile=False)
    for cfg in CONFIGS:
        _same(_episode(static, cfg, batch=batch), _episode(eager, cfg, batch=batch))
    _same(_episode(static, CONFIGS[1], skip=[2]), _episode(eager, CONFIGS[1], skip=[2]))


@pytest.mark.slow
def test_compiled_decode_equals_eager_with_one_compilation():
    """Budgets, instruction lengths (INSTRUCTIONS differ in length) and a layer-skip set:
    identical tokens, logits within round-off, and dynamo compiles exactly three graphs — the
    prefill layer (dynamic rows) and the whole greedy decode (static shapes) without and with
    the decode-time attention probe (VLA-Pruner's) — for all of them."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager, compiled = tiny_policy(0), tiny_policy(0)
    compiled.configure(engine=vla_prune.EngineConfig(compile=True))
    for cfg in CONFIGS:
        _same(_episode(compiled, cfg, skip=[3]), _episode(eager, cfg, skip=[3]))
    assert counters["stats"]["unique_graphs"] == 3, dict(counters["stats"])


def test_static_capacity_is_fixed_across_budgets_and_prompts():
    """The static cache has one shape for every budget and instruction (what lets one graph
    serve them all); a prompt that does not fit grows it instead of failing."""
    p = tiny_policy(0)
    p.engine.use_static_decode(True)
    shapes = set()
    for cfg in CONFIGS:
        p.configure(prune=cfg)
        for s, ins in enumerate(INSTRUCTIONS):
            p.step(random_image(s), ins)
            shapes.add(tuple(p.engine.cache.k[0].shape))
    assert len(shapes) == 1
    long = " ".join(["red"] * 185)  # more text rows than the capacity reserves
    p.step(random_image(0), long)
    assert p.engine.cache.k[0].shape[2] > next(iter(shapes))[2]


def test_engine_config_validates_and_weights_only_go_down():
    with pytest.raises(ValueError, match="weights must be one of"):
        vla_prune.EngineConfig(weights="int4")
    with pytest.raises(ValueError, match="compile must be a bool"):
        vla_prune.EngineConfig(compile="yes")
    p = tiny_policy(0)
    p.configure(engine=vla_prune.EngineConfig(weights="int8"))
    assert p.engine_config.weights == "int8"
    with pytest.raises(ValueError, match="load the policy again"):
        p.configure(engine=vla_prune.EngineConfig(weights="fp32"))


@pytest.mark.parametrize("weights", ["bf16", "int8"])
def test_fewer_weight_bytes_agree_with_fp32_on_most_tokens(weights):
    """bf16 / int8 change the numbers (that is the trade); they must stay close: logits within
    a few percent of their range and most action tokens equal. Agreement on real policies is
    measured by bench/engine_speed.py, not asserted here."""
    ref, low = tiny_policy(0), tiny_policy(0)
    low.configure(engine=vla_prune.EngineConfig(weights=weights))
    if weights == "int8":
        from vla_prune.engine.weights import Int8Linear

        layer = low.model.language_model.model.layers[0]
        assert isinstance(layer.self_attn.q_proj, Int8Linear)
        assert layer.self_attn.q_proj.weight_int8.dtype == torch.int8
    agree = total = 0
    for s, ins in enumerate(INSTRUCTIONS):
        (r_ref,), l_ref = _decode_logits(ref, [random_image(s)], [ins])
        (r_low,), _ = _decode_logits(low, [random_image(s)], [ins])
        agree += int((r_ref.action_tokens == r_low.action_tokens).sum())
        total += r_ref.action_tokens.size
        assert r_low.actions.dtype == np.float32
    assert agree / total >= 0.5, f"{weights}: {agree}/{total} tokens agree with fp32"


def test_int8_quantization_error_is_per_channel_bounded():
    from vla_prune.engine.weights import quantize_int8

    w = torch.randn(64, 32) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different size
    q, s = quantize_int8(w)
    err = (q.float() * s[:, None] - w).abs().amax(dim=1)
    assert torch.all(err <= s / 2 + 1e-12)  # rounding: half a step of that row's own scale
    assert q.abs().max() <= 127


def test_int8_prefill_runs_a_bf16_copy_and_decode_the_int8_weights():
    """On a CPU the static engine's prefill (many rows) gets each int8 linear dequantized once
    to bf16; decode keeps the int8 (q, scales) its GEMV kernel reads. The copy is q * scale
    rounded to bf16 (8 significant bits: relative error <= 2^-8)."""
    p = tiny_policy(0)
    p.configure(engine=vla_prune.EngineConfig(weights="int8"))
    p.engine.use_static_decode(True)
    st = p.engine.static
    assert all(isinstance(st.weights[0][i], tuple) for i in (1, 2, 4, 5))
    for layer_w, pre_w in zip(st.weights, st.prefill_weights):
        for w, d in zip(layer_w, pre_w):
            if not isinstance(w, tuple):
                assert d is w  # norms: the same tensor, no copy
                continue
            q, scales = w
            assert d.dtype == torch.bfloat16 and d.shape == q.shape
            torch.testing.assert_close(
                d.float(), q.float() * scales[:, None], rtol=2**-8, atol=0
            )
    results = [p.step(random_image(s), INSTRUCTIONS[0]) for s in range(2)]
    assert all(np.isfinite(r.actions).all() for r in results)


def test_reset_slot_restarts_one_slot_as_slot_zero_of_a_fresh_policy():
    """Batched rollouts: an episode that starts in slot 1 mid-run gets the history and random
    streams an episode alone in a fresh policy gets (random pruning makes that visible)."""
    cfg = vla_prune.PruneConfig(method="random", keep_ratio=0.25)
    alone = tiny_policy(0).configure(prune=cfg)
    want = [alone.step(random_image(s), INSTRUCTIONS[0]).kept_indices for s in range(3)]
    batched = tiny_policy(0).configure(prune=cfg)
    batched.step_batch([random_image(9)] * 2, [INSTRUCTIONS[1]] * 2)  # slot 1 has a past
    batched.reset_slot(1)
    got = [
        batched.step_batch([random_image(9), random_image(s)], [INSTRUCTIONS[1], INSTRUCTIONS[0]])[
            1
        ].kept_indices
        for s in range(3)
    ]
    for a, b in zip(got, want):
        assert np.array_equal(a, b)


def test_cogact_compiled_prefill_equals_eager_and_int8_keeps_the_head_fp32_on_cpu():
    """CogACT runs one prefill and a DiT: the compiled prefill gives the eager one's cognition
    feature (within round-off), hence the same seeded action chunk; int8 leaves the DiT fp32."""
    from tests.conftest import tiny_cogact

    eager, compiled = tiny_cogact(0), tiny_cogact(0)
    compiled.configure(engine=vla_prune.EngineConfig(compile=True))
    for s in range(2):
        a = eager.step(random_image(s), INSTRUCTIONS[s])
        b = compiled.step(random_image(s), INSTRUCTIONS[s])
        # DDIM from identical noise: chunk values move with the feature's round-off only
        np.testing.assert_allclose(b.normalized_actions, a.normalized_actions, atol=1e-4)
    low = tiny_cogact(0).configure(engine=vla_prune.EngineConfig(weights="int8"))
    assert next(low.model.action_model.parameters()).dtype == torch.float32
    assert low.step(random_image(0), INSTRUCTIONS[0]).actions.shape == (16, 7)


def test_a_compiled_engine_raises_dynamos_graph_limit():
    """Several compiled levels in one process (the ROS node's budget levels, a benchmark's
    settings) need more than dynamo's default 8 graphs per function: past the limit a
    fullgraph=True function fails instead of falling back (bench/engine_speed.py hit it)."""
    from vla_prune.engine.static_decode import GRAPHS_PER_PROCESS

    p = tiny_policy(0)
    p.configure(engine=vla_prune.EngineConfig(compile=True))
    assert torch._dynamo.config.recompile_limit >= GRAPHS_PER_PROCESS > 8


def test_cpu_bf16_decode_attention_runs_in_fp32():
    """A CPU's bf16 SDPA is ~4x slower than fp32 for one query row: the decode step attends a
    bf16 cache in fp32 (exact upcast), which agrees with bf16 SDPA within bf16 rounding."""
    import torch.nn.functional as F

    from vla_prune.engine.static_decode import _attend_one_row

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, s, 16, generator=g).bfloat16() for s in (1, 40, 40))
    mask = torch.ones(2, 1, 1, 40, dtype=torch.bool)
    mask[1, ..., 30:] = False  # sample 1: the rest of its cache is not written yet
    got = _attend_one_row(q, k, v, mask, False)
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want.bfloat16())
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    # bf16 keeps 8 significant bits: outputs (|x| <~ 2) within a few bf16 steps
    torch.testing.assert_close(got.float(), ref.float(), rtol=0, atol=3e-2)

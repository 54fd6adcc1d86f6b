"""The probe (q_proj + rotary against cached keys) equals eager attention's weights."""

import copy

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from tests.conftest import random_image, tiny_policy
from vla_prune.engine.attention_probe import attention_from_queries, query_rows, to_visual
from vla_prune.engine.rope import apply_rope

EPS32 = torch.finfo(torch.float32).eps  # 1.19e-7, one ulp at 1.0
# Probe vs eager softmax. The logits s = q.k/sqrt(d) of these prompts stay below 32 (max |s| over
# all rows and layers: 31.9). Two correct fp32 implementations (q_proj over R rows vs all T,
# differently blocked dot products) round them ~4 ulp apart, |ds| <= 4*32*eps, and softmax turns
# an absolute logit error ds into a relative probability error <= 2|ds|: rtol = 2*4*32*eps =
# 3.05e-5 (worst seen: 1.15e-5). atol = float32's smallest normal: only underflowed (subnormal)
# probabilities lose relative precision. The exactness and the wrong-variant tests both use it.
PROB_TOL = {"rtol": 2 * 4 * 32 * EPS32, "atol": torch.finfo(torch.float32).tiny}


def assert_probs_close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, **PROB_TOL)


def gross_excess(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| over the loosest allowance PROB_TOL gives any entry (that of the largest
    probability): < 1 is within round-off, > 100 is a real difference."""
    allowance = PROB_TOL["atol"] + PROB_TOL["rtol"] * want.abs().max().item()
    return (got - want).abs().max().item() / allowance


def eager_attentions(lm, embeds):
    cfg = copy.deepcopy(lm.config)
    cfg._attn_implementation = "eager"
    ref = LlamaForCausalLM(cfg).eval()
    ref.load_state_dict(lm.state_dict())
    with torch.no_grad():
        return ref(inputs_embeds=embeds, output_attentions=True).attentions


def _embeds(policy, image, instruction):
    inputs = policy.prepare(image, instruction)
    with torch.no_grad():
        return policy.model.embed_inputs(inputs["pixel_values"], inputs["input_ids"])


def eager_layer_weights(lm, layer, hidden_in):
    """transformers' eager attention weights of one layer for a given layer input."""
    cfg = copy.deepcopy(lm.config)
    cfg._attn_implementation = "eager"
    attn = type(lm.model.layers[layer].self_attn)(cfg, layer).eval()
    attn.load_state_dict(lm.model.layers[layer].self_attn.state_dict())
    t = hidden_in.shape[1]
    pos = torch.arange(t)[None]
    causal = torch.full((t, t), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        x = lm.model.layers[layer].input_layernorm(hidden_in)
        _, weights = attn(x, position_embeddings=lm.model.rotary_emb(x, pos), attention_mask=causal)
    return weights


def test_prefill_probe_matches_eager():
    policy = tiny_policy(3)
    embeds = _embeds(policy, random_image(3), "pick up the red block")
    t = embeds.shape[1]
    engine = policy.engine
    ctx = engine.prefill(
        embeds, torch.zeros(1, dtype=torch.long), 7, record_layers=(0, 1, 2, 3)
    ).context
    lm = policy.model.language_model
    rows = torch.tensor([[t - 1, t - 5, 0, 100, 257]])  # last token, a text row, BOS, visual rows
    # layer 0: against the whole eager model (identical inputs)
    want0 = eager_attentions(lm, embeds)[0][:, :, rows[0], 1:257]
    assert_probs_close(ctx.attention(0, rows), want0)
    # every layer: against eager attention on the same layer input our engine saw
    for layer in range(4):
        got = ctx.attention(layer, rows)  # [1, H, R, 256]
        want = eager_layer_weights(lm, layer, ctx.hidden_in[layer])[:, :, rows[0], 1:257]
        assert_probs_close(got, want)


def test_decode_probe_matches_eager():
    policy = tiny_policy(4)
    embeds = _embeds(policy, random_image(4), "press the yellow button")
    lm = policy.model.language_model
    engine = policy.engine
    # capture the inputs our engine feeds layer 2 (prefill rows, then the decoded token)
    seen = []
    handle = lm.model.layers[2].input_layernorm.register_forward_pre_hook(
        lambda mod, args: seen.append(args[0].clone())
    )
    try:
        logits = engine.prefill(embeds, torch.zeros(1, dtype=torch.long), 7).output
        tok = logits.argmax(-1)
        probe0 = engine.decode(tok, probe_layer=0).probe  # [1, H, 256]
        seen.clear()
        engine.prefill(embeds, torch.zeros(1, dtype=torch.long), 7)
        probe2 = engine.decode(tok, probe_layer=2).probe
    finally:
        handle.remove()
    full = torch.cat([embeds, lm.model.embed_tokens(tok[:, None])], dim=1)
    want0 = eager_attentions(lm, full)[0][:, :, -1, 1:257]
    assert_probs_close(probe0, want0)
    # seen: the prefill rows, the decoded token, then the probe's own recompute of that token
    layer_in = torch.cat(seen, dim=1)[:, : full.shape[1]]
    want2 = eager_layer_weights(lm, 2, layer_in)[:, :, -1, 1:257]
    assert_probs_close(probe2, want2)


def test_probe_after_pruning_zeroes_dropped_tokens():
    policy = tiny_policy(5)
    embeds = _embeds(policy, random_image(5), "press the yellow button")
    kept = torch.tensor(np.sort(np.random.default_rng(0).choice(256, 40, replace=False)))
    engine = policy.engine
    logits = engine.prefill(
        embeds,
        torch.zeros(1, dtype=torch.long),
        7,
        prune_layer=1,
        prune_hook=lambda ctx: kept[None],
    ).output
    probe = engine.decode(logits.argmax(-1), probe_layer=3).probe
    dropped = torch.ones(256, dtype=torch.bool)
    dropped[kept] = False
    assert probe[..., dropped].abs().max().item() == 0.0
    assert probe[..., kept].min().item() > 0.0
    assert probe.sum(-1).max().item() < 1.0  # the rest of the mass sits on BOS/text keys


def test_prefill_probe_after_the_pruning_point():
    """Row -1 (the last prompt token) probed at a layer after K sees only kept visual keys."""
    policy = tiny_policy(6)
    embeds = _embeds(policy, random_image(6), "press the yellow button")
    kept = torch.arange(0, 256, 4)
    engine = policy.engine
    ctx = engine.prefill(
        embeds,
        torch.zeros(1, dtype=torch.long),
        7,
        prune_layer=1,
        prune_hook=lambda ctx: kept[None],
        record_layers=(3,),
    ).context
    assert ctx.hidden_in[3].shape[1] == embeds.shape[1] - 256 + 64
    got = ctx.attention(3, torch.tensor([[-1]]))[0, :, 0]  # [H, 256]
    # eager attention of layer 3 on the same (pruned) layer input, last row, kept columns
    lm = policy.model.language_model
    cfg = copy.deepcopy(lm.config)
    cfg._attn_implementation = "eager"
    attn = type(lm.model.layers[3].self_attn)(cfg, 3).eval()
    attn.load_state_dict(lm.model.layers[3].self_attn.state_dict())
    h, pos = ctx.hidden_in[3], ctx.positions_in[3]
    t = h.shape[1]
    causal = torch.full((t, t), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        x = lm.model.layers[3].input_layernorm(h)
        _, w = attn(x, position_embeddings=lm.model.rotary_emb(x, pos), attention_mask=causal)
    want = torch.zeros_like(got)
    want[:, kept] = w[0, :, -1, 1 : 1 + 64]
    assert_probs_close(got, want)


# -- the tolerance still catches real bugs --------------------------------------------------------


@torch.inference_mode()
def _probe_variant(ctx, layer, rows, q_shift=0, k_shift=0, head_shift=0):
    """The prefill probe of `rows` at `layer`, rebuilt from its parts, optionally wrong: RoPE of
    the query (or of every cached key) at position + shift, or head h reading head h + shift."""
    engine = ctx.engine
    lm = engine.lm
    hidden = ctx.hidden_in[layer]
    h = hidden.gather(1, rows[..., None].expand(-1, -1, hidden.shape[-1]))
    pos = ctx.positions_in[layer].gather(1, rows)
    q = query_rows(lm.model.layers[layer], lm.model.rotary_emb, h, pos + q_shift, engine.num_heads)
    cache = copy.copy(engine.cache)
    if k_shift:  # RoPE is a rotation by position: R(p + s) k = R(s) R(p) k
        k = cache.k[layer]
        cos, sin = lm.model.rotary_emb(k, torch.full((1, k.shape[2]), k_shift))
        cache.k = list(cache.k)
        cache.k[layer] = apply_rope(k, cos, sin)
    attn = attention_from_queries(q, cache, layer, pos)  # causal mask by the true positions
    return to_visual(attn, cache, layer, engine.num_visual).roll(-head_shift, dims=1)


@pytest.mark.parametrize(
    "wrong",
    [{"q_shift": 1}, {"q_shift": -1}, {"k_shift": 1}, {"head_shift": 1}, {"head_shift": 2}],
    ids=["query-pos+1", "query-pos-1", "key-pos+1", "head+1", "head+2"],
)
def test_off_by_one_position_or_wrong_head_fails_the_tolerance(wrong):
    policy = tiny_policy(3)
    embeds = _embeds(policy, random_image(3), "pick up the red block")
    t = embeds.shape[1]
    engine = policy.engine
    ctx = engine.prefill(embeds, torch.zeros(1, dtype=torch.long), 7, record_layers=(0, 2)).context
    lm = policy.model.language_model
    rows = torch.tensor([[t - 1, t - 5, 100, 257]])  # last token, a text row, visual rows
    for layer in (0, 2):
        want = eager_layer_weights(lm, layer, ctx.hidden_in[layer])[:, :, rows[0], 1:257]
        right = _probe_variant(ctx, layer, rows)  # control: the same rebuild, unshifted, passes
        assert_probs_close(right, want)
        assert gross_excess(right, want) < 1
        bad = _probe_variant(ctx, layer, rows, **wrong)
        with pytest.raises(AssertionError, match="not close"):
            assert_probs_close(bad, want)
        assert gross_excess(bad, want) > 100  # far outside round-off, not at its edge

"""Pruning at layer K == running layers >= K on the kept subsequence with original positions.

The reference here is written independently of our engine: transformers' own decoder layers,
called one by one, with transformers' DynamicCache (which holds a different length per layer).
"""

import numpy as np
import pytest
import torch
from transformers import DynamicCache

import vla_prune
from tests.conftest import random_image, tiny_policy
from tests.test_engine_exact import assert_logits_close


def reference_pruned(policy, image, instruction, k_layer, kept, skip=()):
    lm = policy.model.language_model
    inputs = policy.prepare(image, instruction)
    with torch.no_grad():
        embeds = policy.model.embed_inputs(inputs["pixel_values"], inputs["input_ids"])
        t = embeds.shape[1]
        pos = torch.arange(t)[None]
        rows = torch.cat([torch.tensor([0]), 1 + torch.tensor(kept), torch.arange(257, t)])
        cache = DynamicCache()
        h = embeds
        layers = [(i, x) for i, x in enumerate(lm.model.layers) if i not in skip]
        for i, layer in layers:
            if i == k_layer:
                h, pos = h[:, rows], pos[:, rows]
            h = _run(layer, lm, h, pos, cache)
        tokens, logits = [], []
        step_logits = lm.lm_head(lm.model.norm(h[:, -1]))
        next_pos = t
        for _ in range(policy.config.action_dim):
            logits.append(step_logits[0])
            tok = step_logits.argmax(-1)
            tokens.append(int(tok))
            if len(tokens) == policy.config.action_dim:
                break
            h = lm.model.embed_tokens(tok[:, None])
            p = torch.tensor([[next_pos]])
            for _, layer in layers:
                h = _run(layer, lm, h, p, cache)
            step_logits = lm.lm_head(lm.model.norm(h[:, -1]))
            next_pos += 1
    return np.array(tokens), torch.stack(logits)


def _run(layer, lm, h, pos, cache):
    cos_sin = lm.model.rotary_emb(h, pos)
    out = layer(
        h,
        attention_mask=None,
        position_ids=pos,
        cache=cache,  # transformers 5.x name (past_key_values is deprecated, gone in 5.40)
        use_cache=True,
        position_embeddings=cos_sin,
    )
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("seed,k_layer", [(0, 1), (1, 2), (2, 3)])
def test_pruned_equals_independent_reference(seed, k_layer):
    policy = tiny_policy(seed)
    rng = np.random.default_rng(seed)
    kept = np.sort(rng.choice(256, size=64, replace=False))
    image, instruction = random_image(seed), "push the blue cube onto the green pad"
    ref_tokens, ref_logits = reference_pruned(policy, image, instruction, k_layer, kept)

    policy.configure(
        prune=vla_prune.PruneConfig(method="fixed", indices=tuple(kept), layer=k_layer)
    )
    result = policy.step(image, instruction)
    assert result.kept_visual_tokens == 64
    assert (result.kept_indices == kept).all()
    assert (result.action_tokens == ref_tokens).all()

    # logits of every step, through our engine with the same kept set
    inputs = policy.prepare(image, instruction)
    with torch.no_grad():
        embeds = policy.model.embed_inputs(inputs["pixel_values"], inputs["input_ids"])
    engine = policy.engine
    pre = engine.prefill(
        embeds,
        torch.zeros(1, dtype=torch.long),
        7,
        prune_layer=k_layer,
        prune_hook=lambda ctx: torch.tensor(kept)[None],
    )
    logits = pre.output
    ours = [logits[0]]
    for tok in ref_tokens[:-1]:
        logits = engine.decode(torch.tensor([tok])).logits
        ours.append(logits[0])
    assert_logits_close(torch.stack(ours), ref_logits)
    # layers before K hold the whole prefill, layers from K on only the kept rows (+ decode)
    t = embeds.shape[1]
    assert engine.cache.length[k_layer - 1] == t + 6
    assert engine.cache.length[k_layer] == t - 256 + 64 + 6


def test_pruning_changes_the_output():
    """Guard: the reference is sensitive to which tokens are kept."""
    policy = tiny_policy(0)
    image, instruction = random_image(0), "press the yellow button"
    a, _ = reference_pruned(policy, image, instruction, 1, np.arange(0, 32))
    b, _ = reference_pruned(policy, image, instruction, 1, np.arange(224, 256))
    assert not (a == b).all()

"""The query-attention objective: its scores are the layer's own, and training moves them."""

import numpy as np
import pytest
import torch

import vla_prune
from sim.query_attention import attention_mass_loss, capture_layer_input, query_attention
from sim.train import TrainConfig, check_config, last_hidden
from vla_prune.preprocess import image_to_pixels

pytestmark = pytest.mark.sim


def _inputs(policy, seed=0):
    rng = np.random.default_rng(seed)
    pc = policy.config
    pixels = torch.cat(
        [
            image_to_pixels(
                rng.integers(0, 256, (128, 128, 3), dtype=np.uint8),
                pc.image_size,
                pc.image_means,
                pc.image_stds,
            )
            for _ in range(2)
        ]
    )
    # two instruction lengths: the shorter sequence is right-padded
    prompts = [
        policy.token_ids("push the red cube"),
        policy.token_ids("pick up the small blue ball"),
    ]
    return pixels, prompts


def test_query_attention_is_the_layers_own_attention():
    policy = vla_prune.build_policy("tiny-openvla-112", seed=0)
    lm = policy.model.language_model.model
    layer_idx = 1
    pixels, prompts = _inputs(policy)
    with torch.no_grad(), capture_layer_input(lm.layers[layer_idx]) as seen:
        _, lengths = last_hidden(policy, pixels, prompts)
        ours = query_attention(lm.layers[layer_idx], seen, lengths, lm.config.num_attention_heads)
    assert lengths[0] != lengths[1]
    # reference: the model's own eager attention weights (output_attentions), same inputs
    lm.set_attn_implementation("eager")
    embeds_mask = {}

    def grab(module, args, kwargs):
        embeds_mask["embeds"] = kwargs["inputs_embeds"]
        embeds_mask["mask"] = kwargs["attention_mask"]

    hooks = lm.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        last_hidden(policy, pixels, prompts)
    hooks.remove()
    with torch.no_grad():
        out = lm(
            inputs_embeds=embeds_mask["embeds"],
            attention_mask=embeds_mask["mask"],
            output_attentions=True,
        )
    ref = out.attentions[layer_idx]  # [B, H, L, L]
    for b, n in enumerate(lengths):
        # float32 softmax of the same scores, computed in a different order: round-off only
        torch.testing.assert_close(ours[b, :, :n], ref[b, :, n - 1, :n], atol=1e-6, rtol=1e-5)
        assert torch.all(ours[b, :, n:] == 0)  # padding gets nothing


def test_attention_mass_loss_trains_heads_towards_their_role():
    policy = vla_prune.build_policy("tiny-openvla-112", seed=0)
    lm = policy.model.language_model.model
    layer = lm.layers[1]
    pixels, prompts = _inputs(policy, seed=1)
    masks = torch.zeros(2, 3, 64, dtype=torch.bool)
    masks[0, 0, 5] = masks[0, 1, 40] = masks[0, 2, 63] = True
    masks[1, 0, 17] = masks[1, 1, 18] = masks[1, 2, 0] = True
    opt = torch.optim.Adam(policy.model.parameters(), lr=3e-3)
    masses = []
    for _ in range(15):
        with capture_layer_input(layer) as seen:
            _, lengths = last_hidden(policy, pixels, prompts)
            attn = query_attention(layer, seen, lengths, lm.config.num_attention_heads)
        loss, mass = attention_mass_loss(attn, masks)
        masses.append(mass)
        opt.zero_grad()
        loss.backward()
        opt.step()
    # each supervised head concentrates on its own patch (1 patch of ~75 rows: ~0.013 at start)
    assert torch.all(masses[0] < 0.1) and torch.all(masses[-1] > 3 * masses[0])


def test_attention_weight_needs_the_grounding_scenes_and_a_real_layer():
    base = dict(data="d", out="o", attn_weight=1.0)
    with pytest.raises(ValueError, match="--ground-weight"):
        check_config(TrainConfig(**base), num_layers=4, num_heads=4)
    with pytest.raises(ValueError, match="--attn-layer 4"):
        check_config(TrainConfig(**base, ground_weight=1.0, attn_layer=4), 4, 4)
    with pytest.raises(ValueError, match="heads"):
        check_config(TrainConfig(**base, ground_weight=1.0), 4, 2)
    check_config(TrainConfig(**base, ground_weight=1.0), 4, 4)  # fine
    with pytest.raises(ValueError, match="--readout-weight"):  # no layer after the last
        check_config(TrainConfig(**base, ground_weight=1.0, attn_layer=3, readout_weight=1.0), 4, 4)
    with pytest.raises(ValueError, match="--offset-weight"):
        check_config(TrainConfig(data="d", out="o", offset_weight=1.0), 4, 4)

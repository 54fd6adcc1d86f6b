"""Architecture facts: shapes, parameter counts, OpenVLA's token <-> bin arithmetic."""

import numpy as np
import pytest
import torch

import vla_prune
from vla_prune.models.openvla import ActionTokenizer, build_prompt, unnormalize
from vla_prune.models.tokenizer import build_word_tokenizer
from vla_prune.models.vit import VisionTransformer, ViTConfig


def test_openvla_7b_parameter_count_on_meta():
    policy = vla_prune.build_policy("openvla-7b")
    params = list(policy.model.parameters())
    assert all(p.is_meta for p in params)  # nothing allocated
    assert sum(p.numel() for p in params) == 7_541_237_184
    lm = policy.model.language_model.config
    assert (lm.num_hidden_layers, lm.hidden_size, lm.intermediate_size, lm.vocab_size) == (
        32,
        4096,
        11008,
        32064,
    )


def test_fused_backbone_shapes_on_meta():
    model = vla_prune.build_policy("openvla-7b").model
    with torch.device("meta"):
        feats = model.vision_backbone(torch.empty(2, 6, 224, 224))
        assert feats.shape == (2, 256, 2176)
        assert model.projector(feats).shape == (2, 256, 4096)


def test_timm_parameter_names():
    names = set(vla_prune.build_policy("openvla-7b").model.state_dict())
    for n in [
        "vision_backbone.featurizer.patch_embed.proj.weight",
        "vision_backbone.featurizer.cls_token",
        "vision_backbone.featurizer.reg_token",
        "vision_backbone.featurizer.pos_embed",
        "vision_backbone.featurizer.blocks.23.ls1.scale_factor",
        "vision_backbone.featurizer.blocks.0.attn.qkv.weight",
        "vision_backbone.featurizer.blocks.0.mlp.fc2.bias",
        "vision_backbone.featurizer.norm.weight",
        "vision_backbone.fused_featurizer.blocks.26.attn.proj.weight",
        "vision_backbone.fused_featurizer.attn_pool.kv.weight",
        "projector.fc1.weight",
        "projector.fc2.weight",
        "projector.fc3.weight",
        "language_model.model.layers.31.self_attn.q_proj.weight",
        "language_model.lm_head.weight",
    ]:
        assert n in names, n
    assert "vision_backbone.fused_featurizer.cls_token" not in names


def test_vit_uses_second_to_last_block():
    torch.manual_seed(0)
    cfg = ViTConfig(32, 3, 2, 64, image_size=56, reg_tokens=4, layer_scale=True)
    vit = VisionTransformer(cfg).eval()
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        out = vit(x)
        assert out.shape == (1, 16, 32)  # patches only: cls + 4 registers dropped
        vit.blocks[2].mlp.fc2.weight.add_(1.0)  # last block: never run
        vit.norm.weight.add_(1.0)  # final norm: not applied
        assert torch.equal(vit(x), out)
        # second-to-last block: its output is what we return
        vit.blocks[1].ls2.scale_factor.add_(1.0)
        assert not torch.allclose(vit(x), out)


def test_action_token_arithmetic_by_hand():
    at = ActionTokenizer(32000, 256)
    assert at.first_action_id == 31744
    bins = np.linspace(-1, 1, 256)
    # 0.0 lies in [bins[127], bins[128]) -> digitize 128 -> id 31872 -> center of bins 127/128
    assert at.encode(np.array([0.0]))[0] == 31872
    assert at.decode(np.array([31872]))[0] == np.float32((bins[127] + bins[128]) / 2)
    # d = 32000 - id; index = clip(d - 1, 0, 254)
    assert at.decode(np.array([31999]))[0] == np.float32((bins[0] + bins[1]) / 2)
    assert at.decode(np.array([31744]))[0] == np.float32((bins[254] + bins[255]) / 2)
    assert at.decode(np.array([100]))[0] == np.float32((bins[254] + bins[255]) / 2)  # clipped
    x = np.linspace(-0.99, 0.99, 50)
    assert np.abs(at.decode(at.encode(x)) - x).max() <= 2 / 255 + 1e-6


def test_unnormalize_by_hand():
    stats = {"q01": [0.0, -2.0, 1.0], "q99": [1.0, 2.0, 3.0], "mask": [True, True, False]}
    out = unnormalize(np.array([[-1.0, 0.5, 0.7]], np.float32), stats)
    np.testing.assert_allclose(out, [[0.0, 1.0, 0.7]], atol=1e-7)


def test_prompt_and_word_tokenizer():
    assert build_prompt("Pick up the RED block") == (
        "In: What action should the robot take to pick up the red block?\nOut:"
    )
    tok = build_word_tokenizer(512)
    assert len(tok) == 512
    assert tok.convert_ids_to_tokens(511) == "<act_255>"
    assert tok.convert_ids_to_tokens(256) == "<act_0>"
    ids = tok(build_prompt("push the blue cube onto the green pad")).input_ids
    assert ids[0] == 1 and tok.unk_token_id not in ids and max(ids) < 256
    with pytest.raises(ValueError, match="too small"):
        build_word_tokenizer(300)


def test_tiny_preset_has_real_token_count():
    """256 visual tokens like the real model, 4 decoder layers."""
    policy = vla_prune.build_policy("tiny-openvla")
    assert policy.config.num_patches == 256 and policy.config.num_layers == 4

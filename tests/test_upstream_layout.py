"""Checkpoints in exactly upstream's layouts, built here from upstream's naming rules (not by
our save()), load and act like the same weights built directly.

OpenVLA (Hugging Face): openvla/openvla vla-scripts/extern/convert_openvla_weights_to_hf.py
(`remap_state_dicts_for_hf`, `hf_model.save_pretrained(max_shard_size="7GB")`: 3 shards for
openvla-7b), prismatic/extern/hf/configuration_prismatic.py (OpenVLAConfig's fields) and
processing_prismatic.py (PrismaticImageProcessor's fields).
CogACT (.pt): microsoft/CogACT training/strategies/fsdp.py `save_checkpoint` ({"model": {group:
state_dict}}, the "vlm." prefix stripped) and vla/cogactvla.py (groups vision_backbone /
projector / llm_backbone / action_model; timm ViTs keep LayerScale's `.gamma`).

Real timm ids / base VLM ids name 7 B shapes; the tiny fixtures rebind those ids to tiny shapes
(monkeypatch on our lookup tables), so the code path of a real checkpoint runs on a CPU.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import vla_prune
from tests.conftest import random_image, scramble, tiny_cogact
from vla_prune.cogact import CogACTPolicy
from vla_prune.models import checkpoints as ckpt
from vla_prune.models import cogact_checkpoints as cogact_ckpt
from vla_prune.models.arch import DINO_MEAN, DINO_STD, SIGLIP_MEAN, SIGLIP_STD, VLAConfig
from vla_prune.models.checkpoints import CheckpointError
from vla_prune.models.presets import get_preset
from vla_prune.models.prismatic import OpenVLAModel
from vla_prune.models.tokenizer import build_word_tokenizer
from vla_prune.policy import Policy

DINO_ID = "vit_large_patch14_reg4_dinov2.lvd142m"
SIGLIP_ID = "vit_so400m_patch14_siglip_224"
INSTRUCTIONS = ["pick up the red block", "press the yellow button"]
STATS = {  # dataset_statistics.json as OpenVLA ships it (more fields than we read)
    "bridge_orig": {
        "action": {
            "mean": [0.0] * 7,
            "std": [1.0] * 7,
            "max": [1.0] * 7,
            "min": [-1.0] * 7,
            "q01": [-0.3] * 7,
            "q99": [0.4] * 7,
            "mask": [True] * 6 + [False],
        },
        "proprio": {"mean": [0.0] * 7, "std": [0.0] * 7, "q01": [0.0] * 7, "q99": [0.0] * 7},
        "num_transitions": 2135463,
        "num_trajectories": 60064,
    }
}


# -- upstream's naming rules, written out -------------------------------------------------------


def timm_vit(width: int, depth: int, mlp: int, *, dino: bool, ls: str = "gamma") -> dict:
    """timm VisionTransformer(num_classes=0) names -> shapes. dino: DINOv2 reg4 (class token,
    4 registers, LayerScale named `ls`); else SigLIP (no class token, attention-pool head)."""
    d = width
    out = {"patch_embed.proj.weight": (d, 3, 14, 14), "patch_embed.proj.bias": (d,)}
    if dino:
        out |= {"cls_token": (1, 1, d), "reg_token": (1, 4, d)}
    out["pos_embed"] = (1, 256, d)  # 224 / 14 = 16 x 16 patches, no embedding for the prefix
    for i in range(depth):
        b = f"blocks.{i}."
        out |= {b + "norm1.weight": (d,), b + "norm1.bias": (d,)}
        out |= {b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,)}
        out |= {b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,)}
        if dino:
            out[b + f"ls1.{ls}"] = (d,)
        out |= {b + "norm2.weight": (d,), b + "norm2.bias": (d,)}
        out |= {b + "mlp.fc1.weight": (mlp, d), b + "mlp.fc1.bias": (mlp,)}
        out |= {b + "mlp.fc2.weight": (d, mlp), b + "mlp.fc2.bias": (d,)}
        if dino:
            out[b + f"ls2.{ls}"] = (d,)
    out |= {"norm.weight": (d,), "norm.bias": (d,)}
    if not dino:
        a = "attn_pool."
        out |= {a + "latent": (1, 1, d), a + "q.weight": (d, d), a + "q.bias": (d,)}
        out |= {a + "kv.weight": (2 * d, d), a + "kv.bias": (2 * d,)}
        out |= {a + "proj.weight": (d, d), a + "proj.bias": (d,)}
        out |= {a + "norm.weight": (d,), a + "norm.bias": (d,)}
        out |= {a + "mlp.fc1.weight": (mlp, d), a + "mlp.fc1.bias": (mlp,)}
        out |= {a + "mlp.fc2.weight": (d, mlp), a + "mlp.fc2.bias": (d,)}
    return out


def llama(hidden: int, inter: int, layers: int, vocab: int) -> dict:
    """LlamaForCausalLM names -> shapes (multi-head attention: kv heads = heads)."""
    h = hidden
    out = {"model.embed_tokens.weight": (vocab, h)}
    for i in range(layers):
        b = f"model.layers.{i}."
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[b + f"self_attn.{p}.weight"] = (h, h)
        out |= {b + "mlp.gate_proj.weight": (inter, h), b + "mlp.up_proj.weight": (inter, h)}
        out |= {b + "mlp.down_proj.weight": (h, inter)}
        out |= {b + "input_layernorm.weight": (h,), b + "post_attention_layernorm.weight": (h,)}
    out |= {"model.norm.weight": (h,), "lm_head.weight": (vocab, h)}
    return out


def prefixed(prefix: str, names: dict) -> dict:
    return {prefix + k: v for k, v in names.items()}


def openvla_hf_names(dino: tuple, siglip: tuple, lm: tuple) -> dict:
    """Names -> shapes of an OpenVLAForActionPrediction state dict (what its shards hold)."""
    vd, h = dino[0] + siglip[0], lm[0]
    return {
        **prefixed("vision_backbone.featurizer.", timm_vit(*dino, dino=True, ls="scale_factor")),
        **prefixed("vision_backbone.fused_featurizer.", timm_vit(*siglip, dino=False)),
        "projector.fc1.weight": (4 * vd, vd),
        "projector.fc1.bias": (4 * vd,),
        "projector.fc2.weight": (h, 4 * vd),
        "projector.fc2.bias": (h,),
        "projector.fc3.weight": (h, h),
        "projector.fc3.bias": (h,),
        **prefixed("language_model.", llama(*lm)),
    }


def cogact_pt_names(dino: tuple, siglip: tuple, lm: tuple, dit: tuple) -> dict:
    """{group: names -> shapes} of CogACT's .pt: prismatic's modules, CogACT's DiT as `net`."""
    vd, h = dino[0] + siglip[0], lm[0]
    depth, d, chunk = dit
    net = {
        "history_embedder.linear.weight": (d, 7),  # unused by CogACT, still saved
        "history_embedder.linear.bias": (d,),
        "x_embedder.linear.weight": (d, 7),
        "x_embedder.linear.bias": (d,),
        "t_embedder.mlp.0.weight": (d, 256),
        "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d),
        "t_embedder.mlp.2.bias": (d,),
        "z_embedder.linear.weight": (d, h),
        "z_embedder.linear.bias": (d,),
        "z_embedder.uncondition": (1, h),
        "positional_embedding": (chunk + 1, d),  # future + past + 2 rows
        "final_layer.linear.weight": (7, d),
        "final_layer.linear.bias": (7,),
    }
    for i in range(depth):  # DiT blocks: norms without affine parameters
        b = f"blocks.{i}."
        net |= {b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,)}
        net |= {b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,)}
        net |= {b + "mlp.fc1.weight": (4 * d, d), b + "mlp.fc1.bias": (4 * d,)}
        net |= {b + "mlp.fc2.weight": (d, 4 * d), b + "mlp.fc2.bias": (d,)}
    return {
        "vision_backbone": {
            **prefixed("dino_featurizer.", timm_vit(*dino, dino=True, ls="gamma")),
            **prefixed("siglip_featurizer.", timm_vit(*siglip, dino=False)),
        },
        "projector": {
            "projector.0.weight": (4 * vd, vd),
            "projector.0.bias": (4 * vd,),
            "projector.2.weight": (h, 4 * vd),
            "projector.2.bias": (h,),
            "projector.4.weight": (h, h),
            "projector.4.bias": (h,),
        },
        "llm_backbone": prefixed("llm.", llama(*lm)),
        "action_model": prefixed("net.", net),
    }


# Upstream's converter, verbatim but for formatting (openvla, MIT): prismatic -> HF names.
PROJECTOR_KEY_MAPPING = {
    "projector.0.weight": "projector.fc1.weight",
    "projector.0.bias": "projector.fc1.bias",
    "projector.2.weight": "projector.fc2.weight",
    "projector.2.bias": "projector.fc2.bias",
    "projector.4.weight": "projector.fc3.weight",
    "projector.4.bias": "projector.fc3.bias",
}


def remap_state_dicts_for_hf(vision, projector, llm, use_fused_vision_backbone=False) -> dict:
    hf_state_dict = {}
    for key, value in projector.items():
        hf_state_dict[PROJECTOR_KEY_MAPPING[key]] = value
    for key, value in llm.items():
        hf_state_dict[key.replace("llm.", "language_model.")] = value
    if not use_fused_vision_backbone:
        for key, value in vision.items():
            hf_state_dict[key.replace("featurizer.", "vision_backbone.featurizer.")] = value
    else:
        for key, value in vision.items():
            if key.startswith("dino_featurizer"):
                if key.endswith(".gamma"):
                    key = key.replace(".gamma", ".scale_factor")
                hf_state_dict[key.replace("dino_featurizer.", "vision_backbone.featurizer.")] = (
                    value
                )
            elif key.startswith("siglip_featurizer"):
                hf_state_dict[
                    key.replace("siglip_featurizer.", "vision_backbone.fused_featurizer.")
                ] = value
    return hf_state_dict


def to_prismatic(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """A directly built model's weights under prismatic's / CogACT's names (the rules above:
    timm ViTs with `.gamma`, projector as nn.Sequential, the LLM as `llm`)."""
    rules = (
        ("vision_backbone.featurizer.", "vision_backbone", "dino_featurizer."),
        ("vision_backbone.fused_featurizer.", "vision_backbone", "siglip_featurizer."),
        ("projector.fc1.", "projector", "projector.0."),
        ("projector.fc2.", "projector", "projector.2."),
        ("projector.fc3.", "projector", "projector.4."),
        ("language_model.", "llm_backbone", "llm."),
        ("action_model.", "action_model", ""),
    )
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        ours, group, theirs = next(r for r in rules if key.startswith(r[0]))
        name = theirs + key[len(ours) :]
        if group == "vision_backbone" and name.endswith((".ls1.scale_factor", ".ls2.scale_factor")):
            name = name.removesuffix(".scale_factor") + ".gamma"  # timm's LayerScale
        groups.setdefault(group, {})[name] = value.detach().clone()
    return groups


def shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in state.items()}


# -- the tiny architecture behind upstream's ids --------------------------------------------------

TINY = get_preset("tiny-openvla")
TINY_DIMS = dict(
    dino=(TINY.dino.width, TINY.dino.depth, TINY.dino.mlp_dim),
    siglip=(TINY.siglip.width, TINY.siglip.depth, TINY.siglip.mlp_dim),
    lm=(256, 688, 4, 32064),  # Llama vocabulary 32000 + pad, padded to a multiple of 64 (upstream)
)
# The converter ran with torch's default dtype bf16: tvf_normalize_params hold bf16-rounded stats.
BF16 = [torch.tensor(x, dtype=torch.bfloat16).float().tolist() for x in (DINO_MEAN, DINO_STD)]
TEXT_CONFIG = {  # as OpenVLAConfig.to_json writes it: the fields that differ from LlamaConfig's
    "hidden_size": 256,
    "intermediate_size": 688,
    "max_position_embeddings": 512,
    "model_type": "llama",
    "num_attention_heads": 4,
    "num_hidden_layers": 4,
    "num_key_value_heads": 4,
    "pad_token_id": 32000,
    "torch_dtype": "float32",
    "vocab_size": 32064,
}


def upstream_config_json(text_config: dict) -> dict:
    """openvla-7b's config.json fields (values of the real file, text_config aside)."""
    return {
        "arch_specifier": "no-align+fused-gelu-mlp",
        "architectures": ["OpenVLAForActionPrediction"],
        "auto_map": {
            "AutoConfig": "configuration_prismatic.OpenVLAConfig",
            "AutoModelForVision2Seq": "modeling_prismatic.OpenVLAForActionPrediction",
        },
        "hf_llm_id": "meta-llama/Llama-2-7b-hf",
        "image_resize_strategy": "resize-naive",
        "image_sizes": [224, 224],
        "llm_backbone_id": "llama2-7b-pure",
        "llm_max_length": 2048,
        "model_type": "openvla",
        "n_action_bins": 256,
        "norm_stats": STATS,
        "output_projector_states": False,
        "pad_to_multiple_of": 64,
        "pad_token_id": 32000,
        "text_config": text_config,
        "timm_model_ids": [DINO_ID, SIGLIP_ID],
        "timm_override_act_layers": [None, None],
        "torch_dtype": "bfloat16",
        "transformers_version": "4.40.1",
        "use_fused_vision_backbone": True,
        "vision_backbone_id": "dinosiglip-vit-so-224px",
    }


def upstream_preprocessor_json() -> dict:
    """preprocessor_config.json as PrismaticImageProcessor / PrismaticProcessor save it."""
    resize = {"antialias": True, "interpolation": 3, "max_size": None, "size": [224, 224]}
    return {
        "auto_map": {
            "AutoImageProcessor": "processing_prismatic.PrismaticImageProcessor",
            "AutoProcessor": "processing_prismatic.PrismaticProcessor",
        },
        "image_processor_type": "PrismaticImageProcessor",
        "image_resize_strategy": "resize-naive",
        "input_sizes": [[3, 224, 224], [3, 224, 224]],
        "interpolations": ["bicubic", "bicubic"],
        "means": [list(DINO_MEAN), list(SIGLIP_MEAN)],
        "processor_class": "PrismaticProcessor",
        "stds": [list(DINO_STD), list(SIGLIP_STD)],
        "tvf_crop_params": [{"output_size": [224, 224]}, {"output_size": [224, 224]}],
        "tvf_do_letterbox": False,
        "tvf_letterbox_fill": None,
        "tvf_normalize_params": [
            {"inplace": False, "mean": BF16[0], "std": BF16[1]},
            {"inplace": False, "mean": list(SIGLIP_MEAN), "std": list(SIGLIP_STD)},
        ],
        "tvf_resize_params": [resize, resize],
        "use_fused_vision_backbone": True,
    }


def expected_config() -> VLAConfig:
    """What the fixture's config.json + preprocessor_config.json describe."""
    return VLAConfig(
        name="llama2-7b-pure",
        dino=TINY.dino,
        siglip=TINY.siglip,
        llm=dict(TINY.llm, vocab_size=32064, pad_token_id=32000),
        tokenizer_vocab_size=32000,
        prompt_suffix_token_id=29871,
        image_means=(tuple(BF16[0]), SIGLIP_MEAN),
        image_stds=(tuple(BF16[1]), SIGLIP_STD),
        max_length=2048,
    )


def randomize_layer_scale(model: torch.nn.Module, seed: int) -> None:
    """LayerScale starts at 1e-5: too small for a mix-up (ls1 <-> ls2, lost) to change actions."""
    g = torch.Generator().manual_seed(seed)
    found = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ls1.scale_factor", "ls2.scale_factor")):
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
                found += 1
    assert found == 2 * model.config.dino.depth


@pytest.fixture
def tiny_timm(monkeypatch):
    """Upstream's timm ids, bound to tiny ViT shapes for this test."""
    monkeypatch.setitem(ckpt.TIMM_VITS, DINO_ID, TINY.dino)
    monkeypatch.setitem(ckpt.TIMM_VITS, SIGLIP_ID, TINY.siglip)


def write_hf_shards(root: Path, state: dict[str, torch.Tensor], n: int = 3) -> None:
    """save_pretrained's sharded layout: model-0000i-of-0000n.safetensors + the index."""
    keys = list(state)
    bounds = [round(i * len(keys) / n) for i in range(n + 1)]
    weight_map = {}
    for i in range(n):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        part = {k: state[k].contiguous() for k in keys[bounds[i] : bounds[i + 1]]}
        save_file(part, str(root / name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, name)
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


@pytest.fixture(scope="module")
def upstream_openvla(tmp_path_factory):
    """(reference policy, folder in openvla-7b's HF layout holding the same weights)."""
    cfg = expected_config()
    torch.manual_seed(21)
    ref_model = OpenVLAModel(cfg)
    tokenizer = build_word_tokenizer(32000, 256)
    ref = scramble(Policy(ref_model, tokenizer, STATS), 21)
    randomize_layer_scale(ref.model, 22)

    groups = to_prismatic(ref.model.state_dict())
    hf = remap_state_dicts_for_hf(
        groups["vision_backbone"],
        groups["projector"],
        groups["llm_backbone"],
        use_fused_vision_backbone=True,
    )
    assert shapes(hf) == openvla_hf_names(**TINY_DIMS)

    root = tmp_path_factory.mktemp("hf") / "openvla-7b"
    root.mkdir()
    write_hf_shards(root, hf)
    (root / "config.json").write_text(json.dumps(upstream_config_json(TEXT_CONFIG), indent=2))
    (root / "preprocessor_config.json").write_text(json.dumps(upstream_preprocessor_json()))
    (root / "dataset_statistics.json").write_text(json.dumps(STATS))
    tokenizer.save_pretrained(str(root))
    return ref, root


def _copy(root: Path, tmp_path: Path) -> Path:
    dst = tmp_path / root.name
    shutil.copytree(root, dst)
    return dst


def _rename_in_shards(root: Path, rename) -> None:
    """Rename weights inside the shards and the index alike."""
    index_path = root / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(str(root / shard))
        save_file({rename(k): v for k, v in tensors.items()}, str(root / shard))
    index["weight_map"] = {rename(k): f for k, f in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))


# -- OpenVLA ------------------------------------------------------------------------------------


def test_upstream_hf_folder_loads_and_acts_like_the_same_weights(upstream_openvla, tiny_timm):
    ref, root = upstream_openvla
    shards = sorted(p.name for p in root.glob("*.safetensors"))
    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    loaded = vla_prune.load_policy(root)
    assert type(loaded) is Policy
    assert loaded.config == expected_config()  # incl. the bf16 stats of tvf_normalize_params
    assert loaded.config.image_means[0][0] == 0.484375
    assert loaded.unnorm_key == "bridge_orig"
    a, b = ref.model.state_dict(), loaded.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ref.reset()
    for seed, instruction in enumerate(INSTRUCTIONS):
        image = random_image(seed)
        ra, rb = ref.step(image, instruction), loaded.step(image, instruction)
        np.testing.assert_array_equal(ra.action_tokens, rb.action_tokens)
        np.testing.assert_array_equal(ra.actions, rb.actions)


def test_openvla_7b_names_shapes_and_config_follow_upstream(tmp_path):
    """The real openvla-7b: our module names/shapes are its shards' (meta device, no 15 GB),
    its config.json + preprocessor_config.json give the openvla-7b architecture."""
    model = vla_prune.build_policy("openvla-7b").model
    rules = openvla_hf_names((1024, 24, 4096), (1152, 27, 4304), (4096, 11008, 32, 32064))
    assert shapes(model.state_dict()) == rules
    assert "vision_backbone.featurizer.blocks.23.ls2.scale_factor" in rules  # never run, saved
    meta = {k: torch.empty(s, device="meta") for k, s in rules.items()}
    ckpt.check_state_dict(model, meta, dict.fromkeys(meta, "model-00001-of-00003.safetensors"))

    text = {"model_type": "llama", "pad_token_id": 32000, "torch_dtype": "bfloat16"}
    (tmp_path / "config.json").write_text(
        json.dumps(upstream_config_json(text | {"vocab_size": 32064}))
    )
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(upstream_preprocessor_json()))
    cfg, raw = ckpt.read_openvla_config(tmp_path)
    ref = get_preset("openvla-7b")
    assert cfg == replace(
        ref,
        name="llama2-7b-pure",
        image_means=(tuple(BF16[0]), SIGLIP_MEAN),
        image_stds=(tuple(BF16[1]), SIGLIP_STD),
    )
    assert raw["norm_stats"] == STATS


def test_a_misnamed_weight_is_named(upstream_openvla, tiny_timm, tmp_path):
    root = _copy(upstream_openvla[1], tmp_path)
    good = "vision_backbone.featurizer.blocks.1.ls2.scale_factor"
    bad = "vision_backbone.featurizer.blocks.1.ls2.weight"
    _rename_in_shards(root, lambda k: bad if k == good else k)
    with pytest.raises(CheckpointError, match=rf"missing 1 weights.*'{good}'.*unexpected.*{bad}"):
        vla_prune.load_policy(root)


def test_unsupported_preprocessing_is_refused(upstream_openvla, tiny_timm, tmp_path):
    root = _copy(upstream_openvla[1], tmp_path)
    pp = upstream_preprocessor_json() | {"image_resize_strategy": "letterbox"}
    (root / "preprocessor_config.json").write_text(json.dumps(pp))
    with pytest.raises(CheckpointError, match=r"image_resize_strategy 'letterbox'"):
        vla_prune.load_policy(root)


def test_old_gamma_names_still_load(upstream_openvla, tiny_timm, tmp_path, caplog):
    ref, src = upstream_openvla
    root = _copy(src, tmp_path)
    _rename_in_shards(root, lambda k: k.replace(".scale_factor", ".gamma"))
    with caplog.at_level(logging.DEBUG, logger="vla_prune.models.checkpoints"):
        loaded = vla_prune.load_policy(root)
    assert "6 LayerScale weights under the old name '.gamma'" in caplog.text
    a, b = ref.model.state_dict(), loaded.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    image = random_image(5)
    ref.reset()
    np.testing.assert_array_equal(
        ref.step(image, INSTRUCTIONS[0]).actions, loaded.step(image, INSTRUCTIONS[0]).actions
    )

    both = _copy(src, tmp_path / "both")  # one weight under both names: refuse, don't guess
    key = "vision_backbone.featurizer.blocks.0.ls1.scale_factor"
    index = json.loads((both / "model.safetensors.index.json").read_text())
    shard = both / index["weight_map"][key]
    tensors = load_file(str(shard))
    tensors[key.replace("scale_factor", "gamma")] = tensors[key].clone()
    save_file(tensors, str(shard))
    with pytest.raises(CheckpointError, match=r"both '.*blocks\.0\.ls1\.gamma'.*and '.*"):
        vla_prune.load_policy(both)


def test_our_save_writes_upstream_names_and_fields(tmp_path):
    policy = vla_prune.build_policy("tiny-openvla", seed=3)
    root = policy.save(tmp_path / "ours")
    keys = load_file(str(root / "model.safetensors")).keys()
    assert not [k for k in keys if k.endswith(".gamma")]
    dims = dict(TINY_DIMS, lm=(256, 688, 4, 576))
    assert set(keys) == set(openvla_hf_names(**dims))

    config = json.loads((root / "config.json").read_text())
    upstream_fields = set(upstream_config_json({}))
    assert upstream_fields <= set(config), upstream_fields - set(config)
    assert config["vision_backbone_id"] == "vla-prune:tiny-openvla"  # not upstream's shapes
    assert config["text_config"]["vocab_size"] == 576 and config["pad_to_multiple_of"] == 64
    pp = json.loads((root / "preprocessor_config.json").read_text())
    assert set(pp) == set(upstream_preprocessor_json())
    assert pp["tvf_normalize_params"][0]["mean"] == list(DINO_MEAN)

    # openvla-7b's shapes get upstream's ids, and read back without our "vla_prune" block.
    cfg7 = get_preset("openvla-7b")
    config7 = ckpt.upstream_config(cfg7, STATS, torch.bfloat16)
    for field in ("vision_backbone_id", "llm_backbone_id", "hf_llm_id", "timm_model_ids"):
        assert config7[field] == upstream_config_json({})[field], field
    assert config7["pad_token_id"] == 32000 and config7["image_sizes"] == [224, 224]
    del config7["vla_prune"]
    again = ckpt.config_from_json(config7, tmp_path / "config.json")
    assert again == replace(cfg7, name="llama2-7b-pure")


# -- CogACT -------------------------------------------------------------------------------------


COGACT_CONFIG = {  # a CogACT run's config.json (draccus TrainConfig dump; fields we don't read too)
    "vla": {
        "type": "prism-dinosiglip-224px+oxe+diffusion",
        "vla_id": "prism-dinosiglip-224px+oxe+diffusion",
        "base_vlm": "prism-dinosiglip-224px+7b",
        "freeze_vision_backbone": False,
        "freeze_llm_backbone": False,
        "unfreeze_last_llm_layer": False,
        "data_mix": "oxe_magic_soup_plus_minus",
        "shuffle_buffer_size": 250000,
    },
    "data_root_dir": "datasets/open-x-embodiment",
    "run_root_dir": "runs",
    "pretrained_checkpoint": None,
    "is_resume": False,
    "seed": 42,
    "action_model_type": "DiT-B",
    "use_ema": False,
    "action_dim": 7,
    "future_action_window_size": 15,
    "past_action_window_size": 0,
    "repeated_diffusion_steps": 8,
}


@pytest.fixture
def tiny_cogact_ids(monkeypatch):
    """CogACT's base VLM id and "DiT-B", bound to tiny-openvla and a tiny DiT for this test."""
    monkeypatch.setitem(cogact_ckpt.BASE_VLMS, "prism-dinosiglip-224px+7b", "tiny-openvla")
    monkeypatch.setitem(cogact_ckpt.DIT_SIZES, "DiT-B", (2, 128, 4))


@pytest.fixture(scope="module")
def upstream_cogact(tmp_path_factory):
    ref = tiny_cogact(31)
    randomize_layer_scale(ref.model, 32)
    groups = to_prismatic(ref.model.state_dict())
    dims = dict(TINY_DIMS, lm=(256, 688, 4, 576), dit=(2, 128, 16))
    assert {g: shapes(sd) for g, sd in groups.items()} == cogact_pt_names(**dims)

    root = tmp_path_factory.mktemp("cogact") / "CogACT-Base"
    (root / "checkpoints").mkdir(parents=True)
    torch.save({"model": groups}, root / "checkpoints" / "CogACT-Base.pt")
    (root / "config.json").write_text(json.dumps(COGACT_CONFIG, indent=2))
    (root / "dataset_statistics.json").write_text(json.dumps(STATS))
    ref.tokenizer.save_pretrained(str(root))  # CogACT ships none; ours must sit beside
    return ref, root


def test_cogact_pt_loads_and_acts_like_the_same_weights(upstream_cogact, tiny_cogact_ids):
    ref, root = upstream_cogact
    loaded = vla_prune.load_policy(root)
    assert type(loaded) is CogACTPolicy
    want = replace(
        get_preset("tiny-cogact"), name="prism-dinosiglip-224px+oxe+diffusion", dit_size="DiT-B"
    )
    assert loaded.config == want
    a, b = ref.model.state_dict(), loaded.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ref.norm_stats, ref.unnorm_key = STATS, "bridge_orig"
    image = random_image(9)
    for policy in (ref, loaded):
        policy.reset()  # seeded sampling: the same noise stream in both
    ra, rb = ref.step(image, INSTRUCTIONS[1]), loaded.step(image, INSTRUCTIONS[1])
    np.testing.assert_array_equal(ra.normalized_actions, rb.normalized_actions)
    np.testing.assert_array_equal(ra.actions, rb.actions)
    # CogACT's load_vla takes the .pt itself
    again = vla_prune.load_policy(root / "checkpoints" / "CogACT-Base.pt")
    again.reset()
    np.testing.assert_array_equal(again.step(image, INSTRUCTIONS[1]).actions, ra.actions)


def _edit_cogact(root: Path, edit) -> None:
    pt = root / "checkpoints" / "CogACT-Base.pt"
    obj = torch.load(pt, map_location="cpu", weights_only=True)
    edit(obj["model"]["vision_backbone"])
    torch.save(obj, pt)


def test_cogact_misnamed_layer_scale_is_named(upstream_cogact, tiny_cogact_ids, tmp_path):
    src = upstream_cogact[1]
    timm = "dino_featurizer.blocks.0.ls1.gamma"

    root = _copy(src, tmp_path / "a")
    _edit_cogact(root, lambda sd: sd.__setitem__("dino_featurizer.blocks.0.ls1.w", sd.pop(timm)))
    with pytest.raises(
        CheckpointError,
        match=r"missing 1 weights.*'vision_backbone\.dino_featurizer\.blocks\.0\.ls1\.gamma'"
        r".*unexpected.*dino_featurizer\.blocks\.0\.ls1\.w'",
    ):
        vla_prune.load_policy(root)

    # OpenVLA HF's name is not CogACT's: its timm ViTs would refuse it too
    root = _copy(src, tmp_path / "b")
    hf = "dino_featurizer.blocks.0.ls1.scale_factor"
    _edit_cogact(root, lambda sd: sd.__setitem__(hf, sd.pop(timm)))
    with pytest.raises(CheckpointError, match=rf"unexpected weight 'vision_backbone\.{hf}'"):
        vla_prune.load_policy(root)


def test_our_cogact_save_writes_cogact_names(tmp_path):
    policy = vla_prune.build_policy("tiny-cogact", seed=4)
    root = policy.save(tmp_path / "ours")
    (pt,) = (root / "checkpoints").glob("*.pt")
    groups = torch.load(pt, map_location="cpu", weights_only=True)["model"]
    dims = dict(TINY_DIMS, lm=(256, 688, 4, 576), dit=(2, 128, 16))
    assert {g: shapes(sd) for g, sd in groups.items()} == cogact_pt_names(**dims)
    assert "dino_featurizer.blocks.2.ls2.gamma" in groups["vision_backbone"]


def test_raw_state_dicts_with_gamma_still_load():
    """Training states saved before the rename (sim/train.py's train_state.pt) hold `.gamma`."""
    model = vla_prune.build_policy("tiny-openvla", seed=6).model
    old = {k.replace(".scale_factor", ".gamma"): v + 1 for k, v in model.state_dict().items()}
    assert "vision_backbone.featurizer.blocks.0.ls1.gamma" in old
    model.load_state_dict(old, strict=True)
    got = model.vision_backbone.featurizer.blocks[0].ls1.scale_factor
    assert torch.equal(got, old["vision_backbone.featurizer.blocks.0.ls1.gamma"])

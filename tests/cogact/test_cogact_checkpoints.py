"""CogACT checkpoints in CogACT's layout: round trip bit-exact, a named error for every fault."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import vla_prune
from tests.conftest import random_image, scramble
from vla_prune.cogact import CogACTPolicy
from vla_prune.models.checkpoints import CheckpointError
from vla_prune.models.cogact_checkpoints import (
    GROUPS,
    config_from_cogact,
    from_cogact,
    to_cogact,
)
from vla_prune.models.presets import get_preset

INSTRUCTION = "put the small green cylinder in the bowl"
STATS = {
    "bridge_orig": {"action": {"q01": [-0.1] * 7, "q99": [0.2] * 7, "mask": [True] * 6 + [False]}},
    "fractal20220817_data": {
        "action": {"q01": [-1.0] * 7, "q99": [1.0] * 7, "mask": [True] * 6 + [False]}
    },
}


class NotATensor:  # a pickled object that weights_only loading must refuse
    pass


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    policy = scramble(vla_prune.build_policy("tiny-cogact", seed=5), 5)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for w in policy.model.action_model.parameters():
            w.copy_(torch.randn(w.shape, generator=g) * 0.05)
    policy.norm_stats = STATS
    policy.unnorm_key = "bridge_orig"
    root = tmp_path_factory.mktemp("cogact") / "run"
    policy.save(root)
    return policy, root


def _copy(saved, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(saved[1], dst)
    return dst


def _pt(root: Path) -> Path:
    (pt,) = (root / "checkpoints").glob("*.pt")
    return pt


def _edit_pt(root: Path, edit) -> Path:
    pt = _pt(root)
    obj = torch.load(pt, map_location="cpu", weights_only=True)
    edit(obj["model"])
    torch.save(obj, pt)
    return pt


# -- layout and round trip ----------------------------------------------------------------------


def test_layout_follows_cogact(saved):
    _, root = saved
    assert {"config.json", "config.yaml", "dataset_statistics.json", "checkpoints"} <= {
        p.name for p in root.iterdir()
    }
    assert _pt(root).name == "tiny-cogact.pt"
    obj = torch.load(_pt(root), map_location="cpu", weights_only=True)
    model = obj["model"]
    assert set(model) == set(GROUPS)
    assert "dino_featurizer.blocks.0.attn.qkv.weight" in model["vision_backbone"]
    assert "siglip_featurizer.attn_pool.latent" in model["vision_backbone"]
    assert {"projector.0.weight", "projector.2.bias", "projector.4.weight"} <= set(
        model["projector"]
    )
    assert "llm.model.layers.0.self_attn.q_proj.weight" in model["llm_backbone"]
    assert "llm.lm_head.weight" in model["llm_backbone"]
    assert {"net.z_embedder.uncondition", "net.blocks.1.mlp.fc2.weight"} <= set(
        model["action_model"]
    )
    config = json.loads((root / "config.json").read_text())
    assert config["future_action_window_size"] == 15 and config["action_dim"] == 7


def test_key_mapping_is_a_bijection(saved):
    policy, _ = saved
    for key in policy.model.state_dict():
        assert from_cogact(*to_cogact(key)) == key
    assert to_cogact("projector.fc2.weight") == ("projector", "projector.2.weight")
    assert to_cogact("vision_backbone.fused_featurizer.norm.bias") == (
        "vision_backbone",
        "siglip_featurizer.norm.bias",
    )
    assert (
        from_cogact("llm_backbone", "llm.model.norm.weight") == "language_model.model.norm.weight"
    )
    assert from_cogact("projector", "projector.6.weight") is None


def test_round_trip_bit_exact(saved):
    policy, root = saved
    loaded = vla_prune.load_policy(root, unnorm_key="bridge_orig")
    assert isinstance(loaded, CogACTPolicy)
    assert loaded.config == policy.config and loaded.norm_stats == STATS
    ours, theirs = policy.model.state_dict(), loaded.model.state_dict()
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    image = random_image(7)
    policy.reset()
    a = policy.step(image, INSTRUCTION)
    b = loaded.step(image, INSTRUCTION)
    np.testing.assert_array_equal(a.actions, b.actions)
    np.testing.assert_array_equal(a.normalized_actions, b.normalized_actions)
    # the .pt path itself works too (CogACT's load_vla takes it)
    again = vla_prune.load_policy(_pt(root), unnorm_key="bridge_orig")
    np.testing.assert_array_equal(again.step(image, INSTRUCTION).actions, a.actions)


def test_flat_vlm_prefixed_state_dict_and_ema_group(saved, tmp_path):
    root = _copy(saved, tmp_path)

    def flatten(model):
        flat = {}
        for group, sd in model.items():
            prefix = "action_model" if group == "action_model" else f"vlm.{group}"
            flat.update({f"{prefix}.{k}": v for k, v in sd.items()})
        model.clear()
        model.update(flat)

    _edit_pt(root, flatten)
    loaded = vla_prune.load_policy(root, unnorm_key="bridge_orig")
    for k, v in saved[0].model.state_dict().items():
        assert torch.equal(v, loaded.model.state_dict()[k]), k

    root2 = tmp_path / "ema"
    shutil.copytree(saved[1], root2)
    _edit_pt(root2, lambda m: m.update(ema_diffusion=dict(m["action_model"])))
    vla_prune.load_policy(root2, unnorm_key="bridge_orig")  # ignored, as upstream without EMA


def test_build_policy_finds_shipped_and_openvla_still_loads(saved, tmp_path):
    from tests.conftest import tiny_policy

    openvla = tiny_policy(1)
    openvla.save(tmp_path / "ov")
    assert type(vla_prune.load_policy(tmp_path / "ov")) is vla_prune.Policy


# -- malformed checkpoints ----------------------------------------------------------------------


def _raises(root, match, **kw):
    with pytest.raises(CheckpointError, match=match):
        vla_prune.load_policy(root, **kw)


def test_missing_weight(saved, tmp_path):
    root = _copy(saved, tmp_path)
    _edit_pt(root, lambda m: m["action_model"].pop("net.blocks.1.mlp.fc2.bias"))
    _raises(root, r"tiny-cogact\.pt is missing 1 weights.*action_model\.net\.blocks\.1\.mlp\.fc2")


def test_unexpected_weights(saved, tmp_path):
    root = _copy(saved, tmp_path)
    _edit_pt(root, lambda m: m["projector"].update({"projector.6.weight": torch.zeros(2)}))
    _raises(root, r"tiny-cogact\.pt: unexpected weight 'projector\.projector\.6\.weight'")
    root = tmp_path / "b"
    shutil.copytree(saved[1], root)
    _edit_pt(root, lambda m: m["action_model"].update({"net.extra.weight": torch.zeros(2)}))
    _raises(root, r"tiny-cogact\.pt has 1 unexpected weights.*action_model\.net\.extra\.weight")


def test_unknown_group(saved, tmp_path):
    root = _copy(saved, tmp_path)
    _edit_pt(root, lambda m: m.update(optimizer={}))
    _raises(root, r"tiny-cogact\.pt: unexpected group 'optimizer'")


def test_shape_mismatch(saved, tmp_path):
    root = _copy(saved, tmp_path)
    key = "llm.model.layers.0.self_attn.q_proj.weight"
    _edit_pt(root, lambda m: m["llm_backbone"].update({key: torch.zeros(3, 256)}))
    _raises(
        root,
        r"tiny-cogact\.pt: shape mismatch for 'llm_backbone\.llm\.model\.layers\.0\.self_attn"
        r"\.q_proj\.weight': expected \(256, 256\), found \(3, 256\)",
    )


def test_non_tensor_value(saved, tmp_path):
    root = _copy(saved, tmp_path)
    _edit_pt(root, lambda m: m["projector"].update({"projector.0.weight": [1.0, 2.0]}))
    _raises(root, r"'projector\.projector\.0\.weight' is list, not a tensor")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "unsafe", "not-a-dict"])
def test_corrupt_or_unsafe_pt(saved, tmp_path, damage):
    root = _copy(saved, tmp_path)
    pt = _pt(root)
    if damage == "garbage":
        pt.write_bytes(b"this is not a torch checkpoint")
    elif damage == "truncated":
        pt.write_bytes(pt.read_bytes()[: pt.stat().st_size // 2])
    elif damage == "unsafe":
        torch.save({"model": {"action_model": {"net.x": NotATensor()}}}, pt)
    else:
        torch.save([torch.zeros(1)], pt)
    match = "expected a dict" if damage == "not-a-dict" else "corrupt or unsafe checkpoint"
    with pytest.raises(CheckpointError, match=match) as err:
        vla_prune.load_policy(root)
    assert str(pt) in str(err.value)


def test_missing_or_bad_statistics(saved, tmp_path):
    root = _copy(saved, tmp_path)
    (root / "dataset_statistics.json").unlink()
    _raises(root, r"missing file .*dataset_statistics\.json")
    (root / "dataset_statistics.json").write_text(
        json.dumps({"d": {"action": {"q01": [0.0] * 6, "q99": [1.0] * 7}}})
    )
    _raises(root, r"dataset_statistics\.json: statistics 'd' action\.q01 has 6 values, expected 7")


def test_unknown_unnorm_key(saved):
    _raises(
        saved[1],
        r"dataset_statistics\.json: unknown unnorm_key 'widowx'; this checkpoint has "
        r"\['bridge_orig', 'fractal20220817_data'\]",
        unnorm_key="widowx",
    )


def test_missing_or_bad_config(saved, tmp_path):
    root = _copy(saved, tmp_path)
    (root / "config.json").write_text("{not json")
    _raises(root, r"corrupt JSON in .*config\.json")
    (root / "config.json").unlink()
    vla_prune.load_policy(root, unnorm_key="bridge_orig")  # config.yaml alone is enough
    (root / "config.yaml").unlink()
    _raises(root, r"missing file .*config\.json \(or config\.yaml\)")


def test_missing_tokenizer_and_several_checkpoints(saved, tmp_path):
    root = _copy(saved, tmp_path)
    shutil.copy(_pt(root), root / "checkpoints" / "step-000002-epoch-00-loss=0.1.pt")
    _raises(root, r"holds several checkpoints")
    (root / "checkpoints" / "step-000002-epoch-00-loss=0.1.pt").unlink()
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (root / f).unlink(missing_ok=True)
    _raises(root, r"no tokenizer in .*copy Llama-2-7B's tokenizer files")


# -- real CogACT configs (no 30 GB needed: shapes from a meta-device model) ----------------------


def _meta_weights(name: str) -> dict[str, torch.Tensor]:
    return dict(vla_prune.build_policy(name).model.state_dict())


def test_real_cogact_config_sizes_the_model_from_the_weights(tmp_path):
    tensors = _meta_weights("cogact-base")
    raw = {
        "vla": {
            "vla_id": "prism-dinosiglip-224px+oxe+diffusion",
            "base_vlm": "prism-dinosiglip-224px+7b",
        },
        "action_model_type": "DiT-B",
        "action_dim": 7,
        "future_action_window_size": 15,
        "past_action_window_size": 0,
    }
    cfg = config_from_cogact(raw, tmp_path / "config.json", tensors)
    base = get_preset("cogact-base")
    assert cfg.dit == base.dit and cfg.llm == base.llm and cfg.dino == base.dino
    assert cfg.prompt_suffix_token_id == 29871 and cfg.cognition_token_id == 2
    with pytest.raises(CheckpointError, match=r"config\.json: action_model_type DiT-L expects"):
        config_from_cogact({**raw, "action_model_type": "DiT-L"}, tmp_path / "config.json", tensors)
    with pytest.raises(CheckpointError, match=r"unsupported vla\.base_vlm 'prism-clip'"):
        config_from_cogact({"vla": {"base_vlm": "prism-clip"}}, tmp_path / "config.json", tensors)
    with pytest.raises(CheckpointError, match=r"future_action_window_size 7"):
        config_from_cogact(
            {**raw, "future_action_window_size": 7}, tmp_path / "config.json", tensors
        )

"""OpenVLA HF-layout checkpoints: round trip, and a named error for every corruption."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import vla_prune
from tests.conftest import random_image, tiny_policy
from vla_prune.models.checkpoints import CheckpointError, _save_shards, config_from_json
from vla_prune.models.presets import get_preset


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    policy = tiny_policy(11)
    policy.norm_stats = {
        "bridge_orig": {
            "action": {"q01": [-0.1] * 7, "q99": [0.2] * 7, "mask": [True] * 6 + [False]}
        },
        "fractal": {"action": {"q01": [-1.0] * 7, "q99": [1.0] * 7, "mask": [True] * 7}},
    }
    policy.unnorm_key = "bridge_orig"
    root = tmp_path_factory.mktemp("ckpt") / "tiny"
    policy.save(root)
    return policy, root


def _copy(saved, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(saved[1], dst)
    return dst


def test_layout(saved):
    _, root = saved
    names = {p.name for p in root.iterdir()}
    assert {
        "config.json",
        "dataset_statistics.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "preprocessor_config.json",
    } <= names
    cfg = json.loads((root / "config.json").read_text())
    assert cfg["norm_stats"]["bridge_orig"]["action"]["q99"] == [0.2] * 7
    keys = load_file(str(root / "model.safetensors")).keys()
    assert "vision_backbone.featurizer.blocks.0.attn.qkv.weight" in keys
    assert "vision_backbone.fused_featurizer.attn_pool.latent" in keys
    assert "projector.fc3.weight" in keys and "language_model.lm_head.weight" in keys


def test_round_trip_is_bit_exact(saved):
    policy, root = saved
    loaded = vla_prune.load_policy(root, unnorm_key="bridge_orig")
    a, b = policy.model.state_dict(), loaded.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    image = random_image(3)
    for instruction in ["pick up the red block", "press the yellow button"]:
        ra, rb = policy.step(image, instruction), loaded.step(image, instruction)
        assert (ra.action_tokens == rb.action_tokens).all()
        assert (ra.actions == rb.actions).all()


def test_sharded_round_trip(saved, tmp_path):
    policy, _ = saved
    root = _copy(saved, tmp_path)
    _save_shards(policy.model.state_dict(), root, max_shard_bytes=3_000_000)
    assert (root / "model.safetensors.index.json").exists()
    assert len(list(root.glob("model-*-of-*.safetensors"))) > 2
    loaded = vla_prune.load_policy(root, unnorm_key="fractal")
    a, b = policy.model.state_dict(), loaded.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_several_stats_need_a_key(saved):
    loaded = vla_prune.load_policy(saved[1])
    with pytest.raises(ValueError, match="choose one with policy.configure"):
        loaded.step(random_image(0), "press the yellow button")
    with pytest.raises(ValueError, match=r"unknown unnorm_key 'libero'.*bridge_orig.*fractal"):
        vla_prune.load_policy(saved[1], unnorm_key="libero")


def _edit_weights(root, fn):
    path = root / "model.safetensors"
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path))


def test_missing_key(saved, tmp_path):
    root = _copy(saved, tmp_path)
    _edit_weights(root, lambda t: t.pop("projector.fc1.bias"))
    with pytest.raises(CheckpointError, match=r"missing 1 weights.*projector\.fc1\.bias"):
        vla_prune.load_policy(root)


def test_unexpected_key(saved, tmp_path):
    root = _copy(saved, tmp_path)
    _edit_weights(root, lambda t: t.__setitem__("projector.fc4.weight", torch.zeros(2, 2)))
    with pytest.raises(
        CheckpointError, match=r"unexpected.*projector\.fc4\.weight.*model\.safetensors"
    ):
        vla_prune.load_policy(root)


def test_shape_mismatch(saved, tmp_path):
    root = _copy(saved, tmp_path)
    _edit_weights(root, lambda t: t.__setitem__("projector.fc3.weight", torch.zeros(256, 255)))
    with pytest.raises(
        CheckpointError,
        match=r"shape mismatch for 'projector\.fc3\.weight' in model\.safetensors: "
        r"expected \(256, 256\), found \(256, 255\)",
    ):
        vla_prune.load_policy(root)


def test_corrupt_weights_file(saved, tmp_path):
    root = _copy(saved, tmp_path)
    data = (root / "model.safetensors").read_bytes()
    (root / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"corrupt safetensors file .*model\.safetensors"):
        vla_prune.load_policy(root)
    (root / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="corrupt safetensors file"):
        vla_prune.load_policy(root)


def test_corrupt_and_missing_config(saved, tmp_path):
    root = _copy(saved, tmp_path)
    (root / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"corrupt JSON in .*config\.json"):
        vla_prune.load_policy(root)
    (root / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"missing file .*config\.json"):
        vla_prune.load_policy(root)
    with pytest.raises(CheckpointError, match="does not exist"):
        vla_prune.load_policy(tmp_path / "nowhere")


def test_missing_weights_and_shards(saved, tmp_path):
    policy, _ = saved
    root = _copy(saved, tmp_path)
    (root / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights found"):
        vla_prune.load_policy(root)
    _save_shards(policy.model.state_dict(), root, max_shard_bytes=3_000_000)
    shard = sorted(root.glob("model-*-of-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"missing weights shard .*{shard.name}"):
        vla_prune.load_policy(root)


def test_index_pointing_at_the_wrong_shard(saved, tmp_path):
    policy, _ = saved
    root = _copy(saved, tmp_path)
    (root / "model.safetensors").unlink()
    _save_shards(policy.model.state_dict(), root, max_shard_bytes=3_000_000)
    index = json.loads((root / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    key = next(k for k, f in index["weight_map"].items() if f == files[0])
    index["weight_map"][key] = files[1]
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"maps '{key}' to {files[1]}"):
        vla_prune.load_policy(root)


def test_bad_statistics(saved, tmp_path):
    root = _copy(saved, tmp_path)
    cfg = json.loads((root / "config.json").read_text())
    cfg["norm_stats"]["fractal"]["action"]["q01"] = [0.0] * 6
    (root / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"'fractal' action\.q01 has 6 values, expected 7"):
        vla_prune.load_policy(root)


def test_missing_tokenizer(saved, tmp_path):
    root = _copy(saved, tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (root / name).unlink()
    with pytest.raises(CheckpointError, match="cannot load the tokenizer"):
        vla_prune.load_policy(root)


UPSTREAM_CONFIG = {  # the fields of openvla/openvla-7b's config.json that matter
    "architectures": ["OpenVLAForActionPrediction"],
    "model_type": "openvla",
    "llm_backbone_id": "llama2-7b-pure",
    "timm_model_ids": ["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"],
    "n_action_bins": 256,
    "pad_to_multiple_of": 64,
    "pad_token_id": 32000,
    "llm_max_length": 2048,
    "text_config": {"model_type": "llama", "pad_token_id": 32000, "vocab_size": 32064},
}


def test_upstream_config_gives_the_openvla_7b_architecture(tmp_path):
    cfg = config_from_json(UPSTREAM_CONFIG, tmp_path / "config.json")
    ref = get_preset("openvla-7b")
    assert cfg.dino == ref.dino and cfg.siglip == ref.siglip
    assert cfg.tokenizer_vocab_size == 32000 and cfg.prompt_suffix_token_id == 29871
    for k in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "vocab_size",
        "max_position_embeddings",
    ):
        assert cfg.llm[k] == ref.llm[k], k
    bad = dict(UPSTREAM_CONFIG, timm_model_ids=["vit_base_patch16_clip_224", "x"])
    with pytest.raises(CheckpointError, match="unsupported vision backbone"):
        config_from_json(bad, tmp_path / "config.json")


def test_sentencepiece_tokenizer_loads_through_the_same_code(saved, tmp_path):
    """Real checkpoints bring a SentencePiece tokenizer.model; it loads via the same loader."""
    import sentencepiece as spm

    from vla_prune.models.openvla import build_prompt
    from vla_prune.models.tokenizer import BASE_WORDS

    corpus = tmp_path / "corpus.txt"
    lines = [" ".join(BASE_WORDS[i : i + 8]) for i in range(0, len(BASE_WORDS), 3)]
    corpus.write_text("\n".join(lines * 5 + [build_prompt("pick up the red block")]))
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(tmp_path / "sp"),
        vocab_size=300,
        model_type="bpe",
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    root = _copy(saved, tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (root / name).unlink()
    shutil.copy(tmp_path / "sp.model", root / "tokenizer.model")
    (root / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "add_bos_token": True,
                "add_eos_token": False,
                "bos_token": "<s>",
                "eos_token": "</s>",
                "unk_token": "<unk>",
            }
        )
    )
    policy = vla_prune.load_policy(root, unnorm_key="bridge_orig")
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    ids = policy.prepare(random_image(0), "pick up the red block")["input_ids"][0].tolist()
    assert ids[0] == 1
    pieces = [p.lstrip("▁") for p in policy.tokenizer.convert_ids_to_tokens(ids[1:])]
    assert "robot" in pieces and "block" in pieces
    assert max(ids) < sp.get_piece_size()
    assert policy.step(random_image(0), "pick up the red block").actions.shape == (1, 7)

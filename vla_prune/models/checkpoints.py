"""OpenVLA checkpoints in the Hugging Face layout, read and written without running their code.

A directory holds: config.json (with norm_stats), dataset_statistics.json, safetensors weights
(one file or shards + model.safetensors.index.json), tokenizer files, preprocessor_config.json.
Real OpenVLA checkpoints describe their backbones by timm ids; ours also carry our exact
architecture under "vla_prune". No trust_remote_code, no network, safetensors only.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoTokenizer, LlamaConfig
from transformers.utils import logging as hf_logging

from .arch import VLAConfig
from .prismatic import OpenVLAModel
from .vit import ViTConfig

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

# The backbones real OpenVLA checkpoints name (config.json "timm_model_ids").
TIMM_VITS = {
    "vit_large_patch14_reg4_dinov2.lvd142m": ViTConfig(
        1024, 24, 16, 4096, reg_tokens=4, layer_scale=True
    ),
    "vit_so400m_patch14_siglip_224": ViTConfig(
        1152, 27, 16, 4304, class_token=False, attn_pool=True
    ),
}


class CheckpointError(ValueError):
    """A checkpoint that can't be loaded; the message names the file, key and mismatch."""


def read_json(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"missing file {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"corrupt JSON in {path}: {e}") from e


def config_from_json(cfg: dict[str, Any], path: Path) -> VLAConfig:
    if "vla_prune" in cfg:
        try:
            return VLAConfig.from_dict(cfg["vla_prune"])
        except (TypeError, KeyError) as e:
            raise CheckpointError(f"{path}: bad 'vla_prune' architecture block: {e}") from e
    # A real OpenVLA checkpoint: backbones by timm id, the LLM by its Llama text_config.
    ids = cfg.get("timm_model_ids")
    if not ids or len(ids) != 2 or any(i not in TIMM_VITS for i in ids):
        raise CheckpointError(
            f"{path}: unsupported vision backbone timm_model_ids={ids}; "
            f"supported: fused {list(TIMM_VITS)}"
        )
    text = dict(cfg.get("text_config") or {})
    text.pop("model_type", None)
    llm = LlamaConfig(**text)
    pad_multiple = int(cfg.get("pad_to_multiple_of", 64))
    llm_dict = {
        k: getattr(llm, k)
        for k in (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "vocab_size",
            "max_position_embeddings",
            "rms_norm_eps",
            "pad_token_id",
            "bos_token_id",
            "eos_token_id",
            "tie_word_embeddings",
        )
    }
    llm_dict["rope_theta"] = float(getattr(llm, "rope_theta", None) or text.get("rope_theta", 1e4))
    llama2 = str(cfg.get("llm_backbone_id", "")).startswith("llama2")
    return VLAConfig(
        name=str(cfg.get("llm_backbone_id", "openvla")),
        dino=TIMM_VITS[ids[0]],
        siglip=TIMM_VITS[ids[1]],
        llm=llm_dict,
        tokenizer_vocab_size=llm.vocab_size - pad_multiple,  # as upstream: 32064 - 64
        n_action_bins=int(cfg.get("n_action_bins", 256)),
        prompt_suffix_token_id=29871 if llama2 else None,
        max_length=int(cfg.get("llm_max_length", 2048)),
    )


def read_norm_stats(cfg: dict[str, Any], root: Path, action_dim: int) -> dict[str, Any]:
    stats = cfg.get("norm_stats")
    source = root / "config.json"
    if not stats:
        source = root / "dataset_statistics.json"
        stats = read_json(source)
    if not isinstance(stats, dict) or not stats:
        raise CheckpointError(f"{source}: dataset statistics must be a non-empty mapping")
    for key, entry in stats.items():
        act = entry.get("action") if isinstance(entry, dict) else None
        if not isinstance(act, dict):
            raise CheckpointError(f"{source}: statistics {key!r} have no 'action' entry")
        for q in ("q01", "q99"):
            if len(act.get(q, [])) != action_dim:
                raise CheckpointError(
                    f"{source}: statistics {key!r} action.{q} has {len(act.get(q, []))} values, "
                    f"expected {action_dim}"
                )
    return stats


def _weight_files(root: Path) -> dict[str, str]:
    """key -> file name, from the shard index or the single weights file."""
    if (root / INDEX).is_file():
        index = read_json(root / INDEX)
        wm = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(wm, dict) or not wm:
            raise CheckpointError(f"{root / INDEX}: no 'weight_map'")
        return wm
    if (root / SINGLE).is_file():
        return {}
    raise CheckpointError(f"{root}: no weights found (expected {SINGLE} or {INDEX})")


def read_weights(root: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a checkpoint, with the file each came from."""
    weight_map = _weight_files(root)
    files = sorted(set(weight_map.values())) or [SINGLE]
    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for name in files:
        path = root / name
        if not path.is_file():
            raise CheckpointError(f"missing weights shard {path} (listed in {INDEX})")
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
                    origin[key] = name
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own error types for bad headers/data
            raise CheckpointError(f"corrupt safetensors file {path}: {e}") from e
    for key, name in weight_map.items():
        if origin.get(key) != name:
            raise CheckpointError(f"{INDEX} maps {key!r} to {name}, but {name} does not hold it")
    return tensors, origin


def check_state_dict(
    model: torch.nn.Module, tensors: dict[str, torch.Tensor], origin: dict[str, str]
) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        raise CheckpointError(f"checkpoint is missing {len(missing)} weights, e.g. {missing[:5]}")
    if unexpected:
        raise CheckpointError(
            f"checkpoint has {len(unexpected)} unexpected weights, e.g. "
            f"{[(k, origin[k]) for k in unexpected[:5]]}"
        )
    for key, want in expected.items():
        got = tensors[key]
        if tuple(got.shape) != tuple(want.shape):
            raise CheckpointError(
                f"shape mismatch for {key!r} in {origin[key]}: expected {tuple(want.shape)}, "
                f"found {tuple(got.shape)}"
            )


def load_openvla(
    path: str | Path,
    unnorm_key: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
):
    """Load an OpenVLA-layout checkpoint directory into a Policy."""
    from ..policy import Policy

    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint directory {root} does not exist")
    raw = read_json(root / "config.json")
    cfg = config_from_json(raw, root / "config.json")
    stats = read_norm_stats(raw, root, cfg.action_dim)
    tensors, origin = read_weights(root)
    with torch.device("meta"):
        model = OpenVLAModel(cfg)
    check_state_dict(model, tensors, origin)
    model.load_state_dict(tensors, strict=True, assign=True)
    rebuild_rotary(model)
    model.to(device=device, dtype=dtype)
    try:
        # AutoTokenizer peeks at config.json ("openvla" is no transformers model type) and warns;
        # the tokenizer class comes from tokenizer_config.json, so the warning is noise.
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(root), local_files_only=True)
        finally:
            hf_logging.set_verbosity(verbosity)
    except Exception as e:
        raise CheckpointError(f"cannot load the tokenizer from {root}: {e}") from e
    return Policy(model, tokenizer, stats, unnorm_key=unnorm_key)


def rebuild_rotary(model: OpenVLAModel) -> None:
    """Non-persistent buffers (RoPE inv_freq) aren't in checkpoints: rebuild them off meta."""
    lm = model.language_model
    rotary_cls = type(lm.model.rotary_emb)
    with torch.device("cpu"):  # (transformers 4.x and 5.x both accept just the config)
        lm.model.rotary_emb = rotary_cls(config=lm.config)
    leftover = [n for n, b in model.named_buffers() if b.is_meta]
    if leftover:
        raise CheckpointError(f"buffers not restored from the checkpoint: {leftover[:5]}")


def save_openvla(policy, root: Path, max_shard_bytes: int = 2 * 1024**3) -> Path:
    cfg: VLAConfig = policy.config
    root.mkdir(parents=True, exist_ok=True)
    lm_cfg = policy.model.language_model.config
    config = {
        "architectures": ["OpenVLAForActionPrediction"],
        "model_type": "openvla",
        "vision_backbone_id": "dinosiglip-vit-so-224px",
        "llm_backbone_id": cfg.name,
        "arch_specifier": "no-align+fused-gelu-mlp",
        "use_fused_vision_backbone": True,
        "image_resize_strategy": "resize-naive",
        "image_sizes": [cfg.image_size, cfg.image_size],
        "n_action_bins": cfg.n_action_bins,
        "pad_to_multiple_of": lm_cfg.vocab_size - cfg.tokenizer_vocab_size,
        "pad_token_id": lm_cfg.pad_token_id,
        "llm_max_length": cfg.max_length,
        "norm_stats": policy.norm_stats,
        "text_config": {"model_type": "llama", **cfg.llm},
        "vla_prune": cfg.to_dict(),
    }
    (root / "config.json").write_text(json.dumps(config, indent=2))
    (root / "dataset_statistics.json").write_text(json.dumps(policy.norm_stats, indent=2))
    (root / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "PrismaticImageProcessor",
                "image_resize_strategy": "resize-naive",
                "input_sizes": [[3, cfg.image_size, cfg.image_size]] * 2,
                "interpolations": ["bicubic", "bicubic"],
                "means": [list(m) for m in cfg.image_means],
                "stds": [list(s) for s in cfg.image_stds],
                "use_fused_vision_backbone": True,
            },
            indent=2,
        )
    )
    _save_shards(policy.model.state_dict(), root, max_shard_bytes)
    policy.tokenizer.save_pretrained(str(root))
    return root


def _save_shards(state: dict[str, torch.Tensor], root: Path, max_shard_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t.detach().contiguous().cpu()
        size += nbytes
    for old in list(root.glob("model*.safetensors")) + [root / INDEX]:
        old.unlink(missing_ok=True)
    if len(shards) == 1:
        save_file(shards[0], str(root / SINGLE), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(root / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (root / INDEX).write_text(json.dumps(index, indent=2))

"""OpenVLA checkpoints in the Hugging Face layout, read and written without running their code.

A directory holds what upstream's converter (openvla vla-scripts/extern/
convert_openvla_weights_to_hf.py) writes: config.json (OpenVLAConfig's fields, with norm_stats),
dataset_statistics.json, safetensors weights (one file, or model-0000i-of-0000n shards +
model.safetensors.index.json), tokenizer files and preprocessor_config.json
(PrismaticImageProcessor's fields). Weight names are upstream's HF names; DINOv2's LayerScale is
`ls1.scale_factor` / `ls2.scale_factor` (our checkpoints before that rename said `.gamma`: still
read). Real checkpoints describe their backbones by timm ids; ours also carry our exact
architecture under "vla_prune". No trust_remote_code, no network, safetensors only.

Loaders here return the parts (LoadedCheckpoint) and vla_prune.load_policy wraps them in a
Policy, so models/ never imports policy code.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
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
PREPROCESSOR = "preprocessor_config.json"

# Upstream's ids for OpenVLA's backbones (prismatic/extern/hf/configuration_prismatic.py).
DINO_TIMM_ID = "vit_large_patch14_reg4_dinov2.lvd142m"
SIGLIP_TIMM_ID = "vit_so400m_patch14_siglip_224"
VISION_BACKBONE_ID = "dinosiglip-vit-so-224px"
LLM_BACKBONE_ID = "llama2-7b-pure"
HF_LLM_ID = "meta-llama/Llama-2-7b-hf"
ARCH_SPECIFIER = "no-align+fused-gelu-mlp"
# The backbones real OpenVLA checkpoints name (config.json "timm_model_ids").
TIMM_VITS = {
    DINO_TIMM_ID: ViTConfig(1024, 24, 16, 4096, reg_tokens=4, layer_scale=True),
    SIGLIP_TIMM_ID: ViTConfig(1152, 27, 16, 4304, class_token=False, attn_pool=True),
}
# What upstream's config.json / preprocessor_config.json name for auto classes (its own code).
CONFIG_AUTO_MAP = {
    "AutoConfig": "configuration_prismatic.OpenVLAConfig",
    "AutoModelForVision2Seq": "modeling_prismatic.OpenVLAForActionPrediction",
}
PROCESSOR_AUTO_MAP = {
    "AutoImageProcessor": "processing_prismatic.PrismaticImageProcessor",
    "AutoProcessor": "processing_prismatic.PrismaticProcessor",
}
PIL_BICUBIC = 3  # torchvision's pil_modes_mapping[BICUBIC], as tvf_resize_params stores it
# Our checkpoints before upstream's naming: timm's LayerScale "gamma".
LEGACY_LAYER_SCALE = re.compile(
    r"^(vision_backbone\.(?:featurizer|fused_featurizer)\.blocks\.\d+\.ls[12])\.gamma$"
)


@dataclass
class LoadedCheckpoint:
    """What a checkpoint holds; vla_prune.load_policy wraps it in the matching Policy class."""

    model: torch.nn.Module
    tokenizer: Any
    norm_stats: dict[str, Any]
    unnorm_key: str | None = None


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
    """The architecture from config.json: ours exactly ("vla_prune"), or upstream's fields."""
    if "vla_prune" in cfg:
        try:
            return VLAConfig.from_dict(cfg["vla_prune"])
        except (TypeError, KeyError) as e:
            raise CheckpointError(f"{path}: bad 'vla_prune' architecture block: {e}") from e
    # A real OpenVLA checkpoint: backbones by timm id, the LLM by its Llama text_config.
    if cfg.get("use_fused_vision_backbone", True) is not True:
        raise CheckpointError(
            f"{path}: use_fused_vision_backbone={cfg.get('use_fused_vision_backbone')!r}; "
            "only the fused DINOv2 + SigLIP backbone (OpenVLA's) is supported"
        )
    ids = cfg.get("timm_model_ids")
    if not ids or len(ids) != 2 or any(i not in TIMM_VITS for i in ids):
        raise CheckpointError(
            f"{path}: unsupported vision backbone timm_model_ids={ids}; "
            f"supported: fused {list(TIMM_VITS)}"
        )
    sizes = cfg.get("image_sizes", [224, 224])
    if not isinstance(sizes, list) or len(sizes) != 2 or len(set(sizes)) != 1:
        # the two backbones' patches are concatenated one to one: same grid
        raise CheckpointError(f"{path}: image_sizes must be two equal sizes, found {sizes!r}")
    size = int(sizes[0])
    text = dict(cfg.get("text_config") or {})
    text.pop("model_type", None)
    llm = LlamaConfig(**text)  # upstream writes only the fields that differ from the defaults
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
        dino=dataclasses.replace(TIMM_VITS[ids[0]], image_size=size),
        siglip=dataclasses.replace(TIMM_VITS[ids[1]], image_size=size),
        llm=llm_dict,
        tokenizer_vocab_size=llm.vocab_size - pad_multiple,  # as upstream: 32064 - 64
        n_action_bins=int(cfg.get("n_action_bins", 256)),
        prompt_suffix_token_id=29871 if llama2 else None,
        max_length=int(cfg.get("llm_max_length", 2048)),
    )


def read_preprocessing(root: Path, cfg: VLAConfig) -> VLAConfig:
    """cfg with the image statistics of preprocessor_config.json (PrismaticImageProcessor's).

    Upstream's processor applies `tvf_normalize_params` (ImageProcessingMixin sets the saved
    tvf_* fields over the ones it derives from means/stds), so those win; openvla-7b's are the
    means/stds rounded to bf16 by its converter. Only what we implement is accepted:
    "resize-naive" with bicubic interpolation, no letterbox, the ViTs' input size.
    """
    path = root / PREPROCESSOR
    if not path.is_file():
        log.warning("%s is missing: using %s's default image statistics", path, cfg.name)
        return cfg
    pp = read_json(path)
    if not isinstance(pp, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    strategy = pp.get("image_resize_strategy", "resize-naive")
    if strategy != "resize-naive":
        raise CheckpointError(
            f"{path}: image_resize_strategy {strategy!r} is not supported (only 'resize-naive')"
        )
    if pp.get("tvf_do_letterbox"):
        raise CheckpointError(f"{path}: tvf_do_letterbox is not supported")
    if pp.get("use_fused_vision_backbone", True) is not True:
        raise CheckpointError(f"{path}: use_fused_vision_backbone must be true")
    n, s = len(cfg.image_means), cfg.image_size
    for i, interp in enumerate(pp.get("interpolations") or []):
        if interp != "bicubic":
            raise CheckpointError(f"{path}: interpolations[{i}] is {interp!r}, only 'bicubic'")
    for i, size in enumerate(pp.get("input_sizes") or []):
        if list(size) != [3, s, s]:
            raise CheckpointError(f"{path}: input_sizes[{i}] is {size}, the ViTs take {[3, s, s]}")
    for i, rp in enumerate(pp.get("tvf_resize_params") or []):
        size = rp.get("size") if isinstance(rp, dict) else None
        if size not in ([s, s], s) or rp.get("interpolation", PIL_BICUBIC) != PIL_BICUBIC:
            raise CheckpointError(
                f"{path}: tvf_resize_params[{i}] is {rp}; expected size {[s, s]}, bicubic "
                f"({PIL_BICUBIC})"
            )
    norm = pp.get("tvf_normalize_params")
    if norm:
        field = "tvf_normalize_params"
        if not all(isinstance(x, dict) for x in norm):
            raise CheckpointError(f"{path}: {field} must be a list of objects")
        means, stds = [x.get("mean") for x in norm], [x.get("std") for x in norm]
    else:
        field, means, stds = "means/stds", pp.get("means"), pp.get("stds")
        if means is None and stds is None:
            return cfg
    try:
        means_t = tuple(tuple(float(v) for v in m) for m in means)
        stds_t = tuple(tuple(float(v) for v in x) for x in stds)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: malformed {field}: {e}") from e
    if len(means_t) != n or len(stds_t) != n or any(len(v) != 3 for v in means_t + stds_t):
        raise CheckpointError(f"{path}: {field} must hold {n} backbones x 3 channels")
    if (means_t, stds_t) != (cfg.image_means, cfg.image_stds):
        log.debug("%s: image statistics %s / %s from %s", path, means_t, stds_t, field)
    return dataclasses.replace(cfg, image_means=means_t, image_stds=stds_t)


def read_openvla_config(root: Path) -> tuple[VLAConfig, dict[str, Any]]:
    """The architecture (with preprocessing) of a checkpoint directory, and its raw config.json."""
    raw = read_json(root / "config.json")
    if not isinstance(raw, dict):
        raise CheckpointError(f"{root / 'config.json'}: expected a JSON object")
    cfg = config_from_json(raw, root / "config.json")
    return read_preprocessing(root, cfg), raw


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
        # a misnamed weight shows up on both sides: name both, so the rename is visible
        extra = f"; unexpected: {[(k, origin[k]) for k in unexpected[:5]]}" if unexpected else ""
        raise CheckpointError(
            f"checkpoint is missing {len(missing)} weights, e.g. {missing[:5]}{extra}"
        )
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


def upgrade_legacy_names(
    tensors: dict[str, torch.Tensor], origin: dict[str, str], root: Path
) -> None:
    """Our checkpoints before upstream's naming stored LayerScale as timm's `.gamma`: rename."""
    old = [k for k in tensors if LEGACY_LAYER_SCALE.match(k)]
    for key in old:
        new = key.removesuffix(".gamma") + ".scale_factor"
        if new in tensors:
            raise CheckpointError(
                f"{root}: both {key!r} ({origin[key]}) and {new!r} ({origin[new]}): one weight "
                "under its old and its new name"
            )
        tensors[new], origin[new] = tensors.pop(key), origin.pop(key)
    if old:
        log.debug(
            "%s: %d LayerScale weights under the old name '.gamma', read as '.scale_factor'",
            root,
            len(old),
        )


def load_openvla(
    path: str | Path,
    unnorm_key: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> LoadedCheckpoint:
    """Read an OpenVLA-layout checkpoint directory: the model, tokenizer and statistics."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint directory {root} does not exist")
    cfg, raw = read_openvla_config(root)
    stats = read_norm_stats(raw, root, cfg.action_dim)
    tensors, origin = read_weights(root)
    upgrade_legacy_names(tensors, origin, root)
    with torch.device("meta"):
        model = OpenVLAModel(cfg)
    check_state_dict(model, tensors, origin)
    model.load_state_dict(tensors, strict=True, assign=True)
    rebuild_rotary(model)
    model.to(device=device, dtype=dtype)
    return LoadedCheckpoint(model, load_tokenizer(root), stats, unnorm_key)


def load_tokenizer(root: Path) -> Any:
    """The tokenizer files of a checkpoint directory, never downloading anything."""
    # AutoTokenizer peeks at config.json (OpenVLA's "openvla" or CogACT's: no transformers
    # model type) and warns; the class comes from tokenizer_config.json: the warning is noise.
    # trust_remote_code=False: upstream's config.json has an auto_map, and transformers would
    # otherwise stop to ask on the terminal whether to run that code.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(
            str(root), local_files_only=True, trust_remote_code=False
        )
    except Exception as e:
        raise CheckpointError(f"cannot load the tokenizer from {root}: {e}") from e
    finally:
        hf_logging.set_verbosity(verbosity)


def rebuild_rotary(model: OpenVLAModel) -> None:
    """Non-persistent buffers (RoPE inv_freq) aren't in checkpoints: rebuild them off meta."""
    lm = model.language_model
    rotary_cls = type(lm.model.rotary_emb)
    with torch.device("cpu"):  # (transformers 4.x and 5.x both accept just the config)
        lm.model.rotary_emb = rotary_cls(config=lm.config)
    leftover = [n for n, b in model.named_buffers() if b.is_meta]
    if leftover:
        raise CheckpointError(f"buffers not restored from the checkpoint: {leftover[:5]}")


# -- writing ----------------------------------------------------------------------------------


def is_upstream_architecture(cfg: VLAConfig) -> bool:
    """Whether upstream's code can build this architecture (openvla-7b's shapes)."""
    from .presets import get_preset

    ref = get_preset("openvla-7b")
    return (cfg.dino, cfg.siglip, cfg.llm, cfg.tokenizer_vocab_size) == (
        TIMM_VITS[DINO_TIMM_ID],
        TIMM_VITS[SIGLIP_TIMM_ID],
        ref.llm,
        ref.tokenizer_vocab_size,
    )


def upstream_config(cfg: VLAConfig, norm_stats: dict[str, Any], dtype: torch.dtype) -> dict:
    """config.json with OpenVLAConfig's fields (as its to_json writes them) + our "vla_prune".

    Other architectures get "vla-prune:<name>" ids: upstream's PrismaticConfig rejects those by
    name instead of failing later on shapes; our loader reads the "vla_prune" block."""
    upstream = is_upstream_architecture(cfg)
    ours = f"vla-prune:{cfg.name}"
    llm = {"model_type": "llama", **cfg.llm}
    dtype_name = str(dtype).removeprefix("torch.")
    timm_ids = [DINO_TIMM_ID, SIGLIP_TIMM_ID] if upstream else [f"{ours}/dino", f"{ours}/siglip"]
    return {
        "arch_specifier": ARCH_SPECIFIER,
        "architectures": ["OpenVLAForActionPrediction"],
        "auto_map": CONFIG_AUTO_MAP,
        "hf_llm_id": HF_LLM_ID if upstream else ours,
        "image_resize_strategy": "resize-naive",
        "image_sizes": [cfg.image_size, cfg.image_size],
        "llm_backbone_id": LLM_BACKBONE_ID if upstream else ours,
        "llm_max_length": cfg.max_length,
        "model_type": "openvla",
        "n_action_bins": cfg.n_action_bins,
        "norm_stats": norm_stats,
        "output_projector_states": False,
        "pad_to_multiple_of": int(cfg.llm["vocab_size"]) - cfg.tokenizer_vocab_size,
        "pad_token_id": cfg.llm["pad_token_id"],
        "text_config": {**llm, "torch_dtype": dtype_name},
        "timm_model_ids": timm_ids,
        "timm_override_act_layers": [None, None],
        "torch_dtype": dtype_name,
        "transformers_version": transformers.__version__,
        "use_fused_vision_backbone": True,
        "vision_backbone_id": VISION_BACKBONE_ID if upstream else ours,
        "vla_prune": cfg.to_dict(),
    }


def upstream_preprocessor_config(cfg: VLAConfig) -> dict[str, Any]:
    """preprocessor_config.json as PrismaticImageProcessor + PrismaticProcessor save it."""
    s, n = cfg.image_size, len(cfg.image_means)
    return {
        "auto_map": PROCESSOR_AUTO_MAP,
        "image_processor_type": "PrismaticImageProcessor",
        "image_resize_strategy": "resize-naive",
        "input_sizes": [[3, s, s]] * n,
        "interpolations": ["bicubic"] * n,
        "means": [list(m) for m in cfg.image_means],
        "processor_class": "PrismaticProcessor",
        "stds": [list(x) for x in cfg.image_stds],
        "tvf_crop_params": [{"output_size": [s, s]}] * n,
        "tvf_do_letterbox": False,
        "tvf_letterbox_fill": None,
        "tvf_normalize_params": [
            {"inplace": False, "mean": list(m), "std": list(x)}
            for m, x in zip(cfg.image_means, cfg.image_stds)
        ],
        "tvf_resize_params": [
            {"antialias": True, "interpolation": PIL_BICUBIC, "max_size": None, "size": [s, s]}
        ]
        * n,
        "use_fused_vision_backbone": True,
    }


def save_openvla(
    model: OpenVLAModel,
    tokenizer: Any,
    norm_stats: dict[str, Any],
    root: Path,
    max_shard_bytes: int = 2 * 1024**3,
) -> Path:
    """Write upstream's HF layout (names and fields as its converter writes them)."""
    cfg: VLAConfig = model.config
    root.mkdir(parents=True, exist_ok=True)
    dtype = next(model.parameters()).dtype
    config = upstream_config(cfg, norm_stats, dtype)
    (root / "config.json").write_text(json.dumps(config, indent=2))
    (root / "dataset_statistics.json").write_text(json.dumps(norm_stats, indent=2))
    (root / PREPROCESSOR).write_text(json.dumps(upstream_preprocessor_config(cfg), indent=2))
    _save_shards(model.state_dict(), root, max_shard_bytes)
    tokenizer.save_pretrained(str(root))
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

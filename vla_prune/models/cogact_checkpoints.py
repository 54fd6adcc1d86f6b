"""CogACT checkpoints in CogACT's own layout, read with torch.load(weights_only=True) only.

A run directory (as CogACT's training writes it and its Hugging Face repos ship it):

    config.json (and/or config.yaml)   {"vla": {"base_vlm": ...}, "action_model_type": "DiT-B", ...}
    dataset_statistics.json            {unnorm_key: {"action": {"q01", "q99", "mask", ...}}}
    checkpoints/<name>.pt              {"model": {group: state_dict}}

The .pt groups are the CogACT modules with the "vlm." prefix stripped (its FSDP saver does that):
"vision_backbone" (timm ViTs dino_featurizer.* / siglip_featurizer.*), "projector"
(projector.0 / .2 / .4 of an nn.Sequential), "llm_backbone" (llm.* = LlamaForCausalLM) and
"action_model" (net.* = the DiT); "ema_diffusion" (an EMA copy of the action model) is ignored.
A flat state dict with "vlm."-prefixed keys is accepted too. Keys map onto our modules:

    vision_backbone.dino_featurizer.X    <-> vision_backbone.featurizer.X
    vision_backbone.siglip_featurizer.X  <-> vision_backbone.fused_featurizer.X
    projector.projector.{0,2,4}.X        <-> projector.fc{1,2,3}.X
    llm_backbone.llm.X                   <-> language_model.X
    action_model.net.X                   <-> action_model.net.X

The ViTs keep timm's names there, LayerScale included: CogACT's blocks.N.ls{1,2}.gamma is our
(and OpenVLA's HF) blocks.N.ls{1,2}.scale_factor. Only OpenVLA's HF converter renames it.

CogACT repos ship no tokenizer (upstream fetches Llama-2's at run time); we never download, so
the tokenizer files must sit in the directory (our save() writes them there).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
import yaml

from .checkpoints import (
    CheckpointError,
    LoadedCheckpoint,
    load_tokenizer,
    read_json,
    read_norm_stats,
    rebuild_rotary,
)
from .cogact import CogACTConfig, CogACTModel, cogact_config
from .dit import DIT_SIZES, DiTConfig

log = logging.getLogger(__name__)

# (our prefix, CogACT group, prefix inside the group)
KEY_MAP = (
    ("vision_backbone.featurizer.", "vision_backbone", "dino_featurizer."),
    ("vision_backbone.fused_featurizer.", "vision_backbone", "siglip_featurizer."),
    ("projector.fc1.", "projector", "projector.0."),
    ("projector.fc2.", "projector", "projector.2."),
    ("projector.fc3.", "projector", "projector.4."),
    ("language_model.", "llm_backbone", "llm."),
    ("action_model.", "action_model", ""),
)
GROUPS = ("vision_backbone", "projector", "llm_backbone", "action_model")
IGNORED_GROUPS = ("ema_diffusion",)  # EMA copy of the action model (use_ema runs)
# CogACT's base VLM ids -> the preset with those shapes.
BASE_VLMS = {"prism-dinosiglip-224px+7b": "openvla-7b"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
# timm's LayerScale parameter (CogACT) and ours / OpenVLA HF's, at the end of a ViT block key.
TIMM_LAYER_SCALE = re.compile(r"(\.blocks\.\d+\.ls[12])\.gamma$")
OUR_LAYER_SCALE = re.compile(r"(\.blocks\.\d+\.ls[12])\.scale_factor$")


def to_cogact(key: str) -> tuple[str, str]:
    """Our state-dict key -> (CogACT group, key inside that group)."""
    for ours, group, inner in KEY_MAP:
        if key.startswith(ours):
            theirs = inner + key[len(ours) :]
            if group == "vision_backbone":
                theirs = OUR_LAYER_SCALE.sub(r"\1.gamma", theirs)
            return group, theirs
    raise KeyError(f"no CogACT name for {key!r}")


def from_cogact(group: str, key: str) -> str | None:
    """(CogACT group, key) -> our key, or None if it names nothing of ours."""
    if group == "vision_backbone":
        if OUR_LAYER_SCALE.search(key):
            return None  # not CogACT's name: its timm ViTs say ".gamma"
        key = TIMM_LAYER_SCALE.sub(r"\1.scale_factor", key)
    for ours, g, inner in KEY_MAP:
        if g == group and key.startswith(inner):
            return ours + key[len(inner) :]
    return None


def find_checkpoint(path: str | Path) -> Path | None:
    """The .pt of a CogACT run directory (or the .pt itself), None if this isn't one."""
    path = Path(path)
    if path.is_file() and path.suffix == ".pt":
        return path
    pts = sorted((path / "checkpoints").glob("*.pt")) if path.is_dir() else []
    if not pts:
        return None
    if len(pts) > 1:
        latest = path / "checkpoints" / "latest-checkpoint.pt"
        if latest in pts:
            return latest
        names = [p.name for p in pts]
        raise CheckpointError(
            f"{path / 'checkpoints'} holds several checkpoints {names}: pass the .pt file itself"
        )
    return pts[0]


def is_cogact_dir(path: str | Path) -> bool:
    try:
        return find_checkpoint(path) is not None
    except CheckpointError:
        return True  # it is one; loading will report the ambiguity


def _run_dir(pt: Path) -> Path:
    return pt.parent.parent if pt.parent.name == "checkpoints" else pt.parent


# -- reading ----------------------------------------------------------------------------------


def read_cogact_pt(pt: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors under our names, and each one's CogACT name ("group.key") for error messages."""
    try:
        obj = torch.load(pt, map_location="cpu", weights_only=True)
    except Exception as e:  # zip/pickle errors, or a pickle that isn't plain tensors
        raise CheckpointError(f"corrupt or unsafe checkpoint {pt}: {e}") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{pt}: expected a dict, found {type(obj).__name__}")
    groups = _groups(obj.get("model", obj), pt)
    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for group, sd in groups.items():
        if group in IGNORED_GROUPS:
            log.info("%s: ignoring %r (%d tensors)", pt, group, len(sd))
            continue
        if group not in GROUPS:
            raise CheckpointError(f"{pt}: unexpected group {group!r}; expected {list(GROUPS)}")
        if not isinstance(sd, dict):
            raise CheckpointError(f"{pt}: group {group!r} is {type(sd).__name__}, not a dict")
        for key, value in sd.items():
            name = f"{group}.{key}"
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(f"{pt}: {name!r} is {type(value).__name__}, not a tensor")
            if key.endswith("rotary_emb.inv_freq"):  # derived buffer, rebuilt from the config
                continue
            ours = from_cogact(group, key)
            if ours is None:
                raise CheckpointError(f"{pt}: unexpected weight {name!r}")
            tensors[ours], origin[ours] = value, name
    return tensors, origin


def _groups(model: Any, pt: Path) -> dict[str, Any]:
    """{"group": state_dict} from the nested layout or from flat ("vlm.")group.key names."""
    if not isinstance(model, dict) or not model:
        raise CheckpointError(f"{pt}: 'model' must be a non-empty dict of state dicts")
    if not all(isinstance(v, torch.Tensor) for v in model.values()):
        return model
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in model.items():
        group, _, rest = key.removeprefix("vlm.").partition(".")
        groups.setdefault(group, {})[rest] = value
    return groups


def check_weights(
    model: CogACTModel, tensors: dict[str, torch.Tensor], origin: dict[str, str], pt: Path
) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors]
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        names = [".".join(to_cogact(k)) for k in missing[:5]]
        # a misnamed weight shows up on both sides: name both, so the rename is visible
        extra = f"; unexpected: {[origin[k] for k in unexpected[:5]]}" if unexpected else ""
        raise CheckpointError(f"{pt} is missing {len(missing)} weights, e.g. {names}{extra}")
    if unexpected:
        names = [origin[k] for k in unexpected[:5]]
        raise CheckpointError(f"{pt} has {len(unexpected)} unexpected weights, e.g. {names}")
    for key, want in expected.items():
        got = tensors[key]
        if tuple(got.shape) != tuple(want.shape):
            raise CheckpointError(
                f"{pt}: shape mismatch for {origin[key]!r}: expected {tuple(want.shape)}, "
                f"found {tuple(got.shape)}"
            )


def _read_config(root: Path) -> tuple[dict[str, Any], Path]:
    if (root / "config.json").is_file():
        return read_json(root / "config.json"), root / "config.json"
    path = root / "config.yaml"
    if not path.is_file():
        raise CheckpointError(f"missing file {root / 'config.json'} (or config.yaml)")
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise CheckpointError(f"corrupt YAML in {path}: {e}") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a mapping at the top level")
    return raw, path


def config_from_cogact(
    raw: dict[str, Any], path: Path, tensors: dict[str, torch.Tensor]
) -> CogACTConfig:
    if "vla_prune" in raw:  # ours: the exact architecture
        try:
            return CogACTConfig.from_dict(raw["vla_prune"])
        except (TypeError, KeyError, ValueError) as e:
            raise CheckpointError(f"{path}: bad 'vla_prune' architecture block: {e}") from e
    from .presets import get_preset

    vla = raw.get("vla") if isinstance(raw.get("vla"), dict) else {}
    base_id = vla.get("base_vlm")
    if base_id not in BASE_VLMS:
        raise CheckpointError(
            f"{path}: unsupported vla.base_vlm {base_id!r}; supported: {sorted(BASE_VLMS)}"
        )
    base = get_preset(BASE_VLMS[base_id])
    dit = _dit_from_weights(tensors, path, base.llm_dim)
    size = raw.get("action_model_type")
    if size is not None:
        if size not in DIT_SIZES:
            raise CheckpointError(
                f"{path}: unknown action_model_type {size!r}; known: {sorted(DIT_SIZES)}"
            )
        if DIT_SIZES[size][:2] != (dit.depth, dit.hidden_size):
            raise CheckpointError(
                f"{path}: action_model_type {size} expects depth/width {DIT_SIZES[size][:2]}, "
                f"the weights have {(dit.depth, dit.hidden_size)}"
            )
    action_dim = int(raw.get("action_dim", dit.in_channels))
    if action_dim != dit.in_channels:
        raise CheckpointError(
            f"{path}: action_dim {action_dim} but the DiT has {dit.in_channels} channels"
        )
    future = int(raw.get("future_action_window_size", dit.future_action_window_size))
    if future != dit.future_action_window_size:
        raise CheckpointError(
            f"{path}: future_action_window_size {future} but the positional embedding has "
            f"{dit.future_action_window_size + 2} rows (expected {future + 2})"
        )
    return cogact_config(
        base, dit=dit, name=str(vla.get("vla_id") or "cogact"), dit_size=size, action_dim=action_dim
    )


def _dit_from_weights(tensors: dict[str, torch.Tensor], path: Path, llm_dim: int) -> DiTConfig:
    """Depth, width and chunk of the DiT from its weights; heads from CogACT's size table."""
    pos = tensors.get("action_model.net.positional_embedding")
    x_emb = tensors.get("action_model.net.x_embedder.linear.weight")
    if pos is None or x_emb is None or pos.dim() != 2 or x_emb.dim() != 2:
        raise CheckpointError(
            f"{path}: cannot size the DiT: action_model.net.positional_embedding / "
            "x_embedder.linear.weight missing or malformed"
        )
    depth = len({k.split(".")[3] for k in tensors if k.startswith("action_model.net.blocks.")})
    width = int(pos.shape[1])
    heads = {(d, w): h for d, w, h in DIT_SIZES.values()}.get((depth, width))
    if heads is None:
        raise CheckpointError(
            f"{path}: DiT with depth {depth} and width {width} is none of {DIT_SIZES}"
        )
    return DiTConfig(
        depth=depth,
        hidden_size=width,
        num_heads=heads,
        in_channels=int(x_emb.shape[1]),
        token_size=llm_dim,
        future_action_window_size=int(pos.shape[0]) - 2,
    )


def load_cogact(
    path: str | Path,
    unnorm_key: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> LoadedCheckpoint:
    """Read a CogACT run directory (or its .pt): the model, tokenizer and statistics."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    pt = find_checkpoint(path)
    if pt is None:
        raise CheckpointError(f"{path}: no CogACT checkpoint (expected checkpoints/*.pt)")
    root = _run_dir(pt)
    raw, cfg_path = _read_config(root)
    tensors, origin = read_cogact_pt(pt)
    cfg = config_from_cogact(raw, cfg_path, tensors)
    stats = read_norm_stats({}, root, cfg.action_dim)
    if unnorm_key is not None and unnorm_key not in stats:
        raise CheckpointError(
            f"{root / 'dataset_statistics.json'}: unknown unnorm_key {unnorm_key!r}; "
            f"this checkpoint has {sorted(stats)}"
        )
    with torch.device("meta"):
        model = CogACTModel(cfg)
    check_weights(model, tensors, origin, pt)
    model.load_state_dict(tensors, strict=True, assign=True)
    rebuild_rotary(model)
    model.to(device=device, dtype=dtype)
    return LoadedCheckpoint(model, _tokenizer(root), stats, unnorm_key)


def _tokenizer(root: Path) -> Any:
    if not any((root / f).is_file() for f in TOKENIZER_FILES):
        raise CheckpointError(
            f"no tokenizer in {root} (looked for {list(TOKENIZER_FILES)}): CogACT checkpoints "
            "don't ship one; copy Llama-2-7B's tokenizer files into that directory"
        )
    return load_tokenizer(root)


# -- writing ----------------------------------------------------------------------------------


def cogact_state(model: CogACTModel) -> dict[str, dict[str, torch.Tensor]]:
    """Our state dict in CogACT's nested {group: state_dict} layout."""
    groups: dict[str, dict[str, torch.Tensor]] = {g: {} for g in GROUPS}
    for key, t in model.state_dict().items():
        group, inner = to_cogact(key)
        groups[group][inner] = t.detach().contiguous().cpu()
    return groups


def save_cogact(model: CogACTModel, tokenizer: Any, norm_stats: dict[str, Any], root: Path) -> Path:
    """CogACT's run-directory layout: checkpoints/<name>.pt, config.json/.yaml, statistics."""
    cfg: CogACTConfig = model.config
    root.mkdir(parents=True, exist_ok=True)
    ckpt_dir = root / "checkpoints"
    ckpt_dir.mkdir(exist_ok=True)
    for old in ckpt_dir.glob("*.pt"):  # one checkpoint per directory, as CogACT's repos
        old.unlink()
    base_vlm = next(
        (k for k, v in BASE_VLMS.items() if _same_backbone(cfg, v)), f"vla-prune:{cfg.name}"
    )
    config = {
        "vla": {"vla_id": cfg.name, "base_vlm": base_vlm},
        "action_model_type": cfg.dit_size,
        "action_dim": cfg.action_dim,
        "future_action_window_size": cfg.dit.future_action_window_size,
        "past_action_window_size": cfg.dit.past_action_window_size,
        "use_ema": False,
        "vla_prune": cfg.to_dict(),
    }
    (root / "config.json").write_text(json.dumps(config, indent=2))
    plain = json.loads(json.dumps(config))  # tuples -> lists: YAML's safe dumper wants plain types
    (root / "config.yaml").write_text(yaml.safe_dump(plain, sort_keys=False))
    (root / "dataset_statistics.json").write_text(json.dumps(norm_stats, indent=2))
    torch.save({"model": cogact_state(model)}, ckpt_dir / f"{_file_name(cfg.name)}.pt")
    tokenizer.save_pretrained(str(root))
    return root


def _same_backbone(cfg: CogACTConfig, preset: str) -> bool:
    from .presets import get_preset

    base = get_preset(preset)
    return (cfg.dino, cfg.siglip, cfg.llm) == (base.dino, base.siglip, base.llm)


def _file_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "cogact"

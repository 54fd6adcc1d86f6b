"""Domain pretraining of the policy's fused ViT pair on labelled frames of the embedded suite.

OpenVLA generalizes because its DINOv2/SigLIP backbone was pretrained; those weights can't be
downloaded here, but the suite renders unlimited frames with exact labels. This trains the
same `FusedVisionBackbone` the policy uses (so its weights load straight into a policy with
`sim.train --init-vision`) with a linear per-patch head on dense targets from the segmentation
render (`sim.seglabels`): which thing each patch shows (background / table / gripper / fixture
kind x colour / object colour x shape: 39 classes), and for things the sub-patch offset of its
centre and its height. No LLM in the loop, so it is cheap.

Frames come from a ring buffer refilled on the fly (`--refresh` new scenes per step, seeds
TRAIN_SEED_START + k, families in turn; random gripper poses, held / stacked objects, camera
and lighting jitter). Held-out accuracy is measured on `--heldout-frames` fixed frames from
seeds HELDOUT_SEED_START + k (never used for training), canonical camera and lighting.

    python -m sim.pretrain_vision --out runs/pretrain-vit --steps 40000 \
        --export-dir checkpoints-training/pretrain-vit

Resumable: OUT/train_state.pt every --save-every steps (run the same command again); the
exported folder holds a copy of it, so a fresh clone resumes with
``mkdir -p OUT && cp EXPORT/train_state.pt OUT/`` and the same command.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from sim.envs.embedded.scene import SHAPES
from sim.seglabels import (
    CLASS_GRIPPER,
    CLASS_TABLE,
    FIXTURE_CLASS0,
    N_CLASSES,
    OBJECT_CLASS0,
    Frame,
    SceneSampler,
    patch_labels,
)
from vla_prune.models.arch import VLAConfig
from vla_prune.models.presets import get_preset
from vla_prune.models.prismatic import FusedVisionBackbone
from vla_prune.preprocess import image_to_pixels

log = logging.getLogger(__name__)

FAMILIES = ("press", "push", "pick_place", "stack")
TRAIN_SEED_START = 5_000_000  # demos use 1.0M-1.5M, probes 1.9M, DAgger 3.0M+, eval 0-9999
HELDOUT_SEED_START = 4_000_000
MAX_ENTITIES = 12  # background, table, gripper + up to 4 fixtures/objects + 4 objects
# Config fields that may differ on resume (they change how a run is operated, not what it learns)
OPERATIONAL = {
    "out",
    "threads",
    "log_every",
    "save_every",
    "eval_every",
    "export_dir",
    "export_every_min",
    "steps",
}


@dataclass
class PretrainConfig:
    out: str
    preset: str = "tiny-openvla-112"
    steps: int = 40000
    batch_size: int = 64
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup: int = 300
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    buffer_size: int = 12000  # frames held in memory (~64 KB each)
    initial_frames: int = 1024  # rendered before the first step; the rest fills on the fly
    refresh: int = 16  # new scenes rendered per step
    jitter: float = 0.5  # fraction of training frames with camera / lighting jitter
    shift: int = 4  # random shift (pixels of the 128 px render), as sim.train does
    object_weight: float = 2.0  # CE weight of object patches (the rare, hard class)
    reg_weight: float = 1.0
    heldout_frames: int = 800
    seed: int = 0
    threads: int = 1
    log_every: int = 50
    eval_every: int = 1000
    save_every: int = 500
    export_dir: str = ""  # also copy weights + log + state here every export_every_min
    export_every_min: float = 15.0


class PatchHead(torch.nn.Module):
    """Linear per-patch head: class logits + (dx, dy, height). Linear on purpose, so what it
    reads stays linearly available to the policy's projector."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = torch.nn.LayerNorm(dim)
        self.fc = torch.nn.Linear(dim, N_CLASSES + 3)

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.fc(self.norm(feats))
        return out[..., :N_CLASSES], out[..., N_CLASSES:]


class FrameBuffer:
    """Rendered frames and their entity maps; appended until full, then replaced in turn."""

    def __init__(self, capacity: int, size: int = 128):
        self.images = np.zeros((capacity, size, size, 3), np.uint8)
        self.entities = np.zeros((capacity, size, size), np.uint8)
        self.ent_class = np.zeros((capacity, MAX_ENTITIES), np.int64)
        self.ent_uv = np.zeros((capacity, MAX_ENTITIES, 2), np.float32)
        self.ent_z = np.zeros((capacity, MAX_ENTITIES), np.float32)
        self.n_ent = np.zeros(capacity, np.int64)
        self.capacity, self.count, self.next = capacity, 0, 0

    def add(self, f: Frame) -> None:
        i, n = self.next, len(f.ent_class)
        self.images[i], self.entities[i] = f.image, f.entities
        self.ent_class[i, :n], self.ent_uv[i, :n], self.ent_z[i, :n] = (
            f.ent_class,
            f.ent_uv,
            f.ent_z,
        )
        self.n_ent[i] = n
        self.next = (i + 1) % self.capacity
        self.count = min(self.count + 1, self.capacity)

    def __len__(self) -> int:
        return self.count


class FrameSource:
    """Renders frame k of the stream: family k % 4, seed start + k; one sampler per family."""

    def __init__(self, seed_start: int, rng_seed: int):
        self.samplers = {f: SceneSampler(f) for f in FAMILIES}
        self.seed_start = seed_start
        self.rng = np.random.default_rng(rng_seed)

    def render(self, k: int, jitter: bool) -> Frame:
        family = FAMILIES[k % len(FAMILIES)]
        return self.samplers[family].frame(self.seed_start + k, self.rng, jitter=jitter)

    def close(self) -> None:
        for s in self.samplers.values():
            s.close()


def make_batch(
    buf: FrameBuffer,
    idx: np.ndarray,
    preset: VLAConfig,
    shift: int,
    gen: np.random.Generator | None,
) -> dict[str, torch.Tensor]:
    """Pixels [B, 6, S, S] as the policy preprocesses them, plus per-patch labels."""
    grid = preset.dino.image_size // preset.dino.patch
    pixels, labels = [], []
    for i in idx:
        img, ent, uv = buf.images[i], buf.entities[i], buf.ent_uv[i, : buf.n_ent[i]]
        if shift and gen is not None:  # the same shift for the image and its labels
            dx, dy = gen.integers(0, 2 * shift + 1, 2)
            h, w = ent.shape
            img = np.pad(img, ((shift, shift), (shift, shift), (0, 0)), mode="edge")[
                dy : dy + h, dx : dx + w
            ]
            ent = np.pad(ent, shift, mode="edge")[dy : dy + h, dx : dx + w]
            uv = uv - np.array([dx - shift, dy - shift], np.float32)
        n = buf.n_ent[i]
        labels.append(patch_labels(ent, buf.ent_class[i, :n], uv, buf.ent_z[i, :n], grid))
        pixels.append(
            image_to_pixels(img, preset.image_size, preset.image_means, preset.image_stds)
        )
    out = {k: torch.from_numpy(np.stack([lab[k] for lab in labels])) for k in labels[0]}
    out["pixels"] = torch.cat(pixels)
    return out


def losses(
    backbone: torch.nn.Module, head: PatchHead, batch: dict, cfg: PretrainConfig
) -> tuple[torch.Tensor, dict]:
    cls_logits, reg = head(backbone(batch["pixels"]))
    target = batch["cls"]
    is_object = target >= OBJECT_CLASS0
    weight = torch.where(is_object, cfg.object_weight, 1.0)
    ce = (
        F.cross_entropy(cls_logits.flatten(0, 1), target.flatten(), reduction="none")
        * weight.flatten()
    ).sum() / weight.sum()
    mask = batch["reg_mask"]
    reg_target = torch.cat([batch["offset"], batch["height"][..., None]], dim=-1)
    if mask.any():
        reg_loss = F.smooth_l1_loss(reg[mask], reg_target[mask], beta=0.1)
    else:
        reg_loss = torch.zeros(())
    acc = (cls_logits.argmax(-1) == target).float().mean()
    return ce + cfg.reg_weight * reg_loss, {
        "ce": ce.item(),
        "reg": reg_loss.item(),
        "acc": acc.item(),
    }


@torch.no_grad()
def evaluate(
    backbone: torch.nn.Module,
    head: PatchHead,
    buf: FrameBuffer,
    preset: VLAConfig,
    batch_size: int = 64,
) -> dict[str, float]:
    """Per-patch accuracy on the held-out frames, overall and per kind of thing; offset and
    height errors on the patches that show a thing."""
    was = backbone.training
    backbone.eval()
    preds, targets, regs, reg_t, masks = [], [], [], [], []
    for start in range(0, len(buf), batch_size):
        b = make_batch(buf, np.arange(start, min(start + batch_size, len(buf))), preset, 0, None)
        logits, reg = head(backbone(b["pixels"]))
        preds.append(logits.argmax(-1).flatten())
        targets.append(b["cls"].flatten())
        regs.append(reg.flatten(0, 1))
        reg_t.append(torch.cat([b["offset"], b["height"][..., None]], -1).flatten(0, 1))
        masks.append(b["reg_mask"].flatten())
    backbone.train(was)
    p, t, r, rt, m = (torch.cat(x) for x in (preds, targets, regs, reg_t, masks))
    obj = t >= OBJECT_CLASS0
    fix = (t >= FIXTURE_CLASS0) & ~obj
    n_shapes = len(SHAPES)

    def frac(sel: torch.Tensor) -> float:
        return round((p[sel] == t[sel]).float().mean().item(), 4) if sel.any() else float("nan")

    po, to = p[obj] - OBJECT_CLASS0, t[obj] - OBJECT_CLASS0
    pred_obj = p[obj] >= OBJECT_CLASS0
    patch_px = 128 / (preset.dino.image_size // preset.dino.patch)
    return {
        "patch_acc": frac(torch.ones_like(t, dtype=torch.bool)),
        "object_acc": frac(obj),
        "object_color_acc": round(
            ((po // n_shapes == to // n_shapes) & pred_obj).float().mean().item(), 4
        ),
        "object_shape_acc": round(
            ((po % n_shapes == to % n_shapes) & pred_obj).float().mean().item(), 4
        ),
        "fixture_acc": frac(fix),
        "gripper_acc": frac(t == CLASS_GRIPPER),
        "table_acc": frac(t == CLASS_TABLE),
        "offset_mae_px": round(((r[m, :2] - rt[m, :2]).abs().mean() * patch_px).item(), 2),
        "height_mae_cm": round(((r[m, 2] - rt[m, 2]).abs().mean() * 10).item(), 2),
        "n_object_patches": int(obj.sum()),
        "n_frames": len(buf),
    }


def heldout_buffer(n: int) -> FrameBuffer:
    """Fixed held-out frames: seeds HELDOUT_SEED_START + k, random states, no view jitter."""
    buf = FrameBuffer(n)
    src = FrameSource(HELDOUT_SEED_START, rng_seed=12345)
    try:
        for k in range(n):
            buf.add(src.render(k, jitter=False))
    finally:
        src.close()
    return buf


def load_vision_backbone(backbone: torch.nn.Module, path: str | Path) -> None:
    """Load pretrained ViT-pair weights (this module's export, or any safetensors file with the
    backbone's keys, optionally prefixed 'vision_backbone.') into `backbone`, strictly."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--init-vision: no such file {path}")
    state = load_file(str(path))
    state = {k.removeprefix("vision_backbone."): v for k, v in state.items()}
    want = backbone.state_dict()
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    shapes = [
        f"{k} {tuple(v.shape)} != {tuple(want[k].shape)}"
        for k, v in state.items()
        if k in want and want[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{path} does not fit this policy's vision backbone (another preset?): "
            f"missing {missing[:3]} ({len(missing)}), unexpected {unexpected[:3]} "
            f"({len(unexpected)}), shape mismatches {shapes[:3]} ({len(shapes)})"
        )
    backbone.load_state_dict(state)


def lr_at(step: int, cfg: PretrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def _learned(cfg: PretrainConfig) -> dict:
    return {k: v for k, v in asdict(cfg).items() if k not in OPERATIONAL}


def export(
    out: Path, dest: Path, backbone: torch.nn.Module, head: PatchHead, step: int, preset: str
) -> None:
    """Weights (safetensors, fp32), head, a copy of train_state.pt and of the log, into dest."""
    dest.mkdir(parents=True, exist_ok=True)
    meta = {"preset": preset, "step": str(step), "format": "vla_prune.FusedVisionBackbone"}
    tensors = {k: v.contiguous() for k, v in backbone.state_dict().items()}
    save_file(tensors, str(dest / "vision_backbone.safetensors.tmp"), metadata=meta)
    os.replace(dest / "vision_backbone.safetensors.tmp", dest / "vision_backbone.safetensors")
    save_file(
        {k: v.contiguous() for k, v in head.state_dict().items()},
        str(dest / "patch_head.safetensors"),
        metadata=meta,
    )
    for name in ("train_state.pt", "pretrain_log.jsonl"):
        if (out / name).exists():
            shutil.copyfile(out / name, dest / f"{name}.tmp")
            os.replace(dest / f"{name}.tmp", dest / name)
    log.info("exported step %d to %s", step, dest)


def pretrain(cfg: PretrainConfig) -> Path:
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    preset = get_preset(cfg.preset)
    torch.manual_seed(cfg.seed)
    backbone = FusedVisionBackbone(preset).train()
    head = PatchHead(preset.vision_dim)
    params = [p for p in (*backbone.parameters(), *head.parameters())]
    opt = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    step, rendered = 0, 0
    rng = np.random.default_rng(cfg.seed)
    state_path = out / "train_state.pt"
    if state_path.exists():
        state = torch.load(state_path, weights_only=True)
        saved = {k: v for k, v in state["config"].items() if k not in OPERATIONAL}
        if saved != _learned(cfg):
            raise ValueError(
                f"{state_path} was written with a different config ({saved}); use a new --out"
            )
        backbone.load_state_dict(state["backbone"])
        head.load_state_dict(state["head"])
        opt.load_state_dict(state["optim"])
        step, rendered = int(state["step"]), int(state["rendered"])
        rng = np.random.default_rng([cfg.seed, step])  # a fresh stream after a resume
        log.info("resumed at step %d (%d scenes rendered so far)", step, rendered)
    log.info("held-out frames: %d from seeds %d+", cfg.heldout_frames, HELDOUT_SEED_START)
    heldout = heldout_buffer(cfg.heldout_frames)
    src = FrameSource(TRAIN_SEED_START, rng_seed=int(rng.integers(2**31)))
    buf = FrameBuffer(cfg.buffer_size)
    log_file = (out / "pretrain_log.jsonl").open("a")

    def write(rec: dict) -> None:
        log_file.write(json.dumps(rec) + "\n")
        log_file.flush()

    def render(n: int) -> None:
        nonlocal rendered
        for _ in range(n):
            buf.add(src.render(rendered, jitter=bool(rng.random() < cfg.jitter)))
            rendered += 1

    t_start = time.perf_counter()
    render(min(cfg.initial_frames, cfg.buffer_size))
    log.info("buffer primed with %d frames in %.1f s", len(buf), time.perf_counter() - t_start)
    last_export = time.monotonic()
    t0, seen = time.perf_counter(), 0
    try:
        while step < cfg.steps:
            render(cfg.refresh)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            batch = make_batch(
                buf, rng.integers(0, len(buf), cfg.batch_size), preset, cfg.shift, rng
            )
            loss, stats = losses(backbone, head, batch, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            step += 1
            seen += cfg.batch_size
            if step % cfg.log_every == 0:
                rate = seen / (time.perf_counter() - t0)
                t0, seen = time.perf_counter(), 0  # rate over the last interval (SIGSTOP-safe)
                write(
                    {
                        "step": step,
                        "loss": round(loss.item(), 4),
                        **{k: round(v, 4) for k, v in stats.items()},
                        "lr": lr_at(step, cfg),
                        "samples_per_s": round(rate, 1),
                        "scenes": rendered,
                        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    }
                )
                log.info(
                    "step %d/%d loss %.4f (ce %.4f reg %.4f) patch acc %.3f | %.1f "
                    "samples/s, %d scenes",
                    step,
                    cfg.steps,
                    loss.item(),
                    stats["ce"],
                    stats["reg"],
                    stats["acc"],
                    rate,
                    rendered,
                )
            if step % cfg.eval_every == 0 or step == cfg.steps:
                rec = {"step": step, "heldout": evaluate(backbone, head, heldout, preset)}
                write(rec)
                log.info("step %d held-out: %s", step, rec["heldout"])
            if step % cfg.save_every == 0 or step == cfg.steps:
                tmp = state_path.with_suffix(".tmp")
                torch.save(
                    {
                        "backbone": backbone.state_dict(),
                        "head": head.state_dict(),
                        "optim": opt.state_dict(),
                        "step": step,
                        "rendered": rendered,
                        "config": asdict(cfg),
                    },
                    tmp,
                )
                os.replace(tmp, state_path)  # atomic
                due = time.monotonic() - last_export >= 60 * cfg.export_every_min
                if cfg.export_dir and (due or step == cfg.steps):
                    export(out, Path(cfg.export_dir), backbone, head, step, cfg.preset)
                    last_export = time.monotonic()
    finally:
        src.close()
        log_file.close()
    export(out, out / "export", backbone, head, step, cfg.preset)
    return out / "export" / "vision_backbone.safetensors"


def export_from_state(out: str | Path, dest: str | Path) -> None:
    """Export a (possibly running) run's last train_state.pt, e.g. before stopping it."""
    out = Path(out)
    state = torch.load(out / "train_state.pt", weights_only=True)
    preset = get_preset(state["config"]["preset"])
    backbone, head = FusedVisionBackbone(preset), PatchHead(preset.vision_dim)
    backbone.load_state_dict(state["backbone"])
    head.load_state_dict(state["head"])
    export(out, Path(dest), backbone, head, int(state["step"]), state["config"]["preset"])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", required=True)
    for f in PretrainConfig.__dataclass_fields__.values():
        if f.name == "out":
            continue
        kind = {"int": int, "float": float, "str": str}[f.type]
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=f.default)
    ap.add_argument(
        "--export-only",
        metavar="DIR",
        default="",
        help="export OUT's last train_state.pt to DIR and exit (no training)",
    )
    args = vars(ap.parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    export_only = args.pop("export_only")
    if export_only:
        export_from_state(args["out"], export_only)
        return
    pretrain(PretrainConfig(**args))


if __name__ == "__main__":
    main()

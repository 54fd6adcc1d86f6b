"""Train a small OpenVLA-architecture policy on expert demonstrations, on a CPU.

Exactly OpenVLA's recipe at small scale: actions are normalized with the dataset's q01/q99
(gripper passes through), discretized into the last 256 tokens of the vocabulary, and learned by
next-token cross-entropy on the 7 action tokens that follow [BOS, 256 visual tokens, prompt].
Resumable (train_state.pt every --save-every steps), logs loss/accuracy/throughput, and writes a
checkpoint in the OpenVLA Hugging Face layout that `vla_prune.load_policy` reads.

    python -m sim.demos --out data/demos --episodes-per-task 250 --noise 0.005
    python -m sim.train --data data/demos --out runs/embedded-openvla --steps 3000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

import vla_prune
from sim.dataset import AUX_DIM, AUX_SCALE, DemoBatches
from sim.grounding import (
    MASK_ROLES,
    GroundingHead,
    GroundingScenes,
    evaluate_grounding,
    grounding_logits,
    grounding_loss,
)
from sim.pretrain_vision import load_vision_backbone
from sim.query_attention import (
    attention_mass_loss,
    capture_layer_input,
    query_attention,
    readout_loss,
)
from sim.token_position import TokenPositionHead, token_offset_loss, token_position_loss

log = logging.getLogger(__name__)

UNNORM_KEY = "embedded"


@dataclass
class TrainConfig:
    data: str
    out: str
    preset: str = "tiny-openvla"
    steps: int = 3000
    batch_size: int = 32
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup: int = 150
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    label_sigma: float = 0.0  # >0: Gaussian soft targets over neighbouring bins (HL-Gauss)
    shift: int = 4  # random-shift augmentation in pixels of the stored image (0 = off)
    blind: bool = False  # honesty control: the image is replaced by a constant gray frame
    aux_weight: float = 0.0  # >0: also regress scene geometry (see aux_targets)
    frame_stride: int = 1  # keep every k-th frame per episode (more scenes per GB of RAM)
    val_data: str = ""  # held-out scenes: validation loss/accuracy at every save
    val_size: int = 256  # validation transitions (evenly spaced over val_data)
    init_from: str = ""  # start from a trained checkpoint's weights (e.g. CogACT from OpenVLA)
    init_vision: str = ""  # pretrained ViT pair (sim.pretrain_vision), loaded after init_from
    # the training heads of an earlier run (its exported heads.safetensors or its
    # train_state.pt), so a continued stage keeps them instead of starting them from scratch
    init_heads: str = ""
    ground_weight: float = 0.0  # >0: grounding objective on fresh rendered scenes (sim.grounding)
    ground_batch: int = 16  # fresh scenes per step for the grounding loss
    ground_heldout: int = 200  # held-out grounding scenes, measured at every save
    pos_weight: float = 0.0  # >0: each projected visual token regresses its grid position
    attn_weight: float = 0.0  # >0: query heads attend to target/goal/gripper (sim.query_attention)
    attn_layer: int = 1  # the decoder layer whose heads sim.query_attention supervises
    offset_weight: float = 0.0  # >0: projected tokens keep their thing's sub-patch offset
    readout_weight: float = 0.0  # >0: the query after attn_layer gives target/goal/gripper xy
    export_dir: str = ""  # also write the policy + log + training heads here (commit-able)
    export_every_min: float = 20.0  # ... at the first save after this many minutes
    bf16: bool = True  # autocast on CPU (fp32 master weights); --no-bf16 to turn off
    seed: int = 0
    threads: int = 2
    log_every: int = 25
    save_every: int = 250


def action_loss(
    policy: vla_prune.Policy,
    pixels,
    prompts,
    action_tokens,
    label_sigma: float = 0.0,
    aux_head: torch.nn.Module | None = None,
    aux: torch.Tensor | None = None,
    patches: torch.Tensor | None = None,
):
    """Cross-entropy of the 7 action tokens given image + prompt (teacher forcing).

    label_sigma > 0: ordinal soft targets (HL-Gauss): a Gaussian of that many bins around the
    target bin instead of a one-hot, so a near miss costs less than a far one. The tokens and
    their decoding are OpenVLA's either way; this only shapes the training signal, which on a
    small dataset otherwise collapses to the marginal action for a long time.
    """
    logits, h = action_logits(policy, pixels, prompts, action_tokens, patches)
    at = policy.action_tokenizer
    loss = soft_label_loss(logits, action_tokens, at.first_action_id, at.n_bins, label_sigma)
    acc = (logits.argmax(-1) == action_tokens).float().mean()
    return loss, acc, _aux_loss(aux_head, h[:, 0], aux)  # the row predicting the first action


def action_logits(policy: vla_prune.Policy, pixels, prompts, action_tokens, patches=None):
    """Teacher-forced logits [B, 7, vocab] of the 7 action tokens, and their hidden states."""
    n_act = action_tokens.shape[1]
    hidden, lengths = last_hidden(policy, pixels, prompts, action_tokens[:, :-1], patches)
    # the rows whose next token is an action token: the last prompt row, then a1..a6
    rows = torch.stack([torch.arange(n - n_act, n) for n in lengths])
    h = hidden.gather(1, rows[..., None].expand(-1, -1, hidden.shape[-1]))
    return policy.model.language_model.lm_head(h).float(), h


def _aux_loss(aux_head: torch.nn.Module | None, query: torch.Tensor, aux) -> torch.Tensor:
    """Scene-geometry regression from the action query's hidden state (0 when off)."""
    if aux_head is None or aux is None:
        return torch.zeros(())
    return F.smooth_l1_loss(aux_head(query).float(), aux, beta=0.1)


def visual_tokens(policy: vla_prune.Policy, pixels: torch.Tensor) -> torch.Tensor:
    """The projected visual tokens [B, P, D] the LLM reads."""
    return policy.model.projector(policy.model.vision_backbone(pixels))


def last_hidden(policy: vla_prune.Policy, pixels, prompts, extra_tokens=None, patches=None):
    """Final-norm hidden states of [BOS, visual, prompt (+ extra tokens)], right-padded;
    returns (hidden [B, L, D], lengths). `patches`: this batch's `visual_tokens`, if another
    loss already computed them (one vision pass per step)."""
    lm = policy.model.language_model
    embed = lm.get_input_embeddings()
    if patches is None:
        patches = visual_tokens(policy, pixels)
    rows, lengths = [], []
    for b, ids in enumerate(prompts):
        seq = (
            torch.tensor(ids)
            if extra_tokens is None
            else torch.cat([torch.tensor(ids), extra_tokens[b]])
        )
        e = embed(seq)
        rows.append(torch.cat([e[:1], patches[b], e[1:]]))
        lengths.append(rows[-1].shape[0])
    longest = max(lengths)
    embeds = torch.stack([F.pad(r, (0, 0, 0, longest - r.shape[0])) for r in rows])
    mask = torch.tensor([[1] * n + [0] * (longest - n) for n in lengths])
    return lm.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state, lengths


def diffusion_loss(
    policy,
    pixels,
    prompts,
    chunks,
    gen: torch.Generator,
    repeats: int = 4,
    aux_head: torch.nn.Module | None = None,
    aux: torch.Tensor | None = None,
    patches: torch.Tensor | None = None,
):
    """CogACT's objective: predict the noise added to the normalized action chunk at a random
    diffusion step, conditioned on the cognition token's final hidden state; the condition is
    dropped (replaced by the learned unconditional embedding) at the DiT's class-dropout rate,
    which is what classifier-free guidance needs. `repeats` noise draws per LLM forward."""
    from vla_prune.models.cogact import squaredcos_alphas_cumprod

    hidden, lengths = last_hidden(policy, pixels, prompts, patches=patches)
    b = hidden.shape[0]
    z = hidden[torch.arange(b), torch.tensor(lengths) - 1][:, None]  # [B, 1, D]
    aux_loss = _aux_loss(aux_head, z[:, 0], aux)  # the cognition token
    net = policy.model.action_model.net
    drop = torch.rand(b, generator=gen) < net.cfg.class_dropout_prob
    if drop.any():
        z = torch.where(drop[:, None, None], net.z_embedder.uncondition[None].to(z), z)
    z, x0 = z.repeat(repeats, 1, 1), chunks.repeat(repeats, 1, 1)
    steps = policy.sampling.train_steps
    t = torch.randint(0, steps, (len(x0),), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    ab = squaredcos_alphas_cumprod(steps)[t].float()[:, None, None]
    eps = net(ab.sqrt() * x0 + (1 - ab).sqrt() * noise, t, z)
    loss = F.mse_loss(eps.float(), noise)
    return loss, torch.zeros(()), aux_loss


def soft_label_loss(
    logits: torch.Tensor, targets: torch.Tensor, first_id: int, n_bins: int, sigma: float
) -> torch.Tensor:
    """Cross-entropy against one-hot targets (sigma = 0, OpenVLA) or against a Gaussian of
    width sigma bins over the action tokens around each target (HL-Gauss)."""
    if sigma <= 0:
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    ids = torch.arange(first_id, first_id + n_bins, device=logits.device)
    soft = torch.softmax(-((ids - targets[..., None]) ** 2).float() / (2 * sigma**2), dim=-1)
    logp = torch.log_softmax(logits, dim=-1)[..., first_id : first_id + n_bins]
    return -(soft * logp).sum(-1).mean()


def init_weights(model: torch.nn.Module, checkpoint: str) -> None:
    """Copy every weight of a trained checkpoint into `model`, which may have more modules.

    This is how CogACT itself was made: its VLM starts from OpenVLA's weights and the DiT
    action head from scratch. Every checkpoint weight must exist in `model` with its shape."""
    source = vla_prune.load_policy(checkpoint).model.state_dict()
    target = model.state_dict()
    bad = [
        f"{k} {tuple(v.shape)} -> {tuple(target[k].shape) if k in target else 'missing'}"
        for k, v in source.items()
        if k not in target or target[k].shape != v.shape
    ]
    if bad:
        raise ValueError(f"{checkpoint} does not fit the model: {bad[:5]}")
    model.load_state_dict(source, strict=False)
    fresh = sorted({k.rsplit(".", 1)[0] for k in target if k not in source})
    log.info("initialized %d tensors from %s; from scratch: %s", len(source), checkpoint, fresh[:8])


def init_training_heads(heads: dict, path: str) -> None:
    """Load the training heads this run has from an earlier run's heads.safetensors (its
    export) or train_state.pt. A head the file lacks starts fresh (logged); a head whose
    shapes differ is an error, not a silent restart."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        flat = load_file(path)
        saved: dict[str, dict] = {}
        for key, v in flat.items():
            name, _, rest = key.partition(".")
            saved.setdefault(name, {})[rest] = v
    else:
        state = torch.load(path, weights_only=True)
        saved = {k: v for k, v in state.items() if k.endswith("_head") and v}
    fresh = []
    for name, head in heads.items():
        if head is None:
            continue
        if name not in saved:
            fresh.append(name)
            continue
        try:
            head.load_state_dict(saved[name])
        except RuntimeError as e:
            raise ValueError(f"{path}: {name} does not fit this run's head: {e}") from None
    log.info("training heads from %s; from scratch: %s", path, fresh or "none")


@torch.no_grad()
def validate(policy, val: DemoBatches, cfg: TrainConfig, aux_head=None) -> dict[str, float]:
    """Loss, action-token accuracy and aux loss on held-out scenes (no augmentation).

    The number that tells memorizing from learning: a small model fits the training scenes'
    layouts long before it learns to find the named object in a new one."""
    model_was_training = policy.model.training
    policy.model.eval()
    rows = torch.linspace(0, len(val) - 1, min(cfg.val_size, len(val))).long()
    gen = torch.Generator().manual_seed(0)  # the diffusion loss's noise, fixed across saves
    totals = {"val_loss": 0.0, "val_acc": 0.0, "val_aux": 0.0}
    for chunk in rows.split(cfg.batch_size):
        pixels, prompts, targets, aux = val.batch(chunk)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            if val.chunks is None:
                out = action_loss(policy, pixels, prompts, targets, 0.0, aux_head, aux)
            else:
                out = diffusion_loss(
                    policy, pixels, prompts, targets, gen, aux_head=aux_head, aux=aux
                )
        for key, value in zip(totals, out):
            totals[key] += value.item() * len(chunk) / len(rows)
    policy.model.train(model_was_training)
    return {k: round(v, 4) for k, v in totals.items()}


class GroundStep(NamedTuple):
    """The losses on one step's grounding scenes; None where that objective is off."""

    loss: torch.Tensor
    acc: torch.Tensor
    attn_loss: torch.Tensor | None  # sim.query_attention
    attn_mass: torch.Tensor | None  # [3]: mass on each of MASK_ROLES
    offset_loss: torch.Tensor | None  # sim.token_position.token_offset_loss
    readout_loss: torch.Tensor | None  # sim.query_attention.readout_loss


def _ground_step(
    policy, head, scenes, step: int, cfg: TrainConfig, offset_head=None, readout_head=None
):
    """On this step's fresh scenes (sim.grounding): the grounding loss and the objectives that
    need the render's labels. Fresh scenes: each step's numbers are measured before training
    on them, so they are held-out numbers."""
    pixels, prompts, masks, _, offsets, has_thing, xy = scenes.for_step(
        step, cfg.ground_batch, cfg.seed
    )
    lm = policy.model.language_model.model
    layer = lm.layers[cfg.attn_layer] if cfg.attn_weight > 0 else None
    with (
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16),
        contextlib.ExitStack() as stack,
    ):
        seen = stack.enter_context(capture_layer_input(layer)) if layer is not None else None
        after = None  # the query right after the supervised layer: what it has read
        if readout_head is not None:
            after = stack.enter_context(capture_layer_input(lm.layers[cfg.attn_layer + 1]))
        patches = visual_tokens(policy, pixels)
        hidden, lengths = last_hidden(policy, pixels, prompts, patches=patches)
        logits = grounding_logits(head, hidden, lengths, masks.shape[-1])
        if layer is not None:
            attn = query_attention(layer, seen, lengths, lm.config.num_attention_heads)
        o_loss = None
        if offset_head is not None:
            o_loss = token_offset_loss(offset_head, patches, offsets, has_thing)
        r_loss = None
        if readout_head is not None:
            query = after["hidden"][torch.arange(len(lengths)), torch.tensor(lengths) - 1]
            r_loss = readout_loss(readout_head, query, xy * AUX_SCALE)
    g_loss, g_acc = grounding_loss(logits, masks)
    a_loss, a_mass = attention_mass_loss(attn, masks) if layer is not None else (None, None)
    return GroundStep(g_loss, g_acc, a_loss, a_mass, o_loss, r_loss)


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def check_config(cfg: TrainConfig, num_layers: int, num_heads: int) -> None:
    """Reject settings that would silently do nothing or fail mid-run."""
    for name in ("offset_weight", "readout_weight"):
        if getattr(cfg, name) > 0 and cfg.ground_weight <= 0:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} uses the grounding scenes: set --ground-weight > 0")
    if cfg.readout_weight > 0 and not 0 <= cfg.attn_layer < num_layers - 1:
        raise ValueError(
            f"--readout-weight reads the query after --attn-layer {cfg.attn_layer}: "
            f"it must be below the last of {num_layers} layers"
        )
    if cfg.attn_weight > 0:
        if cfg.ground_weight <= 0:
            raise ValueError("--attn-weight uses the grounding scenes: set --ground-weight > 0")
        if not 0 <= cfg.attn_layer < num_layers:
            raise ValueError(f"--attn-layer {cfg.attn_layer}: the LLM has {num_layers} layers")
        if num_heads < len(MASK_ROLES):
            raise ValueError(f"--attn-weight needs >= {len(MASK_ROLES)} heads, got {num_heads}")


def train(cfg: TrainConfig) -> Path:
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    policy = vla_prune.build_policy(cfg.preset, seed=cfg.seed)
    llm = policy.model.language_model.config
    check_config(cfg, llm.num_hidden_layers, llm.num_attention_heads)
    if cfg.init_from:
        init_weights(policy.model, cfg.init_from)
    if cfg.init_vision:
        load_vision_backbone(policy.model.vision_backbone, cfg.init_vision)
        log.info("vision backbone from %s", cfg.init_vision)
    data = DemoBatches(cfg.data, policy, cfg)
    val = DemoBatches(cfg.val_data, policy, cfg, stats=data.stats) if cfg.val_data else None
    model = policy.model.train()
    ground_head = pos_head = aux_head = offset_head = readout_head = None
    with torch.random.fork_rng():  # seeded heads (a run is a function of its config), and
        torch.manual_seed(cfg.seed + 1)  # the global RNG left as it was
        if cfg.ground_weight > 0:
            ground_head = GroundingHead(policy.config.llm_dim)
        if cfg.pos_weight > 0:
            pos_head = TokenPositionHead(policy.config.llm_dim)
        if cfg.offset_weight > 0:
            offset_head = TokenPositionHead(policy.config.llm_dim)
        if cfg.readout_weight > 0:
            readout_head = torch.nn.Linear(policy.config.llm_dim, 2 * len(MASK_ROLES))
        if cfg.aux_weight > 0:
            aux_head = torch.nn.Linear(policy.config.llm_dim, AUX_DIM)
    heads = {
        "aux_head": aux_head,
        "ground_head": ground_head,
        "pos_head": pos_head,
        "offset_head": offset_head,
        "readout_head": readout_head,
    }
    if cfg.init_heads:
        init_training_heads(heads, cfg.init_heads)
    scenes = GroundingScenes(policy) if ground_head is not None else None
    params = list(model.parameters()) + (list(aux_head.parameters()) if aux_head else [])
    params += list(ground_head.parameters()) if ground_head else []
    params += list(pos_head.parameters()) if pos_head else []
    params += list(offset_head.parameters()) if offset_head else []
    params += list(readout_head.parameters()) if readout_head else []
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    state_path = out / "train_state.pt"
    step = 0
    if state_path.exists():  # resume
        state = torch.load(state_path, weights_only=True)
        # fields added later take their defaults, so older states still resume
        if asdict(TrainConfig(**state["config"])) != asdict(cfg):
            raise ValueError(f"{state_path} was written with a different config; use a new --out")
        model.load_state_dict(state["model"])
        for name, head in heads.items():
            if head is not None:
                head.load_state_dict(state[name])
        opt.load_state_dict(state["optim"])
        gen.set_state(state["generator"])
        step = state["step"]
        log.info("resumed at step %d", step)
    log_file = (out / "train_log.jsonl").open("a")
    t0, seen = time.perf_counter(), 0
    last_export = time.monotonic()
    while step < cfg.steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        pixels, prompts, actions, aux = data.sample(gen)
        # bf16 matmuls are ~2.6x faster on AVX512-BF16 CPUs; weights and optimizer stay fp32.
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            # one vision pass, shared by the action loss and the position loss
            patches = visual_tokens(policy, pixels)
            if data.chunks is None:
                loss, acc, aux_loss = action_loss(
                    policy, pixels, prompts, actions, cfg.label_sigma, aux_head, aux, patches
                )
            else:
                loss, acc, aux_loss = diffusion_loss(
                    policy,
                    pixels,
                    prompts,
                    actions,
                    gen,
                    aux_head=aux_head,
                    aux=aux,
                    patches=patches,
                )
        total = loss + cfg.aux_weight * aux_loss
        if pos_head is not None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
                pos_loss = token_position_loss(pos_head, patches)
            total = total + cfg.pos_weight * pos_loss
        if ground_head is not None:
            g = _ground_step(policy, ground_head, scenes, step, cfg, offset_head, readout_head)
            total = total + cfg.ground_weight * g.loss
            if g.attn_loss is not None:
                total = total + cfg.attn_weight * g.attn_loss
            if g.offset_loss is not None:
                total = total + cfg.offset_weight * g.offset_loss
            if g.readout_loss is not None:
                total = total + cfg.readout_weight * g.readout_loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        step += 1
        seen += len(prompts)
        if step % cfg.log_every == 0 or step == cfg.steps:
            rate = seen / (time.perf_counter() - t0)
            eta = (cfg.steps - step) * cfg.batch_size / rate / 60
            rec = {
                "step": step,
                "loss": round(loss.item(), 4),
                "acc": round(acc.item(), 4),
                "aux_loss": round(aux_loss.item(), 4),
                "lr": lr_at(step, cfg),
                "samples_per_s": round(rate, 1),
            }
            if pos_head is not None:
                rec["pos_loss"] = round(pos_loss.item(), 4)
            if ground_head is not None:
                rec |= {
                    "ground_loss": round(g.loss.item(), 4),
                    "ground_acc": round(g.acc.item(), 4),
                }
                if g.attn_loss is not None:
                    rec["attn_loss"] = round(g.attn_loss.item(), 4)
                    masses = g.attn_mass.tolist()
                    rec |= {f"attn_mass_{r}": round(m, 4) for r, m in zip(MASK_ROLES, masses)}
                if g.offset_loss is not None:
                    rec["offset_loss"] = round(g.offset_loss.item(), 4)
                if g.readout_loss is not None:
                    rec["readout_loss"] = round(g.readout_loss.item(), 4)
            log_file.write(json.dumps(rec) + "\n")
            log_file.flush()
            log.info(
                "step %d/%d loss %.4f acc %.3f aux %.4f lr %.2e | %.1f samples/s, ETA %.1f min",
                step,
                cfg.steps,
                rec["loss"],
                rec["acc"],
                rec["aux_loss"],
                rec["lr"],
                rate,
                eta,
            )
        if step % cfg.save_every == 0 or step == cfg.steps:
            tmp = state_path.with_suffix(".tmp")
            torch.save(
                {
                    "model": model.state_dict(),
                    **{k: h.state_dict() for k, h in heads.items() if h is not None},
                    "optim": opt.state_dict(),
                    "generator": gen.get_state(),
                    "step": step,
                    "config": asdict(cfg),
                },
                tmp,
            )
            os.replace(tmp, state_path)  # atomic: a crash never leaves a half-written state
            if val is not None:
                rec = {"step": step, **validate(policy, val, cfg, aux_head)}
                log_file.write(json.dumps(rec) + "\n")
                log_file.flush()
                log.info("step %d held-out: %s", step, rec)
            if ground_head is not None and cfg.ground_heldout > 0:
                g = evaluate_grounding(
                    policy, ground_head, scenes, cfg.ground_heldout, last_hidden, cfg.bf16
                )
                log_file.write(json.dumps({"step": step, "ground_heldout": g}) + "\n")
                log_file.flush()
                log.info("step %d held-out grounding: %s", step, g)
            due = time.monotonic() - last_export >= 60 * cfg.export_every_min
            if cfg.export_dir and (due or step == cfg.steps):
                log_file.flush()
                _export_run(policy, data.stats, out, Path(cfg.export_dir), heads)
                policy.model.train()
                last_export = time.monotonic()
    if scenes is not None:
        scenes.close()
    model.eval()
    policy.norm_stats = {UNNORM_KEY: data.stats}
    policy.unnorm_key = UNNORM_KEY
    final = policy.save(out / "policy")
    (final / "training.json").write_text(json.dumps({"config": asdict(cfg)}, indent=2))
    log.info("wrote %s", final)
    return final


def _export_run(policy, stats: dict, out: Path, dest: Path, heads: dict) -> None:
    """An intermediate checkpoint small enough to commit: the policy in load_policy's layout
    (no optimizer state; continue with --init-from DEST/policy --init-heads
    DEST/heads.safetensors), the training-only heads (safetensors) and a copy of the log."""
    from safetensors.torch import save_file

    dest.mkdir(parents=True, exist_ok=True)
    policy.norm_stats, policy.unnorm_key = {UNNORM_KEY: stats}, UNNORM_KEY
    policy.save(dest / "policy")
    tensors = {
        f"{name}.{k}": v.detach().contiguous()
        for name, head in heads.items()
        if head is not None
        for k, v in head.state_dict().items()
    }
    if tensors:
        save_file(tensors, str(dest / "heads.safetensors"))
    shutil.copyfile(out / "train_log.jsonl", dest / "train_log.jsonl")
    log.info("exported the policy to %s", dest)


def export(out: str | Path, data: str | None = None) -> Path:
    """Write the policy of a (possibly unfinished) run's train_state.pt to OUT/policy-step<N>,
    e.g. to evaluate an intermediate checkpoint while training goes on."""
    out = Path(out)
    state = torch.load(out / "train_state.pt", weights_only=True)
    cfg = TrainConfig(**state["config"])
    policy = vla_prune.build_policy(cfg.preset, seed=cfg.seed)
    policy.model.load_state_dict(state["model"])
    stats = DemoBatches(data or cfg.data, policy, cfg).stats
    policy.norm_stats, policy.unnorm_key = {UNNORM_KEY: stats}, UNNORM_KEY
    return policy.save(out / f"policy-step{state['step']}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    for f in TrainConfig.__dataclass_fields__.values():
        if f.name in ("data", "out"):
            continue
        if f.type == "bool":
            ap.add_argument(
                f"--{f.name.replace('_', '-')}",
                action=argparse.BooleanOptionalAction,
                default=f.default,
            )
        else:
            kind = {"int": int, "float": float, "str": str}[f.type]
            ap.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=f.default)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    train(TrainConfig(**vars(args)))


if __name__ == "__main__":
    main()

"""Roofline bounds per stage: max(FLOPs / peak FLOP/s, bytes / memory bandwidth).

Bytes moved count what a stage must read or write at least once: its weights, and for the LLM
the KV cache (written in prefill; read, and one row written, at every decode step).
Activations are ignored (small next to 7 B of weights). GPU peaks come from the vendors'
datasheets (dense bf16 tensor-core FLOP/s, DRAM bandwidth: the table in vla_prune.targets); a
CPU's are measured once. `project_step` bounds one step on a datasheet target for bf16, int8 or
int4 weights (`vla-prune info --target`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .engine.flops import StepFlops
from .models.arch import VLAConfig
from .targets import TARGETS, Target


@dataclass(frozen=True)
class DevicePeak:
    name: str
    flops: float  # FLOP/s for the dtype in use
    bandwidth: float  # bytes/s
    source: str  # "datasheet" | "measured"


# name fragment -> (dense bf16 tensor FLOP/s, memory bytes/s); first match wins (the table's
# order puts "H100 PCIe" before "H100" and "A6000" before "A40").
GPU_PEAKS = [(t.match, t.bf16_flops, t.bandwidth) for t in TARGETS.values() if t.match]

# Bytes per weight of each weight format. int8 / int4 are weight-only quantization: weights are
# dequantized in the kernel and the math is still bf16, so a target's bf16 FLOP peak applies to
# every format and only the bytes change. Activations and the KV cache stay bf16.
WEIGHT_BYTES = {"bf16": 2.0, "int8": 1.0, "int4": 0.5}
ACTIVATION_BYTES = 2


def device_peak(device: torch.device | str, dtype: torch.dtype = torch.float32) -> DevicePeak:
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, flops, bw in GPU_PEAKS:
            if fragment in name:
                return DevicePeak(name, flops, bw, "datasheet")
        return measure_peak(device, dtype, name)
    return measure_peak(device, dtype, f"cpu x{torch.get_num_threads()} threads")


def measure_peak(device: torch.device, dtype: torch.dtype, name: str) -> DevicePeak:
    """Best of a few large matmuls and copies: what this device actually sustains."""
    n = 1024 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    src = torch.empty(64 * 1024 * 1024 // 4, device=device)  # 64 MB, larger than caches
    dst = torch.empty_like(src)
    best_mm = best_cp = float("inf")
    for _ in range(5):
        best_mm = min(best_mm, _timed(lambda: a @ a, device))
        best_cp = min(best_cp, _timed(lambda: dst.copy_(src), device))
    nbytes = 2 * src.numel() * src.element_size()  # read + write
    return DevicePeak(name, 2 * n**3 / best_mm, nbytes / best_cp, "measured")


def _timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def stage_bytes(
    model,
    cfg: VLAConfig,
    prompt_tokens: int,
    kept_visual: int | None,
    prune_layer: int | None,
    dtype_bytes: float,
    skip_layers: frozenset[int] = frozenset(),
    kv_bytes: float | None = None,
    decode_steps: int | None = None,
    lm_head: bool = True,
) -> dict[str, float]:
    """Minimum bytes each stage moves: weights read (+ KV cache traffic for the LLM).

    dtype_bytes is per weight; kv_bytes per KV-cache element (default: dtype_bytes).
    decode_steps defaults to OpenVLA's action_dim - 1; CogACT passes 0 and lm_head=False (its
    prefill returns a hidden state, no LM head runs).
    """
    kv_bytes = dtype_bytes if kv_bytes is None else kv_bytes
    vb = model.vision_backbone
    vision = 0
    for vit in (vb.featurizer, vb.fused_featurizer):  # the last block never runs
        vision += _params(vit) - _params(vit.blocks[-1]) - _params(vit.norm)
        vision -= _params(vit.attn_pool) if hasattr(vit, "attn_pool") else 0
    lm = model.language_model
    layers = [i for i in range(cfg.num_layers) if i not in skip_layers]
    layer_w = sum(_params(lm.model.layers[i]) for i in layers)
    head_w = _params(lm.lm_head) if lm_head else 0
    llm = cfg.llm
    kv_row = 2 * llm["num_key_value_heads"] * (llm["hidden_size"] // llm["num_attention_heads"])
    t = prompt_tokens + cfg.num_patches
    k = cfg.num_layers if kept_visual is None or prune_layer is None else prune_layer
    t_kept = t if kept_visual is None else t - cfg.num_patches + kept_visual
    rows = [t if i < k else t_kept for i in layers]
    steps = cfg.action_dim - 1 if decode_steps is None else decode_steps
    decode_kv = sum(sum(r + s + 1 for s in range(steps)) for r in rows) * kv_row
    return {
        "vision": vision * dtype_bytes,
        "projector": _params(model.projector) * dtype_bytes,
        "prefill": (layer_w + head_w) * dtype_bytes + sum(rows) * kv_row * kv_bytes,
        "decode": steps * (layer_w + head_w) * dtype_bytes + decode_kv * kv_bytes,
    }


def action_head_bytes(
    net: torch.nn.Module, steps: int, cache=None, dtype_bytes: float = 2
) -> float:
    """Weights a DiT head (models.dit.DiT) reads in one sampling run: embedders and final layer
    at every step, the blocks only at the full steps when DiT caching is on (guidance doubles
    the batch of one forward, not the weights it reads)."""
    full = steps if cache is None or not cache.enabled else len(range(0, steps, cache.interval))
    embed = sum(_params(m) for m in (net.x_embedder, net.t_embedder, net.z_embedder))
    embed += net.positional_embedding.numel()
    per_step = embed + _params(net.final_layer)
    return (steps * per_step + full * _params(net.blocks)) * dtype_bytes


@dataclass(frozen=True)
class StageRoof:
    """One stage's two roofs: compute (FLOPs / peak) and memory (bytes / bandwidth), in ms."""

    flops: float
    nbytes: float
    compute_ms: float
    memory_ms: float

    @property
    def ms(self) -> float:
        return max(self.compute_ms, self.memory_ms)

    @property
    def bound(self) -> str:
        return "compute" if self.compute_ms >= self.memory_ms else "memory"


def stage_roofs(
    flops: StepFlops, nbytes: dict[str, float], peak: DevicePeak
) -> dict[str, StageRoof]:
    """Both roofs per stage; the LM head is charged to prefill (1 row) and decode."""
    f = {s: v for s, v in flops.stages.items() if s != "lm_head"}
    head_per_call = flops.lm_head / (1 + flops.decode_steps)
    f["prefill"] += head_per_call
    f.setdefault("decode", 0)
    f["decode"] += head_per_call * flops.decode_steps
    return {
        s: StageRoof(f[s], nbytes[s], 1e3 * f[s] / peak.flops, 1e3 * nbytes[s] / peak.bandwidth)
        for s in nbytes
    }


def bounds_ms(flops: StepFlops, nbytes: dict[str, float], peak: DevicePeak) -> dict[str, float]:
    """Roofline time per stage in ms; the LM head is charged to prefill (1 row) and decode."""
    out = {s: r.ms for s, r in stage_roofs(flops, nbytes, peak).items()}
    out["total"] = sum(out.values())
    return out


def target_peak(target: Target) -> DevicePeak:
    """A datasheet target's peaks. Its bf16 FLOP peak serves every weight format (see
    WEIGHT_BYTES: int8 / int4 here are weight-only, the math stays bf16)."""
    return DevicePeak(target.name, target.bf16_flops, target.bandwidth, target.source)


def project_step(
    policy,
    flops: StepFlops,
    target: Target,
    weights: str,
    prompt_tokens: int,
    kept_visual: int | None = None,
    prune_layer: int | None = None,
) -> dict[str, StageRoof]:
    """Roofline bound of one control step of `policy` (meta weights suffice) on `target` with
    `weights` in bf16 / int8 / int4. `flops` is that step's StepFlops (for CogACT with the DiT
    head as action_head and no decode). Stages: vision, projector, prefill, and decode (OpenVLA)
    or action_head (a diffusion head)."""
    if weights not in WEIGHT_BYTES:
        raise ValueError(f"unknown weight format {weights!r}; known: {', '.join(WEIGHT_BYTES)}")
    wb = WEIGHT_BYTES[weights]
    nbytes = stage_bytes(
        policy.model,
        policy.config,
        prompt_tokens,
        kept_visual,
        prune_layer,
        wb,
        kv_bytes=ACTIVATION_BYTES,
        decode_steps=flops.decode_steps,
        lm_head=flops.lm_head > 0,
    )
    if flops.action_head:
        nbytes["action_head"] = policy.head.weight_bytes(wb)
    if not flops.decode_steps:
        del nbytes["decode"]
    return stage_roofs(flops, nbytes, target_peak(target))

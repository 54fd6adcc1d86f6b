"""Roofline bounds per stage: max(FLOPs / peak FLOP/s, bytes / memory bandwidth).

Bytes moved count what a stage must read or write at least once: its weights, and for the LLM
the KV cache (written in prefill; read, and one row written, at every decode step).
Activations are ignored (small next to 7 B of weights). GPU peaks come from the vendors'
datasheets (dense bf16 tensor-core FLOP/s, HBM bandwidth); a CPU's are measured once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .engine.flops import StepFlops
from .models.arch import VLAConfig


@dataclass(frozen=True)
class DevicePeak:
    name: str
    flops: float  # FLOP/s for the dtype in use
    bandwidth: float  # bytes/s
    source: str  # "datasheet" | "measured"


# name fragment -> (dense bf16 tensor FLOP/s, memory bytes/s); first match wins.
GPU_PEAKS = [
    ("H200", 989e12, 4.8e12),
    ("H100 PCIe", 756e12, 2.0e12),
    ("H100", 989e12, 3.35e12),
    ("A100", 312e12, 2.04e12),
    ("L40S", 362e12, 0.864e12),
    ("4090", 165e12, 1.008e12),
    ("A6000", 155e12, 0.768e12),
    ("A40", 150e12, 0.696e12),
]


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
    dtype_bytes: int,
    skip_layers: frozenset[int] = frozenset(),
) -> dict[str, int]:
    """Minimum bytes each stage moves: weights read (+ KV cache traffic for the LLM)."""
    vb = model.vision_backbone
    vision = 0
    for vit in (vb.featurizer, vb.fused_featurizer):  # the last block never runs
        vision += _params(vit) - _params(vit.blocks[-1]) - _params(vit.norm)
        vision -= _params(vit.attn_pool) if hasattr(vit, "attn_pool") else 0
    lm = model.language_model
    layers = [i for i in range(cfg.num_layers) if i not in skip_layers]
    layer_w = sum(_params(lm.model.layers[i]) for i in layers)
    head_w = _params(lm.lm_head)
    llm = cfg.llm
    kv_row = 2 * llm["num_key_value_heads"] * (llm["hidden_size"] // llm["num_attention_heads"])
    t = prompt_tokens + cfg.num_patches
    k = cfg.num_layers if kept_visual is None or prune_layer is None else prune_layer
    t_kept = t if kept_visual is None else t - cfg.num_patches + kept_visual
    rows = [t if i < k else t_kept for i in layers]
    steps = cfg.action_dim - 1
    decode_kv = sum(sum(r + s + 1 for s in range(steps)) for r in rows) * kv_row
    return {
        "vision": vision * dtype_bytes,
        "projector": _params(model.projector) * dtype_bytes,
        "prefill": (layer_w + head_w + sum(rows) * kv_row) * dtype_bytes,
        "decode": (steps * (layer_w + head_w) + decode_kv) * dtype_bytes,
    }


def bounds_ms(flops: StepFlops, nbytes: dict[str, int], peak: DevicePeak) -> dict[str, float]:
    """Roofline time per stage in ms; the LM head is charged to prefill (1 row) and decode."""
    f = {s: v for s, v in flops.stages.items() if s != "lm_head"}
    head_per_call = flops.lm_head / (1 + flops.decode_steps)
    f["prefill"] += head_per_call
    f["decode"] += head_per_call * flops.decode_steps
    out = {s: 1e3 * max(f[s] / peak.flops, nbytes[s] / peak.bandwidth) for s in nbytes}
    out["total"] = sum(out.values())
    return out

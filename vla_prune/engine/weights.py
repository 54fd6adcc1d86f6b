"""Fewer weight bytes: bf16 weights, and int8 weight-only quantization of the LLM's linears.

int8 is symmetric per output channel: w ≈ scale[o] * q[o, i], q in [-127, 127], with
scale[o] = max_i |w[o, i]| / 127. The matmul is PyTorch's own `_weight_int8pack_mm` (the
kernel torchao's int8 weight-only layout dispatches to on CPU), so this is ~40 lines instead
of a dependency whose releases track torch nightlies; it runs with bf16 activations (its fast
path: fp32 activations take a slow generic path on CPU). Modules swapped for `Int8Linear` keep
working everywhere a Linear did (prefill, decode, the attention probe). The static engine's
CPU prefill runs a bf16 copy of each int8 matrix made once (dequantize_int8): its many rows
are compute-bound, and dequantizing on every call cost as much as the matmul.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

WEIGHT_FORMATS = ("fp32", "bf16", "int8")


# Rows up to which the int8 GEMV kernel beats dequantize-then-matmul (measured on this 2-core
# AVX512 VM, 1 thread: at 1 row 12 us vs 78 us; at 90 rows 497 us vs 115 us, bf16 matmul 57 us).
GEMV_ROWS = 4


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ (scales[:, None] * q).T -> [..., out], in x's dtype.

    Decode (one row per sample) runs the int8 kernel, which reads a quarter of fp32's bytes;
    prefill (many rows: compute-bound) dequantizes to x's dtype and runs its fast matmul."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    # On CUDA always gpt-fast's dequantize-then-matmul: under torch.compile inductor fuses it.
    gemv = x2.shape[0] <= GEMV_ROWS and x.dtype in (torch.bfloat16, torch.float16)
    if gemv and not x.is_cuda and hasattr(torch, "_weight_int8pack_mm"):
        y = torch._weight_int8pack_mm(x2, q, scales.to(x.dtype))
    else:
        y = F.linear(x2, q.to(x.dtype)) * scales.to(x.dtype)
    return y.reshape(*shape[:-1], q.shape[0])


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(scales[:, None] * q) in `dtype`: the float matrix int8_matmul's many-rows path builds
    on every call, built once."""
    return (q.float() * scales.float()[:, None]).to(dtype)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8: (q int8 [out, in], scales fp32 [out])."""
    w = w.detach().float()
    scales = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


class Int8Linear(nn.Module):
    """A bias-free Linear with int8 weights and per-output-channel scales."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        self.in_features, self.out_features = q.shape[1], q.shape[0]
        self.register_buffer("weight_int8", q)
        self.register_buffer("scales", scales)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        if linear.bias is not None:
            raise ValueError("int8 weight-only quantization here supports bias-free linears")
        return cls(*quantize_int8(linear.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_matmul(x, self.weight_int8, self.scales)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8 per-channel"


def quantize_llm_linears(lm: nn.Module) -> int:
    """Swap every Linear of the LLM — decoder layers and the lm_head, as gpt-fast's and
    torchao's int8 weight-only do — for an Int8Linear; the embeddings stay in the model's
    dtype. The lm_head matters: with a 32k vocabulary it is a third of a decode token's
    weights (its effect on the argmax that picks action tokens is measured by
    bench/engine_speed.py's token agreement). Returns how many were swapped."""
    n = 0
    if isinstance(lm.lm_head, nn.Linear) and lm.lm_head.bias is None:
        lm.lm_head = Int8Linear.from_linear(lm.lm_head)
        n += 1
    for layer in lm.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, Int8Linear.from_linear(child))
                    n += 1
    return n


def weight_format(model: nn.Module) -> str:
    """The format a model's weights are in now: int8 if its LLM holds Int8Linear layers."""
    if any(isinstance(m, Int8Linear) for m in model.modules()):
        return "int8"
    dtype = next(model.parameters()).dtype
    return "bf16" if dtype == torch.bfloat16 else "fp32" if dtype == torch.float32 else str(dtype)


def convert_weights(model: nn.Module, fmt: str) -> None:
    """Convert `model` in place: fp32 (as loaded), bf16 (everything), or int8 (bf16 everywhere,
    int8 weight-only linears in the LLM's decoder layers). On a CPU a diffusion action head
    (CogACT's DiT) stays fp32. Conversions only go down in precision: the fp32 originals are not
    kept (reload the checkpoint to go back)."""
    if fmt not in WEIGHT_FORMATS:
        raise ValueError(f"weights must be one of {WEIGHT_FORMATS}, got {fmt!r}")
    now = weight_format(model)
    if now == fmt:
        return
    order = {"fp32": 0, "bf16": 1, "int8": 2}
    if now not in order or order[fmt] < order[now]:
        raise ValueError(
            f"the model's weights are already {now}; going back to {fmt} needs the original "
            "weights: load the policy again"
        )
    if fmt == "int8":  # quantize from the highest precision at hand, then the rest to bf16
        n = quantize_llm_linears(model.language_model)
        log.info("int8 weight-only: %d LLM linears quantized (per output channel)", n)
    model.to(dtype=torch.bfloat16)  # float tensors only: int8 weights stay int8
    head = getattr(model, "action_model", None)
    if head is not None and not next(head.parameters()).is_cuda:
        # A diffusion head's matmuls are tiny (16 action tokens): a CPU runs them no faster in
        # bf16 (measured slower with the DiT cache), so it keeps fp32 there.
        head.float()

"""The decoder layer as functions of plain weight tensors: what the compiled engine runs.

transformers' LlamaDecoderLayer, op for op, with two changes that only reorder float work:
q/k/v and gate/up are fused into one matmul each (fewer, larger matmuls: on a CPU a small
matmul costs its call overhead, not its FLOPs), and weights come as tensors — a float matrix or
int8 weight-only (int8, scales) — so one compiled graph serves every layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .rope import apply_rope
from .weights import int8_matmul

# One linear's weights: a float matrix [out, in], or int8 weight-only (int8 [out, in],
# per-output-channel scales [out]) — see weights.py.
Linear = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def linear(x: torch.Tensor, w: Linear) -> torch.Tensor:
    return int8_matmul(x, *w) if isinstance(w, tuple) else F.linear(x, w)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm, op for op (fp32 statistics, cast back before the weight)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _qkv(h, cos, sin, w, eps: float, num_heads: int, kv_heads: int):
    """The attention inputs of prefill rows h [B, T, D]: rotated q, k, v [B, heads, T, hd]."""
    ln1, qkv_w = w[0], w[1]
    b, t, _ = h.shape
    head_dim = cos.shape[-1]
    x = rms_norm(h, ln1, eps)
    qkv = linear(x, qkv_w).view(b, t, num_heads + 2 * kv_heads, head_dim).transpose(1, 2)
    q, k, v = qkv.split([num_heads, kv_heads, kv_heads], dim=1)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def _finish(h, out, w, eps: float):
    """The rest of the layer after attention (out [B, H, T, hd]): o_proj, residual, MLP."""
    o_w, ln2, gate_up_w, down_w = w[2:]
    b, t, _ = h.shape
    h = h + linear(out.transpose(1, 2).reshape(b, t, -1), o_w)
    gate, up = linear(rms_norm(h, ln2, eps), gate_up_w).chunk(2, dim=-1)
    return h + linear(F.silu(gate) * up, down_w)


def prefill_layer(
    h, cos, sin, w, eps: float, num_heads: int, kv_heads: int, gqa: bool, mask=None
):
    """One decoder layer over the prefill rows h [B, T, D] -> (h, k, v, last), k/v
    [B, KVH, T, hd] rotated, for the caller to put in the KV cache; `last` [B, H, 1, T] fp32
    is the last row's attention probabilities (the semantic probe of FastV / VLA-Pruner),
    computed here from the layer's own q and k: one small matmul in the graph instead of a
    q projection, RoPE and softmax recomputed by the probe afterwards (attention_probe.py).
    mask: None (causal) or [B, 1, T, T] bool."""
    q, k, v = _qkv(h, cos, sin, w, eps, num_heads, kv_heads)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa
    )  # gqa comes as a bool: with dynamic shapes `kv_heads != num_heads` would be symbolic
    return _finish(h, out, w, eps), k, v, _last_row_attention(q, k, mask, gqa)


def _last_row_attention(q, k, mask, gqa: bool) -> torch.Tensor:
    """softmax(q_last k^T / sqrt(hd)) [B, H, 1, T] in fp32; the last prompt row sees every key
    but left padding (mask's last row)."""
    if gqa:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q[:, :, -1:] @ k.transpose(2, 3)).float() * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask[:, :, -1:], float("-inf"))
    return torch.softmax(scores, dim=-1)


def prefill_rows_layer(
    h, cos, sin, w, eps: float, num_heads: int, kv_heads: int, attend, halves=None
):
    """prefill_layer for a subset of the rows (h [B, n, D], cos/sin [B, n, hd]) whose keys and
    values join the others in the cache: attend(q, k, v) writes k/v there and returns the
    attention output [B, H, n, hd] over the whole cache (engine/reuse.py). halves: the two
    halves around `attend` to run, (qkv, finish) — compiled ones from compiled_halves(), or by
    default these functions eagerly."""
    qkv, finish = halves or (_qkv, _finish)
    q, k, v = qkv(h, cos, sin, w, eps, num_heads, kv_heads)
    return finish(h, attend(q, k, v), w, eps)


def compiled_halves():
    """prefill_rows_layer's halves compiled with dynamic shapes (the row count varies per
    layer and step under VLA-Cache: one graph each for all of them); `attend` (index writes
    into the cache, SDPA with a row mask) stays eager between them."""
    return torch.compile(_qkv, dynamic=True), torch.compile(_finish, dynamic=True)


def weight_of(module: torch.nn.Module) -> Linear:
    if getattr(module, "bias", None) is not None:
        raise ValueError("the static decode step supports bias-free linears (Llama) only")
    if hasattr(module, "weight_int8"):  # weights.Int8Linear
        return (module.weight_int8, module.scales)
    return module.weight


def _fuse(*ws: Linear) -> Linear:
    """Stack linears that read the same input into one [sum(out), in] matmul."""
    if all(isinstance(w, tuple) for w in ws):
        return (torch.cat([w[0] for w in ws]), torch.cat([w[1] for w in ws]))
    if any(isinstance(w, tuple) for w in ws):
        raise ValueError("cannot fuse int8 and float linears")
    return torch.cat(ws)


def layer_weights(layer: torch.nn.Module) -> tuple:
    """The tensors `decode_layer` takes, from a transformers LlamaDecoderLayer (fused copies of
    q/k/v and gate/up: the engine's decode weights cost one extra copy of those matrices)."""
    a, m = layer.self_attn, layer.mlp
    return (
        layer.input_layernorm.weight,
        _fuse(weight_of(a.q_proj), weight_of(a.k_proj), weight_of(a.v_proj)),
        weight_of(a.o_proj),
        layer.post_attention_layernorm.weight,
        _fuse(weight_of(m.gate_proj), weight_of(m.up_proj)),
        weight_of(m.down_proj),
    )

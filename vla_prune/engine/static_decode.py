"""A static-shape decode step, in the spirit of gpt-fast's `decode_one_token`.

The eager `LlamaEngine.decode` slices each layer's KV cache to its current length, so every new
token, budget or instruction length is a new shape. Here every layer attends over its WHOLE
preallocated cache with a validity mask and writes the new row at a position held in a tensor
(`index_copy_`), so shapes never change: one compiled graph serves every pruning budget and
instruction length (the cache capacity is fixed, see LlamaEngine._ensure_cache). The graph is
the whole token — all layers that run, final norm and lm_head — with the weights passed as
tensors, not modules, so dynamo guards on shapes and dtypes only. A layer-skip set changes the
list of layers: a set of a new size compiles once more, never per budget.

Attention is computed explicitly (one query row: a matmul and a softmax, as cheap as SDPA),
which yields every layer's attention probabilities for free: VLA-Pruner's decode-time probe is
read off the step itself. Each layer's q/k/v and gate/up projections are fused into one matmul
(fewer, larger GEMVs: on a CPU a small GEMV costs its call overhead, not its FLOPs).

CPU: inductor. CUDA: mode="reduce-overhead" (CUDA graphs; the cache buffers are marked static).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from .kv_cache import KVCache
from .rope import apply_rope
from .weights import int8_matmul

log = logging.getLogger(__name__)

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


def decode_layer(h, cos, sin, k_cache, v_cache, mask, at, w, eps: float, num_heads: int):
    """One decoder layer for one new token per sample.

    h [B, 1, D]; cos/sin [B, 1, hd]; k_cache/v_cache [B, KVH, S, hd] (the layer's whole cache,
    row `at` [1] written here); mask [B, S] bool (valid keys; row `at` set here).
    Returns (h [B, 1, D], attention probabilities [B, H, S] in fp32).
    """
    ln1, qkv_w, o_w, ln2, gate_up_w, down_w = w
    b = h.shape[0]
    kv_heads, head_dim = k_cache.shape[1], k_cache.shape[3]
    x = rms_norm(h, ln1, eps)
    qkv = linear(x, qkv_w).view(b, 1, num_heads + 2 * kv_heads, head_dim).transpose(1, 2)
    q, k, v = qkv.split([num_heads, kv_heads, kv_heads], dim=1)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k_cache.index_copy_(2, at, k)
    v_cache.index_copy_(2, at, v)
    mask.index_fill_(1, at, True)
    keys, values = k_cache, v_cache
    if kv_heads != num_heads:  # grouped-query attention
        keys = keys.repeat_interleave(num_heads // kv_heads, dim=1)
        values = values.repeat_interleave(num_heads // kv_heads, dim=1)
    scores = (q @ keys.transpose(-1, -2)).float() * head_dim**-0.5  # [B, H, 1, S]
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = (probs.to(values.dtype) @ values).transpose(1, 2).reshape(b, 1, -1)
    h = h + linear(out, o_w)
    gate, up = linear(rms_norm(h, ln2, eps), gate_up_w).chunk(2, dim=-1)
    h = h + linear(F.silu(gate) * up, down_w)
    return h, probs[:, :, 0]


def decode_token(h, cos, sin, k_caches, v_caches, masks, ats, weights, head, eps, num_heads):
    """Every layer that runs (the lists hold only those), then the final norm and lm_head.
    Returns (logits [B, V] fp32, attention probabilities [layers, B, H, S])."""
    probs = []
    for k, v, m, at, w in zip(k_caches, v_caches, masks, ats, weights):
        h, p = decode_layer(h, cos, sin, k, v, m, at, w, eps, num_heads)
        probs.append(p)
        at.add_(1)
    norm_w, lm_w = head
    logits = linear(rms_norm(h[:, -1], norm_w, eps), lm_w).float()
    return logits, torch.stack(probs) if probs else h.new_zeros(0)


def _weight(module: torch.nn.Module) -> Linear:
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
        _fuse(_weight(a.q_proj), _weight(a.k_proj), _weight(a.v_proj)),
        _weight(a.o_proj),
        layer.post_attention_layernorm.weight,
        _fuse(_weight(m.gate_proj), _weight(m.up_proj)),
        _weight(m.down_proj),
    )


class StaticDecoder:
    """Decode steps over a KVCache with whole-cache attention; optionally compiled.

    `begin(cache)` after each prefill turns the cache's per-layer lengths and row metadata
    into validity masks and write positions; `step` then runs one token.
    """

    def __init__(self, lm: Any, compile: bool = False):
        cfg = lm.config
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise ValueError(f"static decode needs a SiLU MLP, this model has {cfg.hidden_act}")
        self.lm = lm
        self.eps = float(cfg.rms_norm_eps)
        self.num_heads = cfg.num_attention_heads
        self.compiled = compile
        self.cuda = lm.model.embed_tokens.weight.is_cuda
        self._fn = decode_token
        if compile:
            # dynamic=False: one shape (the cache capacity) -> one graph; CUDA graphs on a GPU.
            mode = "reduce-overhead" if self.cuda else None
            self._fn = torch.compile(decode_token, fullgraph=True, dynamic=False, mode=mode)
        self._weights = [layer_weights(layer) for layer in lm.model.layers]
        self._head = (lm.model.norm.weight, _weight(lm.lm_head))
        self.masks: list[torch.Tensor] = []
        self.at: list[torch.Tensor] = []
        self._static_cache: KVCache | None = None

    def begin(self, cache: KVCache) -> None:
        """Masks and write positions from the cache right after a prefill (in place, so the
        compiled graph and CUDA graphs see the same buffers step after step)."""
        dev = cache.k[0].device
        if self._static_cache is not cache:
            self._static_cache = cache
            shape = (cache.batch, cache.max_len)
            self.masks = [torch.zeros(shape, dtype=torch.bool, device=dev) for _ in cache.k]
            self.at = [torch.zeros(1, dtype=torch.long, device=dev) for _ in cache.k]
            if self.cuda:
                for t in (*cache.k, *cache.v, *self.masks, *self.at):
                    torch._dynamo.mark_static_address(t)
        for i, n in enumerate(cache.length):
            self.masks[i].zero_()
            self.masks[i][:, :n] = cache.valid[cache.group[i]][:, :n]
            self.at[i].fill_(n)

    def step(
        self,
        cache: KVCache,
        h: torch.Tensor,
        pos: torch.Tensor,
        skip_layers: frozenset[int],
        probe_layer: int | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """h [B, 1, D] embedded new tokens at positions pos [B, 1] -> (logits [B, V], attention
        probabilities [B, H, S] at `probe_layer` or None)."""
        cos, sin = self.lm.model.rotary_emb(h, pos)
        run = [i for i in range(len(self._weights)) if i not in skip_layers]
        logits, probs = self._fn(
            h,
            cos,
            sin,
            [cache.k[i] for i in run],
            [cache.v[i] for i in run],
            [self.masks[i] for i in run],
            [self.at[i] for i in run],
            [self._weights[i] for i in run],
            self._head,
            self.eps,
            self.num_heads,
        )
        for i in run:
            cache.length[i] += 1
        if probe_layer is None or probe_layer not in run:
            return logits, None
        return logits, probs[run.index(probe_layer)]

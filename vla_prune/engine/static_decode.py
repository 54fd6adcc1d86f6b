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

from .functional import layer_weights, linear, rms_norm, weight_of
from .kv_cache import KVCache
from .rope import apply_rope

log = logging.getLogger(__name__)


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


def rope_cos_sin(pos: torch.Tensor, inv_freq: torch.Tensor, scaling: float, dtype):
    """LlamaRotaryEmbedding.forward, op for op: pos [B, T] -> cos, sin [B, T, hd]."""
    freqs = pos[..., None].float() * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


def decode_token(
    token_ids, pos, embed_w, rope, k_caches, v_caches, masks, ats, weights, head, eps, num_heads
):
    """Embed the new tokens [B] at positions pos [B, 1], run every layer that runs (the lists
    hold only those), then the final norm and lm_head.
    Returns (logits [B, V] fp32, attention probabilities [layers, B, H, S])."""
    h = F.embedding(token_ids[:, None], embed_w)
    cos, sin = rope_cos_sin(pos, rope[0], rope[1], h.dtype)
    probs = []
    for k, v, m, at, w in zip(k_caches, v_caches, masks, ats, weights):
        h, p = decode_layer(h, cos, sin, k, v, m, at, w, eps, num_heads)
        probs.append(p)
        at.add_(1)
    norm_w, lm_w = head
    x = rms_norm(h[:, -1], norm_w, eps)
    if isinstance(lm_w, torch.Tensor):
        x = x.to(lm_w.dtype)  # the head may run in fp32 on a CPU (see StaticDecoder)
    logits = linear(x, lm_w).float()
    return logits, torch.stack(probs) if probs else h.new_zeros(0)


def _tensors(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _tensors(item)]
    return []


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
        rotary = lm.model.rotary_emb
        if "dynamic" in str(getattr(rotary, "rope_type", "default")):
            raise ValueError("static decode needs a fixed RoPE (inv_freq), not dynamic scaling")
        self._rope = (rotary.inv_freq, float(getattr(rotary, "attention_scaling", 1.0)))
        self._embed = lm.model.embed_tokens.weight
        self.weights = [layer_weights(layer) for layer in lm.model.layers]
        head = weight_of(lm.lm_head)
        if not self.cuda and isinstance(head, torch.Tensor) and head.dtype != torch.float32:
            # A CPU's bf16 GEMV is ~3x slower than fp32 (oneDNN): the vocabulary projection,
            # one GEMV per token, runs on an fp32 copy (also: argmax on fp32 logits).
            head = head.float()
        self._head = (lm.model.norm.weight, head)
        if self.cuda and compile:  # CUDA graphs copy non-static inputs on every replay
            for t in _tensors((self._embed, self._rope[0], self.weights, self._head)):
                torch._dynamo.mark_static_address(t)
        self.masks: list[torch.Tensor] = []
        self.at: list[torch.Tensor] = []
        self._static_cache: KVCache | None = None

    def begin(self, cache: KVCache, next_pos: torch.Tensor, max_new: int) -> None:
        """Masks and write positions from the cache right after a prefill (in place, so the
        compiled graph and CUDA graphs see the same buffers step after step), and the row
        metadata of the `max_new` decode rows to come (positions next_pos [B] + j), written
        once here instead of once per token."""
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
        new = next_pos[:, None] + torch.arange(max_new, device=dev)
        for g in set(cache.group):
            cache.describe_decode_rows(g, new)

    def step(
        self,
        cache: KVCache,
        token_ids: torch.Tensor,
        pos: torch.Tensor,
        skip_layers: frozenset[int],
        probe_layer: int | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """New tokens [B] at positions pos [B, 1] -> (logits [B, V], attention probabilities
        [B, H, S] at `probe_layer` or None)."""
        run = [i for i in range(len(self.weights)) if i not in skip_layers]
        logits, probs = self._fn(
            token_ids,
            pos,
            self._embed,
            self._rope,
            [cache.k[i] for i in run],
            [cache.v[i] for i in run],
            [self.masks[i] for i in run],
            [self.at[i] for i in run],
            [self.weights[i] for i in run],
            self._head,
            self.eps,
            self.num_heads,
        )
        for i in run:
            cache.length[i] += 1
        for g in set(cache.group):
            cache.rows_len[g] += 1  # their metadata was written by begin()
        if probe_layer is None or probe_layer not in run:
            return logits, None
        return logits, probs[run.index(probe_layer)]

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
from .weights import dequantize_int8

log = logging.getLogger(__name__)


def decode_layer(
    h, cos, sin, k_cache, v_cache, mask, at, w, eps: float, num_heads: int, probs: bool
):
    """One decoder layer for one new token per sample.

    h [B, 1, D]; cos/sin [B, 1, hd]; k_cache/v_cache [B, KVH, S, hd] (the layer's whole cache,
    row `at` [1] written here); mask [B, S] bool (valid keys; row `at` set here).
    Returns (h [B, 1, D], with `probs` the attention probabilities [B, H, S] in fp32, else None).
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
    # SDPA for the output everywhere: inductor lowers an explicit masked attention over S keys
    # ~8x slower on CPU. The probe layer adds its probabilities alone (q k^T and a softmax,
    # no product with V): what VLA-Pruner's decode-time probe reads.
    out = _attend_one_row(q, k_cache, v_cache, mask[:, None, None, :], kv_heads != num_heads)
    p = None
    if probs:
        keys = k_cache
        if kv_heads != num_heads:  # grouped-query attention
            keys = keys.repeat_interleave(num_heads // kv_heads, dim=1)
        scores = (q @ keys.transpose(-1, -2)).float() * head_dim**-0.5  # [B, H, 1, S]
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        p = torch.softmax(scores, dim=-1)[:, :, 0]
    h = h + linear(out.transpose(1, 2).reshape(b, 1, -1), o_w)
    gate, up = linear(rms_norm(h, ln2, eps), gate_up_w).chunk(2, dim=-1)
    h = h + linear(F.silu(gate) * up, down_w)
    return h, p


def _attend_one_row(q, k_cache, v_cache, mask, gqa: bool):
    """SDPA of one query row over the whole cache. A CPU's bf16 SDPA kernel costs ~4x its
    fp32 one at this shape (small-openvla: ~400 vs ~75 us a layer; the upcast of the cache is
    included in the latter): on a CPU a bf16 cache is attended in fp32 (exact upcast; the
    softmax is then more precise, not less), the output cast back."""
    if q.dtype == torch.bfloat16 and not q.is_cuda:
        out = F.scaled_dot_product_attention(
            q.float(), k_cache.float(), v_cache.float(), attn_mask=mask, enable_gqa=gqa
        )
        return out.to(q.dtype)
    return F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask, enable_gqa=gqa)


def rope_cos_sin(pos: torch.Tensor, inv_freq: torch.Tensor, scaling: float, dtype):
    """LlamaRotaryEmbedding.forward, op for op: pos [B, T] -> cos, sin [B, T, hd]."""
    freqs = pos[..., None].float() * inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)


def decode_token(
    token_ids, pos, embed_w, rope, k_caches, v_caches, masks, ats, weights, head, eps, num_heads,
    probe: int,
):
    """Embed the new tokens [B] at positions pos [B, 1], run every layer that runs (the lists
    hold only those), then the final norm and lm_head. `probe`: index (in those lists) of the
    layer whose attention probabilities to return, -1 for none.
    Returns (logits [B, V] fp32, attention probabilities [B, H, S] at `probe` or None)."""
    h = F.embedding(token_ids[:, None], embed_w)
    cos, sin = rope_cos_sin(pos, rope[0], rope[1], h.dtype)
    probs = None
    for i, (k, v, m, at, w) in enumerate(zip(k_caches, v_caches, masks, ats, weights)):
        h, p = decode_layer(h, cos, sin, k, v, m, at, w, eps, num_heads, probs=i == probe)
        if p is not None:
            probs = p
        at.add_(1)
    norm_w, lm_w = head
    x = rms_norm(h[:, -1], norm_w, eps)
    if isinstance(lm_w, torch.Tensor):
        x = x.to(lm_w.dtype)  # the head may run in fp32 on a CPU (see StaticDecoder)
    logits = linear(x, lm_w).float()
    return logits, probs


def decode_greedy(
    first, pos, embed_w, rope, k_caches, v_caches, masks, ats, weights, head, eps, num_heads,
    probe: int, steps: int,
):
    """`steps` greedy tokens after `first` [B] in one graph (argmax over the whole vocabulary
    fed back, as upstream's generate): one call per control step instead of one per token.
    Returns (tokens [B, steps + 1], logits [B, steps, V] fp32, the `probe` layer's attention
    averaged over heads and summed over the steps [B, S], or an empty tensor)."""
    tokens, logits, attn = [first], [], None
    for j in range(steps):
        lg, probs = decode_token(
            tokens[-1], pos + j, embed_w, rope, k_caches, v_caches, masks, ats, weights, head,
            eps, num_heads, probe,
        )
        logits.append(lg)
        tokens.append(lg.argmax(-1))
        if probs is not None:
            a = probs.mean(dim=1)  # heads -> [B, S]
            attn = a if attn is None else attn + a
    if attn is None:
        attn = logits[0].new_zeros(0)
    return torch.stack(tokens, dim=1), torch.stack(logits, dim=1), attn


# One decode graph per (model shape, weight format, probe or not, skip-set size, capacity): a
# process holding several engine levels (the ROS node's budget levels, a benchmark's settings,
# two policies) needs more than dynamo's default of 8 per function, beyond which a
# fullgraph=True function fails outright instead of falling back.
GRAPHS_PER_PROCESS = 64


def _allow_graphs(n: int) -> None:
    config = torch._dynamo.config
    if getattr(config, "recompile_limit", n) < n:
        config.recompile_limit = n


def _dequantized(layer_w: tuple) -> tuple:
    """A layer's weights with every int8 linear (q, scales) as one bf16 matrix."""
    return tuple(
        dequantize_int8(*w, torch.bfloat16) if isinstance(w, tuple) else w for w in layer_w
    )


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
        self._fn, self._greedy = decode_token, decode_greedy
        if compile:
            # dynamic=False: one shape (the cache capacity) -> one graph; CUDA graphs on a GPU.
            mode = "reduce-overhead" if self.cuda else None
            _allow_graphs(GRAPHS_PER_PROCESS)
            self._fn = torch.compile(decode_token, fullgraph=True, dynamic=False, mode=mode)
            if not self.cuda:
                # CPU: every compiled call costs ~0.1 ms of guards and wrappers, so the whole
                # decode is one graph. CUDA: a token is one CUDA-graph replay (microseconds),
                # and unrolling 6 tokens of a 32-layer 7B would only multiply compile time.
                self._greedy = torch.compile(
                    decode_greedy, fullgraph=True, dynamic=False, mode=mode
                )
        rotary = lm.model.rotary_emb
        if "dynamic" in str(getattr(rotary, "rope_type", "default")):
            raise ValueError("static decode needs a fixed RoPE (inv_freq), not dynamic scaling")
        self._rope = (rotary.inv_freq, float(getattr(rotary, "attention_scaling", 1.0)))
        self._embed = lm.model.embed_tokens.weight
        self.weights = [layer_weights(layer) for layer in lm.model.layers]
        # The prefill's (many rows: compute-bound): on a CPU an int8 linear would dequantize
        # its whole matrix on every call (~40% of tiny-openvla's int8 prefill, and the same
        # for every budget: pruning barely paid); it gets a bf16 copy made once (2 more bytes
        # a parameter, CPU only). CUDA: inductor fuses the dequantization into the matmul.
        self.prefill_weights = self.weights
        if not self.cuda:
            self.prefill_weights = [_dequantized(w) for w in self.weights]
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

    def _inputs(self, cache: KVCache, run: list[int]) -> tuple:
        return (
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

    def _advance(self, cache: KVCache, run: list[int], n: int) -> None:
        for i in run:
            cache.length[i] += n
        for g in set(cache.group):
            cache.rows_len[g] += n  # their metadata was written by begin()

    def greedy(
        self,
        cache: KVCache,
        first: torch.Tensor,
        pos: torch.Tensor,
        steps: int,
        skip_layers: frozenset[int],
        probe_layer: int | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """`steps` greedy tokens after `first` [B] from positions pos [B, 1] in one call ->
        (tokens [B, steps + 1], logits [B, steps, V], head-averaged attention at `probe_layer`
        summed over the steps [B, S] or None)."""
        run = [i for i in range(len(self.weights)) if i not in skip_layers]
        probe = run.index(probe_layer) if probe_layer in run else -1
        inputs = self._inputs(cache, run)
        if self.compiled and self.cuda:  # token by token: one CUDA-graph replay each
            tokens, logits, attn = self._token_by_token(first, pos, inputs, probe, steps)
        else:
            tokens, logits, attn = self._greedy(first, pos, *inputs, probe, steps)
        self._advance(cache, run, steps)
        return tokens, logits, None if probe < 0 else attn

    def _token_by_token(self, first, pos, inputs, probe: int, steps: int):
        """decode_greedy's loop around the compiled one-token graph (same values)."""
        tokens, logits, attn = [first], [], None
        for j in range(steps):
            lg, probs = self._fn(tokens[-1], pos + j, *inputs, probe)
            lg = lg.clone()  # a CUDA graph's outputs are overwritten by its next replay
            logits.append(lg)
            tokens.append(lg.argmax(-1))
            if probs is not None:
                a = probs.mean(dim=1)
                attn = a if attn is None else attn + a
        return torch.stack(tokens, dim=1), torch.stack(logits, dim=1), attn

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
        probe = run.index(probe_layer) if probe_layer in run else -1
        logits, probs = self._fn(token_ids, pos, *self._inputs(cache, run), probe)
        self._advance(cache, run, 1)
        return logits, probs

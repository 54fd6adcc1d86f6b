"""Our own decoder-layer loop over transformers' Llama weights.

We use the layers' submodules (norms, q/k/v/o projections, MLP, rotary) but run the loop
ourselves, which gives us three things upstream can't: a pruning point at layer K (layers >= K
run on the kept rows only, with their original RoPE positions), a preallocated KV cache whose
layers hold different lengths, and attention scores without eager attention (attention_probe).
Nothing in transformers is patched.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from .attention_probe import attention_from_queries, attention_rows, to_visual
from .functional import compiled_halves, prefill_layer
from .kv_cache import KVCache
from .reuse import PrefillStamp, ReusePlan, RowReuse, layer_rows
from .rope import apply_rope
from .static_decode import StaticDecoder

log = logging.getLogger(__name__)


@dataclass
class PrefillContext:
    """What a pruning hook may look at when the prefill reaches the pruning point."""

    engine: LlamaEngine
    embeds: torch.Tensor  # [B, T, D] layer-0 inputs
    positions: torch.Tensor  # [B, T]
    pad: torch.Tensor  # [B] left-padding rows per sample
    num_visual: int
    hidden_in: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> its input [B,T,D]
    current: torch.Tensor | None = None  # [B, T, D] the hidden states entering layer K
    # layer -> position ids of its rows (layers from the pruning point on hold fewer rows)
    positions_in: dict[int, torch.Tensor] = field(default_factory=dict)
    # layer -> its last row's attention over the layer's cached keys [B, H, 1, L], where the
    # layer computed it itself (the static engine's prefill); else the probe recomputes it
    last_row_attention: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def vis_start(self) -> torch.Tensor:  # [B] row of visual token 0 (after padding and BOS)
        return self.pad + 1

    def visual_embeddings(self) -> torch.Tensor:
        """[B, N, D] layer-0 embeddings of the visual tokens (projector outputs)."""
        idx = self.vis_start[:, None] + torch.arange(self.num_visual, device=self.pad.device)
        return self.embeds.gather(1, idx[..., None].expand(-1, -1, self.embeds.shape[-1]))

    def attention(self, layer: int, rows: torch.Tensor) -> torch.Tensor:
        """Attention of rows [B, R] of `layer`'s input over the visual tokens -> [B, H, R, N].

        Rows index that layer's sequence: after the pruning point it holds only the kept rows
        (the last prompt token is row -1 everywhere). Pruned visual tokens get 0.
        """
        if layer not in self.hidden_in:
            raise ValueError(f"layer {layer} was not recorded (pass it in record_layers)")
        hidden = self.hidden_in[layer]
        rows = rows % hidden.shape[1]
        h = hidden.gather(1, rows[..., None].expand(-1, -1, hidden.shape[-1]))
        pos = self.positions_in[layer].gather(1, rows)
        return self.engine.probe(layer, h, pos)


@dataclass
class PruneDecision:
    """What a hook decides at layer K: the kept visual tokens, plus optionally one extra token
    per sample (e.g. the dropped tokens merged into one) placed right after the kept ones."""

    kept: torch.Tensor  # [B, k] sorted visual indices
    merged: torch.Tensor | None = None  # [B, D] hidden state of the extra token
    merged_pos: torch.Tensor | None = None  # [B] its RoPE position id


@dataclass
class PrefillResult:
    """What a prefill computed: the head's input, the pruning choice and the context."""

    output: torch.Tensor  # [B, V] last-position logits, or [B, D] final-norm hidden state
    kept: torch.Tensor | None  # [B, k] kept visual indices, None = all kept
    # recorded layer inputs (the attention probe reads them); None outside our engine (the
    # transformers reference pipeline hands an action head only its output)
    context: PrefillContext | None
    last_hidden: torch.Tensor | None  # [B, T', D] the last layer's output (before final norm)
    # which prefill filled the KV cache: a ReusePlan for the next step names it
    stamp: PrefillStamp | None = None
    # [B, L] visual rows each layer took from the previous step's cache (VLA-Cache); None =
    # no reuse was asked for or possible. Reused rows of last_hidden hold stale values.
    reused: torch.Tensor | None = None


@dataclass
class DecodeStep:
    """One decoded token per sample."""

    logits: torch.Tensor  # [B, V] fp32
    probe: torch.Tensor | None  # [B, H, N] the new token's visual attention at the probe layer
    probe_ms: float = 0.0  # time spent turning it into per-token scores (the "prune" stage)


@dataclass
class GreedyDecode:
    """A head's whole greedy token decode."""

    tokens: torch.Tensor  # [B, steps + 1] the first (from the prefill's logits) and the rest
    logits: torch.Tensor  # [B, steps, V] fp32, of each decoded token
    probe: torch.Tensor | None  # [B, H', N] visual attention at the probe layer, averaged over
    # the decode steps (H' = H, or 1 when the engine averaged the heads already)
    probe_ms: float = 0.0


# A hook gets the context at layer K and returns the kept visual indices [B, k] (sorted), a
# PruneDecision, or None to keep everything.
PruneHook = Callable[[PrefillContext], "torch.Tensor | PruneDecision | None"]


class LlamaEngine:
    def __init__(self, lm: LlamaForCausalLM, num_visual: int):
        self.lm = lm
        cfg = lm.config
        self.layers = lm.model.layers
        self.num_heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads
        self.num_visual = num_visual
        self.cache: KVCache | None = None
        self.next_pos: torch.Tensor | None = None
        self.skip_layers: frozenset[int] = frozenset()  # decoder layers not run at all
        # The static-shape decode step (static_decode.py); None = the eager decode below.
        self.static: StaticDecoder | None = None
        self._prefill_fn = None  # with `static`: the functional prefill layer (functional.py)
        # with `static` compiled: VLA-Cache's row-subset layer halves, compiled on first use
        # (reused rows only), so the other methods compile no extra graphs
        self._row_halves = None

    def use_static_decode(self, enabled: bool, compile: bool = False) -> None:
        """Decode with whole-cache attention at a fixed cache capacity (compiled if asked);
        the eager decode stays the reference it is tested against."""
        self.cache = None  # reallocate (at the static capacity)
        self._prefill_fn = None
        self._row_halves = None
        if not enabled:
            self.static = None
            return
        self.static = StaticDecoder(self.lm, compile=compile)
        # The prefill runs the same fused weights; its row count varies with the budget and the
        # prompt, so its graph is compiled with dynamic shapes (one graph for all of them).
        self._prefill_fn = torch.compile(prefill_layer, dynamic=True) if compile else prefill_layer

    def rows_halves(self):
        """(qkv, finish) for reuse.layer_rows: compiled with the engine, else None (eager)."""
        if self.static is None or not self.static.compiled:
            return None
        if self._row_halves is None:
            self._row_halves = compiled_halves()
        return self._row_halves

    # -- pieces -------------------------------------------------------------------------------

    def _rotary(self, h: torch.Tensor, pos: torch.Tensor):
        return self.lm.model.rotary_emb(h, pos)

    def _layer(self, idx: int, h, cos, sin, mask, start: int, want_q: bool = False):
        layer = self.layers[idx]
        attn = layer.self_attn
        b, t, _ = h.shape
        x = layer.input_layernorm(h)
        q = attn.q_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        keys, values = self.cache.write(idx, start, k, v)
        out = F.scaled_dot_product_attention(
            q,
            keys,
            values,
            attn_mask=mask,
            is_causal=mask is None and t > 1,
            enable_gqa=self.kv_heads != self.num_heads,
        )
        h = h + attn.o_proj(out.transpose(1, 2).reshape(b, t, -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        return (h, q) if want_q else h

    def clock(self) -> float:
        if self.cache.k[0].is_cuda:  # charge the probe only its own kernels
            torch.cuda.synchronize()
        return time.perf_counter()

    def _logits(self, h_last: torch.Tensor) -> torch.Tensor:
        # Only the last position: computing logits for every prefill row triples the cost.
        return self.lm.lm_head(self.lm.model.norm(h_last)).float()

    @torch.inference_mode()
    def probe(self, layer: int, hidden_rows: torch.Tensor, pos_rows: torch.Tensor) -> torch.Tensor:
        attn = attention_rows(
            self.layers[layer],
            self.lm.model.rotary_emb,
            self.cache,
            layer,
            hidden_rows,
            pos_rows,
            self.num_heads,
        )
        return to_visual(attn, self.cache, layer, self.num_visual)

    def _ensure_cache(self, batch: int, max_len: int, like: torch.Tensor):
        if self.static is not None:
            # One capacity for every budget and instruction: room for 128 text + action rows
            # past the visual tokens, in steps of 64; a longer prompt grows it (a recompile).
            max_len = -(-max(max_len, self.num_visual + 1 + 128) // 64) * 64
        if self.cache is None or not self.cache.fits(batch, max_len, like.dtype, like.device):
            self.cache = KVCache(
                len(self.layers),
                batch,
                self.kv_heads,
                self.head_dim,
                max_len,
                like.dtype,
                like.device,
            )

    # -- prefill and decode -------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(
        self,
        embeds: torch.Tensor,
        pad: torch.Tensor,
        max_new_tokens: int,
        prune_layer: int | None = None,
        prune_hook: PruneHook | None = None,
        record_layers: Iterable[int] = (),
        output: str = "logits",
        reuse: ReusePlan | None = None,
    ) -> PrefillResult:
        """Run the prompt: last-position logits [B, V] (or with output="hidden" the final-norm
        hidden state [B, D]), the kept visual indices, the context and the last hidden rows.

        embeds: [B, T, D], left-padded by `pad` [B] rows: [pad, BOS, N visual, text].
        reuse: visual rows to take from the previous prefill's K/V instead of computing them
        (engine/reuse.py); ignored, with no reuse reported, unless `reuse.stamp` names the
        prefill that last filled this cache (same batch, cache and layers that run).
        """
        b, t, d = embeds.shape
        device = embeds.device
        ar = torch.arange(t, device=device)
        pos = (ar[None] - pad[:, None]).clamp(min=0)
        valid = ar[None] >= pad[:, None]
        vis = ar[None] - (pad[:, None] + 1)
        vis = torch.where((vis >= 0) & (vis < self.num_visual), vis, -1)
        self._ensure_cache(b, t + max_new_tokens, embeds)
        cache = self.cache
        row_reuse = self._resolve_reuse(reuse, b)  # before begin_prefill rewrites the rows
        has_padding = bool(pad.any())
        # [BOS, visual..., text]: without padding visual token 0 is row 1 of every sample
        visual_start = None if has_padding else 1
        cache.begin_prefill(pos, valid, vis, has_padding, visual_start)
        ctx = PrefillContext(self, embeds, pos, pad, self.num_visual)
        record = set(record_layers)
        if prune_hook is not None and prune_layer is not None and prune_layer > 0:
            record.add(prune_layer - 1)

        kept = None
        h, mask = embeds, _prefill_mask(valid) if cache.has_padding else None
        cos, sin = self._rotary(h, pos)
        for i in range(len(self.layers)):
            if i == prune_layer and prune_hook is not None:
                ctx.current = h
                decision = prune_hook(ctx)
                if isinstance(decision, torch.Tensor):
                    decision = PruneDecision(decision)
                kept = None if decision is None else decision.kept
                if kept is not None:
                    rows = _kept_rows(pad, kept, self.num_visual, t)
                    h = h.gather(1, rows[..., None].expand(-1, -1, d))
                    pos, valid, vis = (x.gather(1, rows) for x in (pos, valid, vis))
                    if decision.merged is not None:
                        at = pad + 1 + kept.shape[1]  # right after the kept visual rows
                        h, pos, valid, vis = _insert_row(
                            at,
                            (h, decision.merged),
                            (pos, decision.merged_pos),
                            (valid, True),
                            (vis, -1),
                        )
                    layout = None if visual_start is None else (visual_start, kept)
                    cache.prune_from(i, pos, valid, vis, layout)
                    mask = _prefill_mask(valid) if cache.has_padding else None
                    cos, sin = self._rotary(h, pos)
            if i in record:
                ctx.hidden_in[i], ctx.positions_in[i] = h, pos
            if i in self.skip_layers:  # calibrated layer skipping: the residual stream passes
                continue
            split = row_reuse.rows(i, vis) if row_reuse is not None else None
            if split is not None:  # some visual rows keep the previous step's K/V
                row_reuse.move_kv(cache.k[i], cache.v[i], i, vis, split)
                h = layer_rows(self, i, h, cos, sin, valid, split)
                continue
            if self._prefill_fn is None:
                h = self._layer(i, h, cos, sin, mask, start=0)
                continue
            h, k, v, last = self._prefill_fn(
                h,
                cos,
                sin,
                self.static.prefill_weights[i],
                self.static.eps,
                self.num_heads,
                self.kv_heads,
                self.kv_heads != self.num_heads,
                mask,
            )
            cache.write(i, 0, k, v)
            if i in record:
                ctx.last_row_attention[i] = last
        self.next_pos = pos[:, -1] + 1
        if self.static is not None:
            self.static.begin(cache, self.next_pos, max_new_tokens)
        out = self.lm.model.norm(h[:, -1]) if output == "hidden" else self._logits(h[:, -1])
        reused = None if row_reuse is None else row_reuse.reused
        return PrefillResult(out, kept, ctx, h, self._stamp(), reused)

    # -- reuse of the previous step's visual K/V (VLA-Cache) ----------------------------------

    def _stamp(self) -> PrefillStamp:
        ran = frozenset(range(len(self.layers))) - self.skip_layers
        return PrefillStamp(id(self.cache), self.cache.generation, ran)

    def _resolve_reuse(self, plan: ReusePlan | None, batch: int) -> RowReuse | None:
        if plan is None or plan.empty:
            return None
        if len(plan.tokens) != batch or plan.counts.shape[1] != len(self.layers):
            raise ValueError(
                f"ReusePlan for {len(plan.tokens)} slots x {plan.counts.shape[1]} layers, but "
                f"this prefill has {batch} slots x {len(self.layers)} layers"
            )
        if plan.stamp != self._stamp():  # another prefill, cache or skip set came between
            log.debug("reuse plan is for another prefill than the cache holds: not reused")
            return None
        return RowReuse(plan, self.cache.visual_rows(self.num_visual), self.num_visual)

    @torch.inference_mode()
    def greedy_decode(
        self, first: torch.Tensor, steps: int, probe_layer: int | None = None
    ) -> GreedyDecode:
        """`steps` greedy tokens after `first` [B] (argmax over the whole vocabulary). The
        static engine runs them in one call (one compiled graph, one CUDA graph); the eager
        engine token by token (the reference)."""
        if self.static is None or steps == 0:
            tokens, logits, probes, probe_ms = [first], [], [], 0.0
            for _ in range(steps):
                step = self.decode(tokens[-1], probe_layer)
                logits.append(step.logits)
                tokens.append(step.logits.argmax(-1))
                probe_ms += step.probe_ms
                if step.probe is not None:
                    probes.append(step.probe)
            probe = torch.stack(probes).mean(0) if probes else None
            stacked = torch.stack(logits, dim=1) if logits else first.new_zeros(0)
            return GreedyDecode(torch.stack(tokens, dim=1), stacked, probe, probe_ms)
        pos = self.next_pos[:, None]
        tokens, logits, attn = self.static.greedy(
            self.cache, first, pos, steps, self.skip_layers, probe_layer
        )
        self.next_pos = self.next_pos + steps
        probe, probe_ms = None, 0.0
        if attn is not None:  # summed over the steps in the graph; columns -> tokens is all
            t0 = self.clock()
            mean = (attn / steps)[:, None, None]  # [B, 1, 1, S]
            probe = to_visual(mean, self.cache, probe_layer, self.num_visual)[:, :, 0]
            probe_ms = (self.clock() - t0) * 1e3
        return GreedyDecode(tokens, logits, probe, probe_ms)

    @torch.inference_mode()
    def decode(self, token_ids: torch.Tensor, probe_layer: int | None = None) -> DecodeStep:
        """One token per sample [B]: its logits and, at `probe_layer`, its attention over the
        visual tokens."""
        cache = self.cache
        pos = self.next_pos[:, None]
        if self.static is not None:
            logits, probs = self.static.step(cache, token_ids, pos, self.skip_layers, probe_layer)
            probe, probe_ms = None, 0.0
            if probs is not None:  # the step computed it; mapping columns to tokens is all
                t0 = self.clock()
                probe = to_visual(probs[:, :, None], cache, probe_layer, self.num_visual)[:, :, 0]
                probe_ms = (self.clock() - t0) * 1e3
            self.next_pos = self.next_pos + 1
            return DecodeStep(logits, probe, probe_ms)
        h = self.lm.model.embed_tokens(token_ids[:, None])
        # Each row-metadata group gets the new row once. A group may have no layer that runs
        # (skip_layers covering every layer from the pruning point on, or all layers): its rows
        # are then read by nobody, and the residual stream just passes those layers.
        for g in set(cache.group):
            cache.append_row(g, pos[:, 0])
        cos, sin = self._rotary(h, pos)
        probe, probe_ms = None, 0.0
        for i in range(len(self.layers)):
            if i in self.skip_layers:
                continue
            mask = None
            if cache.has_padding:
                valid = cache.valid[cache.group[i]][:, : cache.length[i] + 1]
                mask = valid[:, None, None, :]
            if i != probe_layer:
                h = self._layer(i, h, cos, sin, mask, start=cache.length[i])
                continue
            h, q = self._layer(i, h, cos, sin, mask, start=cache.length[i], want_q=True)
            t0 = self.clock()  # the new token's q is at hand: its attention costs one matmul
            attn = attention_from_queries(q, cache, i, pos)
            probe = to_visual(attn, cache, i, self.num_visual)[:, :, 0]
            probe_ms = (self.clock() - t0) * 1e3
        self.next_pos = self.next_pos + 1
        return DecodeStep(self._logits(h[:, -1]), probe, probe_ms)


def _prefill_mask(valid: torch.Tensor) -> torch.Tensor:
    """Causal mask that also hides left padding; padding rows see themselves (no NaN rows)."""
    t = valid.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=valid.device).tril()
    eye = torch.eye(t, dtype=torch.bool, device=valid.device)
    return ((causal[None] & valid[:, None, :]) | eye[None])[:, None]


def _insert_row(at: torch.Tensor, *pairs):
    """Insert one row per sample at index at[b] into each [B, T, ...] tensor of `pairs`
    ((tensor, value per sample [B, ...] or a scalar)) -> the tensors with T + 1 rows."""
    out = []
    for x, value in pairs:
        rows = []
        for b in range(x.shape[0]):
            v = value[b] if isinstance(value, torch.Tensor) else torch.tensor(value, dtype=x.dtype)
            i = int(at[b])
            rows.append(torch.cat([x[b, :i], v.to(x)[None], x[b, i:]]))
        out.append(torch.stack(rows))
    return out


def _kept_rows(pad: torch.Tensor, kept: torch.Tensor, num_visual: int, t: int) -> torch.Tensor:
    """Row indices [B, T'] of padding + BOS, the kept visual tokens and all text, in order."""
    rows = []
    for b in range(pad.shape[0]):
        start = int(pad[b]) + 1
        rows.append(
            torch.cat(
                [
                    torch.arange(start, device=pad.device),
                    start + kept[b].to(pad.device),
                    torch.arange(start + num_visual, t, device=pad.device),
                ]
            )
        )
    return torch.stack(rows)

"""The fast scoring + selection path picks exactly what the straightforward one did.

The reference below is the code path before it was optimized (one PruneInputs per batch slot,
the attention probe by gather + scatter onto zeros, apply_rope, the numpy max-min loop with
numpy's own matrix product), kept verbatim in spirit. The optimized path must give the same
kept indices and origins for the same inputs, and the same scores bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import random_image, tiny_policy
from vla_prune import PruneConfig
from vla_prune.engine import attention_probe, runner
from vla_prune.engine.rope import apply_rope
from vla_prune.pruning.base import BatchInputs, PruneInputs, make_pruner
from vla_prune.pruning.scoring import select_tokens
from vla_prune.pruning.select import greedy_maxmin
from vla_prune.pruning.temporal import ActionScoreHistory, smooth_action_batch

# -- the reference: the straightforward code path ------------------------------------------------


def ref_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    k = max(0, min(int(k), scores.shape[0]))
    return torch.sort(scores, descending=True, stable=True).indices[:k].sort().values


def ref_maxmin(embeddings: torch.Tensor, k: int, candidates: torch.Tensor | None = None):
    n = embeddings.shape[0]
    cand = np.arange(n) if candidates is None else np.unique(candidates.cpu().numpy())
    k = max(0, min(int(k), cand.shape[0]))
    if k == 0:
        return torch.empty(0, dtype=torch.long)
    e = embeddings.detach().float().cpu().numpy()[cand]
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    picks = ref_maxmin_on_distances(1.0 - e @ e.T, k)
    return torch.as_tensor(cand[picks], dtype=torch.long).sort().values


def ref_smooth(history: list[torch.Tensor], window: int, gamma: float) -> torch.Tensor | None:
    if len(history) == 0:
        return None
    recent = list(history)[-window:][::-1]
    s = torch.stack([h.float() for h in recent])
    w = torch.tensor(float(gamma)) ** torch.arange(len(recent), dtype=torch.float32)
    return ((w / w.sum())[:, None] * s).sum(dim=0)


def ref_vla_pruner(x: PruneInputs, cfg: PruneConfig):
    n, k = x.num_visual, x.budget
    if k >= n or x.step < cfg.warmup_steps:
        return None
    semantic = x.semantic.float()
    in_sem = torch.zeros(n, dtype=torch.bool)
    in_sem[ref_topk(semantic, k)] = True
    in_act = torch.zeros_like(in_sem)
    action = ref_smooth(x.action_history, cfg.window, cfg.gamma)
    if action is not None:
        in_act[ref_topk(action.float(), k)] = True
    union = torch.nonzero(in_sem | in_act).squeeze(1)
    if union.shape[0] > k:
        union = ref_maxmin(x.embeddings, k, candidates=union)
    origin = in_sem[union].to(torch.int8) * 1 + in_act[union].to(torch.int8) * 2
    return union, origin


def ref_efficientvla(x: PruneInputs, key_tokens: int = 4, ratio: float = 0.5) -> torch.Tensor:
    n, k = x.num_visual, x.budget
    key = min(key_tokens, k)
    rel = int(np.floor(ratio * (k - key) + 0.5))
    div = k - key - rel
    kept = torch.zeros(n, dtype=torch.bool)
    kept[ref_topk(x.semantic.float(), key + rel)] = True
    if div:
        e = x.embeddings.float()
        e = e / e.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        dist = 1.0 - e @ e.T
        if kept.any():
            mind = dist[:, kept].min(dim=1).values
        else:
            nn = dist.clone()
            nn.fill_diagonal_(float("inf"))
            mind = nn.min(dim=1).values
        mind = mind.masked_fill(kept, float("-inf"))
        for _ in range(div):
            j = int(torch.argmax(mind))
            kept[j] = True
            mind = torch.minimum(mind, dist[j])
            mind[j] = float("-inf")
    return torch.nonzero(kept).squeeze(1)


def ref_select(method: str, cfg: PruneConfig, x: PruneInputs):
    if x.budget >= x.num_visual:
        return None, None
    if method == "vla-pruner":
        return ref_vla_pruner(x, cfg) or (None, None)
    if method == "fastv":
        return ref_topk(x.semantic.float(), x.budget), None
    if method == "divprune":
        return ref_maxmin(x.embeddings.float(), x.budget), None
    if method == "efficientvla":
        return ref_efficientvla(x), None
    raise ValueError(method)


def ref_to_visual(attn, cache, layer, num_visual):
    cols, vis = cache.visual_columns(layer)
    out = attn.new_zeros(*attn.shape[:-1], num_visual)
    shape = (*attn.shape[:-1], cols.shape[1])
    picked = attn.gather(-1, cols[:, None, None, :].expand(shape))
    return out.scatter_(-1, vis[:, None, None, :].expand(shape), picked)


def ref_attention_from_queries(q, cache, layer, pos_rows):
    n = cache.length[layer]
    k = cache.k[layer][:, :, :n]
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    key_pos, key_valid, _ = cache.rows(layer)
    newest_only = (
        q.shape[2] == 1 and not cache.has_padding and bool((pos_rows[:, 0] >= key_pos[:, -1]).all())
    )
    if not newest_only:
        allowed = key_pos[:, None, None, :] <= pos_rows[:, None, :, None]
        scores = scores.masked_fill(~(allowed & key_valid[:, None, None]), float("-inf"))
    return torch.softmax(scores.float(), dim=-1)


@torch.inference_mode()
def ref_attention(ctx, layer: int, rows: torch.Tensor) -> torch.Tensor:
    """PrefillContext.attention through the reference probe."""
    engine = ctx.engine
    hidden = ctx.hidden_in[layer]
    rows = rows % hidden.shape[1]
    h = hidden.gather(1, rows[..., None].expand(-1, -1, hidden.shape[-1]))
    pos = ctx.positions_in[layer].gather(1, rows)
    lay = engine.layers[layer]
    b, r, _ = h.shape
    x = lay.input_layernorm(h)
    q = lay.self_attn.q_proj(x).view(b, r, engine.num_heads, -1).transpose(1, 2)
    q = apply_rope(q, *engine.lm.model.rotary_emb(x, pos))
    attn = ref_attention_from_queries(q, engine.cache, layer, pos)
    return ref_to_visual(attn, engine.cache, layer, engine.num_visual)


def ref_select_tokens(ctx, method, cfg, sem_layer, histories, steps):
    """The per-slot select_tokens: (kept [B, k] or None, report)."""
    n = ctx.num_visual
    b, t = ctx.embeds.shape[:2]
    report = {}
    budget = cfg.budget(n)
    if budget >= n:
        return None, report
    needs = make_pruner(cfg).needs
    semantic = None
    if "semantic" in needs:
        rows = torch.full((b, 1), t - 1)
        semantic = ref_attention(ctx, sem_layer, rows).mean(dim=1).mean(dim=1)
    embeddings = ctx.visual_embeddings() if "embeddings" in needs else None
    if "action" in needs:
        smoothed = [ref_smooth(h.as_list(), cfg.window, cfg.gamma) for h in histories]
        if all(s is not None for s in smoothed):
            report["action"] = torch.stack(smoothed)
    kept, origins = [], []
    for i in range(b):
        x = PruneInputs(
            budget=budget,
            num_visual=n,
            semantic=None if semantic is None else semantic[i].float(),
            action_history=histories[i].as_list(),
            embeddings=None if embeddings is None else embeddings[i].float(),
            step=steps[i],
        )
        k, o = ref_select(method, cfg, x)
        kept.append(k)
        origins.append(o)
    if semantic is not None:
        report["semantic"] = semantic
    if all(k is None for k in kept):
        return None, report
    if all(o is not None for o in origins):
        report["origin"] = torch.stack(origins)
    return torch.stack(kept), report


# -- random inputs -------------------------------------------------------------------------------


def random_batch(rng, b: int, n: int, d: int, hist: list[int], ties: bool):
    def draw(*shape):
        a = rng.integers(-2, 3, shape) if ties else rng.standard_normal(shape)
        return torch.tensor(a, dtype=torch.float32)

    semantic = torch.softmax(draw(b, n) * 3, dim=-1) if not ties else draw(b, n).abs()
    histories = [[draw(n).abs() for _ in range(h)] for h in hist]
    return semantic, histories, draw(b, n, d)


CASES = [  # (batch, tokens, embedding dim, budgets)
    (1, 64, 256, [1, 2, 8, 16, 32, 63]),
    (1, 256, 512, [1, 32, 64, 128, 255]),
    (3, 64, 256, [4, 16, 40]),
    (5, 49, 8, [1, 7, 24, 48]),
    (2, 256, 1024, [64]),
]


@pytest.mark.parametrize("method", ["vla-pruner", "fastv", "divprune", "efficientvla"])
@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
def test_select_batch_picks_what_the_reference_picks(method, ties):
    rng = np.random.default_rng(0 if not ties else 1)
    checked = 0
    for b, n, d, budgets in CASES:
        for trial in range(3):
            # windows of different fill, none empty or one empty (warmup=0)
            hist = [3] * b if trial == 0 else list(rng.integers(0 if trial == 2 else 1, 5, b))
            semantic, histories, emb = random_batch(rng, b, n, d, hist, ties)
            for budget in budgets:
                cfg = PruneConfig(method=method, keep_count=budget, warmup=0)
                pruner = make_pruner(cfg)
                xs = [
                    PruneInputs(
                        budget=budget,
                        num_visual=n,
                        semantic=semantic[i],
                        action_history=histories[i],
                        embeddings=emb[i],
                        step=5,
                    )
                    for i in range(b)
                ]
                want = [ref_select(method, cfg, x) for x in xs]
                for i, (k_want, _) in enumerate(want):  # the per-slot entry point
                    assert torch.equal(pruner.select(xs[i]), k_want), (method, b, n, budget, i)
                checked += 1
                if not hasattr(pruner, "select_batch"):
                    continue
                # the batched call, as select_tokens makes it
                action, has = smooth_action_batch(histories, cfg.window, cfg.gamma)
                got = pruner.select_batch(
                    BatchInputs(
                        budget=budget,
                        num_visual=n,
                        steps=[5] * b,
                        semantic=semantic,
                        action=action,
                        has_action=has,
                        embeddings=emb,
                    )
                )
                for i, (k_want, o_want) in enumerate(want):
                    assert torch.equal(got[0][i], k_want), (method, b, n, budget, i)
                    if o_want is not None:
                        assert torch.equal(got[1][i], o_want), (method, b, n, budget, i)
    assert checked == 3 * sum(len(c[3]) for c in CASES)


def test_batched_maxmin_equals_one_slot_loops():
    """Padding slots of different sizes to one matrix changes no pick (ties included)."""
    rng = np.random.default_rng(2)
    for ties in (False, True):
        for _ in range(20):
            sizes = rng.integers(2, 40, 4)
            k = int(rng.integers(1, sizes.min() + 1))
            dists = []
            for m in sizes:
                e = rng.integers(-1, 2, (m, 3)) if ties else rng.standard_normal((m, 6))
                e = e.astype(np.float32)
                e /= np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
                dists.append(1.0 - e @ e.T)
            batched = greedy_maxmin([d.copy() for d in dists], k)
            for row, d in zip(batched, dists):
                assert row.tolist() == greedy_maxmin([d.copy()], k)[0].tolist()
                want = ref_maxmin_on_distances(d, k)
                assert row.tolist() == want


def ref_maxmin_on_distances(d: np.ndarray, k: int) -> list[int]:
    nn = d.copy()
    np.fill_diagonal(nn, np.inf)
    picks = [int(np.argmax(nn.min(axis=1)))]
    mind = d[picks[0]].copy()
    mind[picks[0]] = -np.inf
    for _ in range(k - 1):
        j = int(np.argmax(mind))
        picks.append(j)
        np.minimum(mind, d[j], out=mind)
        mind[j] = -np.inf
    return picks


def test_batched_smoothing_is_bit_identical():
    rng = np.random.default_rng(3)
    for b in (1, 2, 7):
        for fill in ([3] * b, list(rng.integers(0, 6, b))):
            hists = []
            for h in fill:
                buf = ActionScoreHistory(3)
                for _ in range(h):
                    buf.push(torch.tensor(rng.random(64), dtype=torch.float32))
                hists.append(buf.as_list())
            got, has = smooth_action_batch(hists, 3, 0.8)
            for i, h in enumerate(hists):
                want = ref_smooth(h, 3, 0.8)
                assert has[i] == (want is not None)
                if want is not None:
                    assert torch.equal(got[i], want)


# -- through the engine: scores bit for bit, same selections -------------------------------------


def in_hook(policy, instructions, check, cfg: PruneConfig | None = None) -> None:
    """Run one step of `policy` on `instructions`, calling check(ctx) at its pruning point
    (then keeping every token)."""
    policy.configure(prune=cfg or PruneConfig(method="fastv", keep_count=64))
    calls = []

    def hook(ctx, sem_layer, report):
        check(ctx)
        calls.append(1)

    policy._select = hook
    try:
        images = [random_image(40 + i, policy.config.image_size) for i in range(len(instructions))]
        policy.step_batch(images, instructions)
    finally:
        del policy._select
    assert calls


INSTRUCTIONS = {
    "one": ["pick up the red block"],
    "padded-batch": ["pick up the red block", "press the yellow button now please"],
    "batch": ["pick up the red block", "pick up the blue cube"],  # same length: no padding
}


@pytest.mark.parametrize("instructions", list(INSTRUCTIONS))
@pytest.mark.parametrize("method", ["vla-pruner", "fastv", "divprune", "efficientvla"])
def test_select_tokens_matches_the_reference_through_the_engine(instructions, method):
    policy = tiny_policy(21)
    n, b = policy.config.num_patches, len(INSTRUCTIONS[instructions])
    sem_layer = PruneConfig().resolve_layers(policy.config.num_layers)[1]
    rng = np.random.default_rng(4)

    def check(ctx):
        assert bool(ctx.pad.any()) == (instructions == "padded-batch")
        for budget in (8, 64, 200):
            cfg = PruneConfig(method=method, keep_count=budget, warmup=0)
            histories = []
            for i in range(b):
                h = ActionScoreHistory(cfg.window)
                for _ in range(i + 2):
                    h.push(torch.softmax(torch.tensor(rng.standard_normal(n)).float(), 0))
                histories.append(h)
            steps = [5] * b
            want, want_report = ref_select_tokens(ctx, method, cfg, sem_layer, histories, steps)
            report: dict = {}
            rngs = [np.random.default_rng(i) for i in range(b)]
            pruner = make_pruner(cfg)
            got = select_tokens(ctx, pruner, cfg, sem_layer, histories, rngs, steps, report)
            assert torch.equal(got, want), (method, budget)
            assert report.keys() == want_report.keys()
            for key in report:
                assert torch.equal(report[key], want_report[key]), key

    in_hook(policy, INSTRUCTIONS[instructions], check)


def test_probes_bit_identical_to_the_reference(monkeypatch):
    """Prefill probes (several rows, padding) and decode probes after pruning."""
    policy = tiny_policy(22)

    def check(ctx):
        b, t = ctx.embeds.shape[:2]
        for rows in ([[t - 1], [t - 1]], [[t - 1, t - 5, 3, 100], [t - 2, 0, 7, 250]]):
            rows = torch.tensor(rows)[:b]
            for layer in (0, 1):
                assert torch.equal(ctx.attention(layer, rows), ref_attention(ctx, layer, rows))

    policy._record_layers = lambda s, a: (0, 1)
    cfg = PruneConfig(method="fastv", keep_count=64, layer=2)
    in_hook(policy, INSTRUCTIONS["padded-batch"], check, cfg)
    in_hook(policy, INSTRUCTIONS["one"], check, cfg)
    del policy._record_layers

    seen = []

    def spy(q, cache, i, pos):
        attn = attention_probe.attention_from_queries(q, cache, i, pos)
        want = ref_to_visual(ref_attention_from_queries(q, cache, i, pos), cache, i, 256)
        seen.append(torch.equal(attention_probe.to_visual(attn, cache, i, 256), want))
        return attn

    monkeypatch.setattr(runner, "attention_from_queries", spy)
    # one sample and an unpadded batch: the cache's slice layout; padding: the column search
    for instructions in INSTRUCTIONS.values():
        policy.configure(prune=PruneConfig(method="vla-pruner", keep_count=40, warmup=0))
        images = [random_image(50 + i) for i in range(len(instructions))]
        for _ in range(2):
            policy.step_batch(images, instructions)
    assert len(seen) == 3 * 2 * 6 and all(seen)

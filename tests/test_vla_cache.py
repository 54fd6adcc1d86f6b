"""VLA-Cache in our engine: reused visual rows keep the previous step's K/V (engine/reuse.py),
the method around it (pruning/vla_cache.py), its run specs, FLOPs and CogACT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import vla_prune
from tests.conftest import INSTRUCTIONS, random_image, tiny_cogact, tiny_policy
from tests.test_engine_exact import assert_logits_close
from vla_prune import PruneConfig
from vla_prune.config import VLACacheConfig
from vla_prune.engine.flops import step_flops
from vla_prune.engine.reuse import ReusePlan
from vla_prune.pruning.vla_cache import layer_counts, layer_fractions, reusable_tokens

REPO = Path(__file__).resolve().parents[1]

# Exactness bound: assert_logits_close (tests/test_engine_exact.py, 64 ulp of the largest logit).
# With identical inputs a reused row's K/V are the very values the dense step would compute, so
# what differs is only the order of fp32 reductions: the recomputed rows go through GEMMs over
# fewer rows and SDPA with an explicit mask instead of is_causal — the same kind of reordering
# that bound was sized for (engine vs transformers), over the same layers.


def _inputs(policy, images, instructions):
    """(embeds [B, T, D], left padding [B]) exactly as Policy.step_batch builds them."""
    inputs = [policy.prepare(im, ins) for im, ins in zip(images, instructions)]
    with torch.no_grad():
        pixels = torch.cat([x["pixel_values"] for x in inputs])
        patches = policy.model.projector(policy.model.vision_backbone(pixels))
        return policy._embed(patches, [x["input_ids"][0] for x in inputs])


def _run(engine, embeds, pad, reuse=None, k=None, hook=None):
    """Prefill + greedy decode: (PrefillResult, logits [B, 7, V])."""
    pre = engine.prefill(embeds, pad, 7, prune_layer=k, prune_hook=hook, reuse=reuse)
    logits, tok = [pre.output], pre.output.argmax(-1)
    for _ in range(6):
        lg = engine.decode(tok).logits
        logits.append(lg)
        tok = lg.argmax(-1)
    return pre, torch.stack(logits, 1)


def _all_visual(pre, b, n, layers, first=0):
    counts = torch.zeros(b, layers, dtype=torch.long)
    counts[:, first:] = n
    return ReusePlan([torch.arange(n) for _ in range(b)], counts, pre.stamp)


@pytest.mark.parametrize(
    "static, compile",
    [(False, False), (True, False), pytest.param(True, True, marks=pytest.mark.slow)],
    ids=["eager", "static-engine", "compiled"],
)
def test_every_visual_row_reused_equals_dense(static, compile):
    """compiled: the reused layers run prefill_rows_layer's compiled halves (dynamic rows)."""
    policy = tiny_policy(0)
    engine = policy.engine
    engine.use_static_decode(static, compile=compile)
    n, layers = engine.num_visual, len(engine.layers)
    embeds, pad = _inputs(policy, [random_image(0)], [INSTRUCTIONS[0]])
    first, dense = _run(engine, embeds, pad)
    pre, got = _run(engine, embeds, pad, reuse=_all_visual(first, 1, n, layers))
    assert pre.reused.tolist() == [[n] * layers]  # every visual row of every layer reused
    assert_logits_close(got, dense)
    assert (engine.rows_halves() is not None) == compile
    # nothing reused -> the dense path itself, bit for bit (an empty plan, a stale stamp)
    _, again = _run(engine, embeds, pad, reuse=_all_visual(first, 1, 0, layers))
    assert torch.equal(again, dense)
    pre, again = _run(engine, embeds, pad, reuse=_all_visual(first, 1, n, layers))  # stale
    assert pre.reused is None and torch.equal(again, dense)


def test_per_slot_reuse_follows_rows_that_moved():
    """Two slots, instructions swapped between steps (so each slot's left padding and rows
    move), each slot its own tokens and counts: the old K/V follow their tokens."""
    policy = tiny_policy(1)
    engine = policy.engine
    n, layers = engine.num_visual, len(engine.layers)
    images = [random_image(1), random_image(2)]
    long, short = INSTRUCTIONS[3], INSTRUCTIONS[0]
    first, _ = _run(engine, *_inputs(policy, images, [long, short]))
    embeds, pad = _inputs(policy, images, [short, long])
    assert pad.tolist() != first.context.pad.tolist()
    _, dense = _run(engine, embeds, pad)
    first, _ = _run(engine, *_inputs(policy, images, [long, short]))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    counts = torch.tensor([[n] * layers, [0, 10, 50, 40]])  # made non-decreasing: 40 -> 50
    plan = ReusePlan([torch.arange(n), order], counts, first.stamp)
    pre, got = _run(engine, embeds, pad, reuse=plan)
    assert pre.reused.tolist() == [[n] * layers, [0, 10, 50, 50]]
    assert_logits_close(got, dense)


def test_reuse_after_the_pruning_point_maps_kept_tokens_to_their_rows():
    """Layers from K on hold the kept tokens only; with moved rows (padding swapped) the
    kept tokens' old K/V are found by token, not by row."""
    policy = tiny_policy(2)
    engine = policy.engine
    n, layers, k = engine.num_visual, len(engine.layers), 2
    kept = torch.arange(0, n, 4)

    def hook(ctx):
        return kept[None].expand(ctx.embeds.shape[0], -1)

    images = [random_image(3), random_image(4)]
    long, short = INSTRUCTIONS[1], INSTRUCTIONS[2]
    embeds, pad = _inputs(policy, images, [short, long])
    _, dense = _run(engine, embeds, pad, k=k, hook=hook)
    first, _ = _run(engine, *_inputs(policy, images, [long, short]), k=k, hook=hook)
    pre, got = _run(engine, embeds, pad, _all_visual(first, 2, n, layers, first=k), k, hook)
    assert pre.reused.tolist() == [[0] * k + [len(kept)] * (layers - k)] * 2
    assert_logits_close(got, dense)


def _steps(policy, frames, instruction=INSTRUCTIONS[0]):
    return [policy.step(f, instruction) for f in frames]


def test_policy_on_a_static_scene_reuses_and_keeps_the_dense_actions():
    frames = [random_image(5)] * 4
    dense = _steps(tiny_policy(3), frames)
    cached = tiny_policy(3).configure(prune=PruneConfig(method="vla-cache"))
    got = _steps(cached, frames)
    assert got[0].extra["reused_rows"].sum() == 0  # nothing to reuse at the first step
    for d, g in zip(dense, got):
        assert (d.action_tokens == g.action_tokens).all()
    for g in got[1:]:
        rows = g.extra["reused_rows"]
        most = round(VLACacheConfig().max_reused * 256)
        assert rows[0] == 0 and 0 < rows[1] <= most and (np.diff(rows) >= 0).all()
        assert g.extra["reuse_flops_saved"] > 0 and 0 < g.extra["reused_fraction"] < 1
        assert g.kept_visual_tokens == 256


def test_no_reuse_is_dense_bit_for_bit():
    """max_reused=0: the method runs (frames, probes, plans) but reuses nothing."""
    frames = [random_image(6)] * 3
    dense = _steps(tiny_policy(4), frames)
    off = tiny_policy(4).configure(
        prune=PruneConfig(method="vla-cache", vla_cache=VLACacheConfig(max_reused=0.0))
    )
    for d, g in zip(dense, _steps(off, frames)):
        assert np.array_equal(d.normalized_actions, g.normalized_actions)
        assert g.extra["reused_rows"].sum() == 0 and g.extra["reuse_flops_saved"] == 0


def test_reuse_never_crosses_reset():
    policy = tiny_policy(5).configure(prune=PruneConfig(method="vla-cache"))
    frame = random_image(7)
    assert _steps(policy, [frame] * 2)[1].extra["reused_rows"].sum() > 0
    policy.reset()
    assert policy.step(frame, INSTRUCTIONS[0]).extra["reused_rows"].sum() == 0
    policy.step_batch([frame, frame], INSTRUCTIONS[:2])
    policy.reset_slot(1)
    a, b = policy.step_batch([frame, frame], INSTRUCTIONS[:2])
    assert a.extra["reused_rows"].sum() > 0 and b.extra["reused_rows"].sum() == 0


def test_entropy_schedule_is_recomputed_every_n_steps_and_after_reset(monkeypatch):
    """schedule_every=3: the per-layer entropy probe runs at steps 0, 3, 6 of an episode, and
    at the first step after reset(); the steps between reuse the last schedule."""
    from vla_prune.pruning import vla_cache

    calls = []
    real = vla_cache.layer_entropies

    def spy(ctx, layers):
        calls.append(step[0])
        return real(ctx, layers)

    monkeypatch.setattr(vla_cache, "layer_entropies", spy)
    cfg = VLACacheConfig(schedule_every=3)
    policy = tiny_policy(5).configure(prune=PruneConfig(method="vla-cache", vla_cache=cfg))
    frame, step = random_image(7), [0]
    fractions = []
    for t in range(7):
        step[0] = t
        policy.step(frame, INSTRUCTIONS[0])
        fractions.append(policy._reuse[0].fractions.copy())
    assert calls == [0, 3, 6]
    assert all(np.array_equal(fractions[t], fractions[0]) for t in (1, 2))
    policy.reset()
    step[0] = 100
    policy.step(frame, INSTRUCTIONS[0])
    assert calls == [0, 3, 6, 100]


def test_batch_slots_keep_their_own_reuse():
    """Slot 0 sees a static scene, slot 1 a new frame every step: slot 1 recomputes every
    row, slot 0 reuses, and each equals the same slot run alone."""
    static = [random_image(8)] * 3
    moving = [random_image(20 + s) for s in range(3)]
    method = PruneConfig(method="vla-cache")
    both = tiny_policy(6).configure(prune=method)
    alone = [tiny_policy(6).configure(prune=method) for _ in range(2)]
    for s in range(3):
        pair = both.step_batch([static[s], moving[s]], [INSTRUCTIONS[0]] * 2)
        solo = [
            alone[0].step(static[s], INSTRUCTIONS[0]),
            alone[1].step(moving[s], INSTRUCTIONS[0]),
        ]
        assert pair[1].extra["reused_rows"].sum() == 0
        assert (pair[0].extra["reused_rows"] > 0).any() == (s > 0)
        for p, o in zip(pair, solo):
            assert (p.extra["reused_rows"] == o.extra["reused_rows"]).all()
            assert (p.action_tokens == o.action_tokens).all()


def test_vla_pruner_with_vla_cache_reuses_static_kept_tokens_from_layer_k():
    policy = tiny_policy(7).configure(
        prune=PruneConfig(method="vla-pruner+vla-cache", keep_ratio=0.25, layer=2)
    )
    results = _steps(policy, [random_image(9)] * 6)
    warm = policy.prune_config.warmup_steps
    pruned = results[warm + 1 :]  # pruned at this step and the one before
    assert all(r.kept_visual_tokens == 64 for r in pruned)
    for r in pruned:
        rows = r.extra["reused_rows"]
        assert rows[:2].sum() == 0  # the layers before K compute every row
        assert (rows[2:] <= 64).all()
    assert any(r.extra["reused_rows"].sum() > 0 for r in pruned)


def test_flops_with_reuse_match_the_counter():
    """As tests/test_flops.py: FlopCounterMode counts no CPU SDPA, so the attention term is
    subtracted by hand; everything else must match step_flops(reused=...) exactly."""
    policy = tiny_policy(0)
    cfg, engine = policy.config, policy.engine
    n, layers, d = cfg.num_patches, cfg.num_layers, cfg.llm_dim
    embeds, pad = _inputs(policy, [random_image(0)], [INSTRUCTIONS[0]])
    n_text = embeds.shape[1] - n
    t = embeds.shape[1]
    counts = torch.tensor([[0, 40, 100, 256]])
    first = engine.prefill(embeds, pad, 7)
    plan = ReusePlan(
        [torch.randperm(n, generator=torch.Generator().manual_seed(1))], counts, first.stamp
    )
    with FlopCounterMode(display=False) as fc:
        pre = engine.prefill(embeds, pad, 7, reuse=plan)
    reused = pre.reused[0].tolist()
    f = step_flops(cfg, n_text, reused=reused)
    head = f.lm_head // cfg.action_dim
    attn = sum(4 * d * (t - r) * t for r in reused)
    assert fc.get_total_flops() == f.stages["prefill"] + head - attn
    assert f.stages["prefill"] < step_flops(cfg, n_text).stages["prefill"]
    assert layers == len(reused)


def test_cogact_reuses_and_keeps_its_chunk():
    """CogACT's prefill is the same Llama: identical frames -> the dense chunk (round-off),
    eager and with the compiled prefill (reuse layers fall back to eager rows)."""
    frames = [random_image(10)] * 3
    dense = _steps(tiny_cogact(0), frames)
    for engine in (vla_prune.EngineConfig(), vla_prune.EngineConfig(compile=True)):
        cached = tiny_cogact(0).configure(prune=PruneConfig(method="vla-cache"), engine=engine)
        got = _steps(cached, frames)
        assert got[-1].extra["reused_rows"].sum() > 0
        for d, g in zip(dense, got):
            np.testing.assert_allclose(g.normalized_actions, d.normalized_actions, atol=1e-4)


def test_method_pieces_follow_upstream():
    sim = np.array([1.0, 0.999, 0.9, 0.997, 1.0, 0.995, 0.9999, 1.0])
    cfg = VLACacheConfig(max_reused=0.5, relevance_top_k=0.25)  # 4 reused at most, 2 relevant
    relevance = np.array([0, 0, 0, 0, 9, 0, 0, 8.0])
    assert reusable_tokens(sim, None, cfg).tolist() == [0, 4, 6, 7]  # top 4 by similarity
    assert reusable_tokens(sim, relevance, cfg).tolist() == [0, 6]  # minus the 2 most attended
    # after a pruning point: only tokens kept last step, counts scaled to them (2 and 1 of 3)
    assert reusable_tokens(sim, relevance, cfg, held=np.array([1, 3, 4])).tolist() == [1]
    f = layer_fractions(np.array([2.0, 1.0, np.nan, 0.0]), damping=0.5)
    assert np.allclose(f, [0.0, 0.25, 0.0, 0.625], atol=1e-6)  # upward steps halved
    assert layer_counts(f, 8, (1, 3)).tolist() == [0, 2, 2, 5]
    assert layer_counts(f, 8, (1, 3), first=2).tolist() == [0, 0, 2, 5]  # from layer K on


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: VLACacheConfig(similarity_threshold=1.5), r"\[-1, 1\]"),
        (lambda: VLACacheConfig(max_reused=-0.1), "max_reused"),
        (lambda: VLACacheConfig(relevance_top_k=2), "relevance_top_k"),
        (lambda: VLACacheConfig(entropy_damping=-1), "entropy_damping"),
        (lambda: VLACacheConfig(layers=(1, -2)), "layers"),
        (lambda: VLACacheConfig(schedule_every=0), "schedule_every"),
        (lambda: VLACacheConfig(schedule_every=True), "schedule_every"),
        (lambda: PruneConfig(method="vla-cache", vla_cache={"foo": 1}), "unknown keys"),
        (lambda: ReusePlan([torch.arange(3)], torch.tensor([[-1, 2]]), None), ">= 0"),
        (lambda: ReusePlan([torch.arange(3)], torch.zeros(2, 4), None), "one row per slot"),
    ],
)
def test_bad_parameters_say_what_is_wrong(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_policy_settings_say_what_is_wrong():
    policy = tiny_policy(0)
    with pytest.raises(ValueError, match="keeps every token"):
        policy.configure(prune=PruneConfig(method="vla-cache", keep_ratio=0.25))
    with pytest.raises(ValueError, match="out of range"):
        policy.configure(prune=PruneConfig(method="vla-cache", vla_cache={"layers": (9,)}))
    with pytest.raises(ValueError, match="unknown pruning method 'magic\\+vla-cache'"):
        policy.configure(prune=PruneConfig(method="magic+vla-cache", keep_ratio=0.25))
    assert policy.prune_config.method == "none"  # nothing changed


def test_specs_presets_and_eval_configs():
    from ros_nodes.params import accel_spec
    from sim.eval.config import load_eval_config, parse_runs
    from vla_prune.config import load_yaml
    from vla_prune.runspec import parse_run_spec

    s = parse_run_spec("vla-pruner+vla-cache@0.25")
    assert (s.prune.method, s.prune.keep_ratio) == ("vla-pruner+vla-cache", 0.25)
    assert parse_run_spec("vla-pruner@0.25+vla-cache").prune == s.prune
    assert accel_spec("vla-pruner+vla-cache@0.25").prune == s.prune
    assert parse_runs("vla-pruner+vla-cache@0.25")[0].prune == s.prune
    tuned = parse_run_spec("vla-cache[similarity_threshold=0.99,max_reused=0.25]+compile")
    assert tuned.prune.method == "vla-cache" and tuned.compile
    assert tuned.prune.cache_config == VLACacheConfig(similarity_threshold=0.99, max_reused=0.25)
    preset = load_yaml(PruneConfig, REPO / "configs/pruning/vla-cache.yaml")
    assert preset.method == "vla-cache" and preset.cache_config == VLACacheConfig()
    assert parse_run_spec(str(REPO / "configs/pruning/vla-cache.yaml")).prune == preset
    sweep = load_eval_config(REPO / "configs/eval/vla-cache-sweep.yaml")
    labels = [r.label for r in sweep.runs]
    for keep in ("0.5", "0.25", "0.125"):
        assert f"vla-pruner+vla-cache@{keep}" in labels and f"vla-pruner@{keep}" in labels
    assert "vla-cache" in labels and "dense" in labels
    for bad, match in [
        ("vla-cache@0.25", "keeps the tokens of the method"),
        ("vla-cache[similarity_threshold=2]", r"\[-1, 1\]"),
        ("vla-cache[foo=1]", "unknown keys"),
        ("vla-cache[max_reused]", "key=value"),
        ("vla-cache+vla-cache", "twice"),
    ]:
        with pytest.raises(ValueError, match=match):
            parse_run_spec(bad)

"""Pruning on CogACT (keep-all exactness, the cognition-token action score) and EfficientVLA's
token selection (hand-computed cases, properties, both policies)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import random_image, tiny_cogact, tiny_policy
from vla_prune import PruneConfig
from vla_prune.caching import CacheConfig
from vla_prune.config import load_yaml
from vla_prune.pruning.base import PruneInputs, available, make_pruner
from vla_prune.pruning.efficientvla import EfficientVLA
from vla_prune.pruning.select import topk_indices

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "pruning"
INSTRUCTION = "push the blue cube onto the green pad"


@pytest.fixture(scope="module")
def policy():
    return tiny_cogact(9)


def run(policy, n: int = 4, seed: int = 30):
    policy.reset()
    return [policy.step(random_image(seed + t), INSTRUCTION) for t in range(n)]


# -- pruning on CogACT ----------------------------------------------------------------------------


def test_keep_all_equals_dense_for_every_method(policy):
    policy.configure(prune=PruneConfig(), cache=CacheConfig())
    dense = run(policy)
    methods = available()
    assert "efficientvla" in methods
    for method in methods:
        if method == "fixed":
            cfg = PruneConfig(method="fixed", indices=tuple(range(256)))
        else:
            cfg = PruneConfig(method=method, keep_ratio=1.0)
        policy.configure(prune=cfg)
        for d, r in zip(dense, run(policy)):
            assert r.kept_visual_tokens == 256, method
            np.testing.assert_array_equal(r.actions, d.actions, err_msg=method)
            np.testing.assert_array_equal(r.normalized_actions, d.normalized_actions)
    policy.configure(prune=PruneConfig())


def test_fixed_indices_run_with_the_same_shapes(policy):
    kept = tuple(range(0, 256, 5))
    policy.configure(prune=PruneConfig(method="fixed", indices=kept))
    try:
        results = run(policy, n=2)
    finally:
        policy.configure(prune=PruneConfig())
    for r in results:
        assert r.actions.shape == (16, 7) and r.normalized_actions.shape == (16, 7)
        assert r.kept_visual_tokens == len(kept)
        np.testing.assert_array_equal(r.kept_indices, kept)
        assert np.isfinite(r.actions).all()


def cognition_attention(policy, image, kept, act_layer):
    """The cognition token's head-averaged attention to the visual tokens at act_layer,
    recomputed through the engine directly."""
    inputs = policy.prepare(image, INSTRUCTION)
    with torch.no_grad():
        embeds = policy.model.embed_inputs(inputs["pixel_values"], inputs["input_ids"])
    k_layer = policy.prune_config.resolve_layers(policy.config.num_layers)[0]
    hook = None if kept is None else (lambda ctx: torch.as_tensor(kept)[None])
    ctx = policy.engine.prefill(
        embeds, torch.zeros(1, dtype=torch.long), 0, k_layer, hook, (act_layer,), output="hidden"
    ).context
    rows = torch.tensor([[-1]])
    return ctx.attention(act_layer, rows).mean(dim=1)[0, 0].numpy()


def test_vla_pruner_action_score_is_cognition_attention_at_the_action_layer(policy):
    cfg = PruneConfig(method="vla-pruner", keep_ratio=0.25)
    policy.configure(prune=cfg)
    try:
        results = run(policy, n=5, seed=40)
    finally:
        policy.configure(prune=PruneConfig())
    _, _, act_layer = cfg.resolve_layers(policy.config.num_layers)
    assert [r.kept_visual_tokens for r in results] == [256] * 3 + [64] * 2  # warm-up: window 3
    for t, r in enumerate(results):
        assert r.action_scores.shape == (256,)
        again = cognition_attention(policy, random_image(40 + t), r.kept_indices, act_layer)
        np.testing.assert_allclose(r.action_scores, again, atol=1e-7)
        if r.kept_indices is not None:
            dropped = np.setdiff1d(np.arange(256), r.kept_indices)
            assert (r.action_scores[dropped] == 0).all()
            assert r.smoothed_action_scores is not None
        assert r.actions.shape == (16, 7)


def test_action_layer_recorded_only_when_needed(policy):
    policy.configure(prune=PruneConfig(method="fastv", keep_ratio=0.5))
    assert policy._record_layers(0, 2) == (0,)
    policy.configure(prune=PruneConfig(method="vla-pruner", keep_ratio=0.5))
    assert policy._record_layers(0, 2) == (0, 2)
    policy.configure(prune=PruneConfig())
    assert policy._record_layers(0, 2) == ()
    assert run(policy, n=1)[0].action_scores is None


# -- EfficientVLA's selection ---------------------------------------------------------------------

# idx: 0 E, 1 E (longer), 2 N, 3 NE, 4 W, 5 E (longer), 6 S, 7 N (longer)
EMB = torch.tensor(
    [[1, 0], [2, 0], [0, 1], [1, 1], [-1, 0], [3, 0], [0, -1], [0, 2]], dtype=torch.float32
)
SEM = torch.tensor([0.30, 0.25, 0.05, 0.20, 0.01, 0.15, 0.02, 0.02])


def select(budget, **kw):
    x = PruneInputs(budget=budget, num_visual=8, grid=(1, 8), semantic=SEM, embeddings=EMB)
    return EfficientVLA(PruneConfig(method="efficientvla"), **kw).select(x).tolist()


def test_efficientvla_hand_computed():
    # budget 5, 2 anchors, ratio 0.5: key 2 (0, 1), relevance 2 (3, 5), diversity 1.
    # Distance of the rest to {E, E, NE, E}: N 0.29, W 1.71, S 1.0, N 0.29 -> W (4).
    assert select(5, key_tokens=2) == [0, 1, 3, 4, 5]
    # budget 6: diversity 2 -> W, then S (min distance 1 vs N's 0.29).
    assert select(6, key_tokens=2) == [0, 1, 3, 4, 5, 6]
    # budget 7: relevance 3 (2.5 rounds up) adds N (2); then W and S tie at 1 -> lower index 4,
    # then S (6) over N (7, distance 0 to N).
    assert select(7, key_tokens=2) == [0, 1, 2, 3, 4, 5, 6]
    # defaults (4 anchors, ratio 0.5), budget 6: key 4, relevance 1, diversity 1 -> W.
    assert select(6) == [0, 1, 2, 3, 4, 5]
    # a budget below the anchor count keeps the top-k by relevance
    assert select(3) == [0, 1, 3]
    # ratio 0: anchors + diversity only; ratio 1: pure relevance (top-k)
    assert select(4, key_tokens=1, relevance_ratio=0.0) == [0, 2, 4, 6]
    assert select(4, key_tokens=1, relevance_ratio=1.0) == [0, 1, 3, 5]
    assert EfficientVLA(PruneConfig()).split(56) == (4, 26, 26)


def test_efficientvla_errors_and_keep_all():
    p = make_pruner(PruneConfig(method="efficientvla", keep_count=4))
    assert p.select(PruneInputs(budget=8, num_visual=8, semantic=SEM, embeddings=EMB)) is None
    with pytest.raises(ValueError, match="semantic"):
        p.select(PruneInputs(budget=4, num_visual=8, embeddings=EMB))
    with pytest.raises(ValueError, match="embeddings"):
        p.select(PruneInputs(budget=4, num_visual=8, semantic=SEM))
    with pytest.raises(ValueError):
        EfficientVLA(PruneConfig(), relevance_ratio=1.5)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(2, 40),
    data=st.data(),
    key=st.integers(0, 8),
    ratio=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_efficientvla_properties(n, data, key, ratio, seed):
    budget = data.draw(st.integers(1, n - 1))
    g = torch.Generator().manual_seed(seed)
    sem = torch.randint(0, 4, (n,), generator=g).float()  # many ties
    emb = torch.randint(-2, 3, (n, 3), generator=g).float()  # duplicates and zero vectors
    x = PruneInputs(budget=budget, num_visual=n, grid=(1, n), semantic=sem, embeddings=emb)
    pruner = EfficientVLA(PruneConfig(method="efficientvla"), key_tokens=key, relevance_ratio=ratio)
    kept = pruner.select(x)
    assert kept.dtype == torch.long and kept.shape == (budget,)
    assert torch.equal(kept, kept.unique())  # sorted, unique
    assert 0 <= int(kept.min()) and int(kept.max()) < n
    k, r, _ = pruner.split(budget)
    assert set(topk_indices(sem, k + r).tolist()) <= set(kept.tolist())
    assert torch.equal(kept, pruner.select(x))  # deterministic


def test_efficientvla_yaml_and_both_policies(policy):
    cfg = load_yaml(PruneConfig, CONFIGS / "efficientvla.yaml")
    assert (cfg.method, cfg.budget(256), cfg.semantic_query) == ("efficientvla", 56, "text-mean")
    for p in (tiny_policy(2), policy):
        p.configure(prune=cfg)
        try:
            r = p.step(random_image(50), INSTRUCTION)
        finally:
            p.configure(prune=PruneConfig())
        assert r.kept_visual_tokens == 56 and len(np.unique(r.kept_indices)) == 56
        top4 = topk_indices(torch.as_tensor(r.semantic_scores), 4).numpy()
        assert set(top4) <= set(r.kept_indices)


def test_configure_passes_layer_skipping_through_and_is_all_or_nothing(policy):
    policy.configure(skip_layers=[1])
    try:
        assert policy.engine.skip_layers == frozenset({1})
        assert run(policy, n=1)[0].actions.shape == (16, 7)
    finally:
        policy.configure(skip_layers=())
    with pytest.raises(ValueError):  # a bad prune config: the cache setting is not applied
        policy.configure(prune=PruneConfig(method="nope"), cache=CacheConfig(enabled=True))
    assert policy.cache_config == CacheConfig()
    with pytest.raises(TypeError):
        policy.configure(cache=5)

"""Pruning inside the policy: temporal history, keep-all exactness, reports."""

import numpy as np
import pytest
import torch

from tests.conftest import random_image, tiny_policy
from vla_prune import PruneConfig
from vla_prune.pruning.base import available


class Recorder:
    """Wraps a pruner and keeps a copy of every PruneInputs it receives."""

    def __init__(self, inner):
        self.inner, self.name, self.needs = inner, inner.name, inner.needs
        self.seen = []

    def select_with_origin(self, x):
        self.seen.append(x)
        return self.inner.select_with_origin(x)


def replay_action_scores(policy, image, instruction, kept, act_layer):
    """The action-level score of one step recomputed through the engine: probe attention of each
    decode query at act_layer, averaged over heads and decode steps."""
    inputs = policy.prepare(image, instruction)
    with torch.no_grad():
        embeds = policy.model.embed_inputs(inputs["pixel_values"], inputs["input_ids"])
    engine = policy.engine
    k_layer = policy.prune_config.resolve_layers(policy.config.num_layers)[0]
    hook = None if kept is None else (lambda ctx: torch.as_tensor(kept)[None])
    logits = engine.prefill(embeds, torch.zeros(1, dtype=torch.long), 7, k_layer, hook).output
    probes = []
    tok = logits.argmax(-1)
    for _ in range(6):
        step = engine.decode(tok, act_layer)
        logits, probe = step.logits, step.probe
        probes.append(probe.mean(dim=1))
        tok = logits.argmax(-1)
    return torch.stack(probes).mean(0)[0].numpy()


def test_history_equals_recorded_action_attention_over_10_steps():
    policy = tiny_policy(8)
    cfg = PruneConfig(method="vla-pruner", keep_ratio=0.25)
    policy.configure(prune=cfg)
    recorder = Recorder(policy._pruner)
    policy._pruner = recorder
    _, _, act_layer = cfg.resolve_layers(policy.config.num_layers)
    results, frames = [], []
    for t in range(10):
        image, instruction = random_image(100 + t), "push the blue cube onto the green pad"
        results.append(policy.step(image, instruction))
        frames.append((image, instruction))
    assert len(recorder.seen) == 10
    for t, x in enumerate(recorder.seen):
        assert x.step == t
        expected = [r.action_scores for r in results[max(0, t - 3) : t]]
        assert len(x.action_history) == len(expected)
        for got, want in zip(x.action_history, expected):
            np.testing.assert_array_equal(got.numpy(), want)
    # warm-up: the first 3 steps keep everything, then exactly the budget
    assert [r.kept_visual_tokens for r in results] == [256] * 3 + [64] * 7
    # each recorded score is the probe's decode-query attention at the action layer;
    # pruned tokens count 0
    for (image, instruction), r in zip(frames, results):
        again = replay_action_scores(policy, image, instruction, r.kept_indices, act_layer)
        np.testing.assert_allclose(r.action_scores, again, atol=1e-7)
        if r.kept_indices is not None:
            dropped = np.setdiff1d(np.arange(256), r.kept_indices)
            assert (r.action_scores[dropped] == 0).all()
    # the report labels kept tokens by origin
    last = results[-1]
    assert last.origin.shape == last.kept_indices.shape and set(last.origin) <= {1, 2, 3}
    assert last.smoothed_action_scores is not None and last.semantic_scores is not None
    policy.reset()
    policy.step(*frames[0])
    assert recorder.seen[-1].step == 0 and recorder.seen[-1].action_history == []


@pytest.mark.parametrize("method", sorted(set(available()) - {"fixed", "none"}))
def test_keep_all_is_exactly_dense(method):
    policy = tiny_policy(9)
    images = [random_image(200 + t) for t in range(3)]
    instruction = "pick up the red block"
    dense = [policy.step(im, instruction) for im in images]
    policy.configure(prune=PruneConfig(method=method, keep_ratio=1.0, warmup=0))
    pruned = [policy.step(im, instruction) for im in images]
    for a, b in zip(dense, pruned):
        assert b.kept_visual_tokens == 256 and b.kept_indices is None
        assert (a.action_tokens == b.action_tokens).all()
        np.testing.assert_array_equal(a.actions, b.actions)
    # and the same logits: nothing is dropped, so the engine runs the identical path
    inputs = policy.prepare(images[0], instruction)
    with torch.no_grad():
        embeds = policy.model.embed_inputs(inputs["pixel_values"], inputs["input_ids"])
    pad = torch.zeros(1, dtype=torch.long)
    ref = policy.engine.prefill(embeds, pad, 7).output
    pre = policy.engine.prefill(embeds, pad, 7, 1, lambda ctx: policy._select(ctx, 0, {}))
    got, kept = pre.output, pre.kept
    assert kept is None and torch.equal(ref, got)


@pytest.mark.parametrize("method", ["fastv", "sparsevlm", "divprune", "random", "uniform"])
def test_every_method_prunes_to_the_budget_in_the_policy(method):
    policy = tiny_policy(10)
    policy.configure(prune=PruneConfig(method=method, keep_ratio=0.125))
    r = policy.step(random_image(0), "press the yellow button")
    assert r.kept_visual_tokens == 32
    assert len(np.unique(r.kept_indices)) == 32 and (np.diff(r.kept_indices) > 0).all()


def test_sparsevlm_recycling_adds_one_merged_token():
    policy = tiny_policy(12)
    image, instruction = random_image(7), "stack the red cube on the blue cylinder"
    policy.configure(prune=PruneConfig(method="sparsevlm", keep_ratio=0.25))
    plain = policy.step(image, instruction)
    t = policy.prepare(image, instruction)["input_ids"].shape[1] + 256
    k_layer = policy.prune_config.resolve_layers(policy.config.num_layers)[0]
    assert policy.engine.cache.length[k_layer] == t - 256 + 64 + 6

    policy.configure(prune=PruneConfig(method="sparsevlm", keep_ratio=0.25, recycle=True))
    recycled = policy.step(image, instruction)
    cache = policy.engine.cache
    assert cache.length[k_layer] == t - 256 + 64 + 1 + 6  # one merged row more
    assert cache.length[k_layer - 1] == t + 6
    np.testing.assert_array_equal(plain.kept_indices, recycled.kept_indices)
    # the merged row is a real (valid, non-visual) row right after the kept visual ones
    _, valid, vis = cache.rows(k_layer)
    assert valid[0, 1 + 64] and vis[0, 1 + 64] == -1 and (vis[0, 1 : 1 + 64] >= 0).all()
    # it changes the computation (else recycling would be a no-op): same kept set, other logits
    inputs = policy.prepare(image, instruction)
    with torch.no_grad():
        embeds = policy.model.embed_inputs(inputs["pixel_values"], inputs["input_ids"])
    pad = torch.zeros(1, dtype=torch.long)
    kept = torch.as_tensor(plain.kept_indices)[None]
    logits_plain = policy.engine.prefill(embeds, pad, 7, k_layer, lambda ctx: kept).output
    logits_merged = policy.engine.prefill(
        embeds, pad, 7, k_layer, lambda ctx: policy._select(ctx, k_layer - 1, {})
    ).output
    assert (logits_plain - logits_merged).abs().max().item() > 1e-4
    # nothing dropped -> nothing merged
    policy.configure(prune=PruneConfig(method="sparsevlm", keep_ratio=1.0, recycle=True))
    assert policy.step(image, instruction).kept_visual_tokens == 256

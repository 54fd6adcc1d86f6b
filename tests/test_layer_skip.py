"""LLM layer skipping: exact when empty, equal to a reference without those layers, and a
calibration that is a deterministic function of its recording."""

import numpy as np
import pytest

from tests.conftest import random_image, tiny_policy
from tests.test_pruned_engine import reference_pruned
from vla_prune import PruneConfig
from vla_prune.caching.layer_skip import InfluenceRecording, choose_skips, record_influence
from vla_prune.engine.flops import step_flops


def test_empty_skip_list_is_exact_and_a_skip_changes_the_output():
    policy = tiny_policy(20)
    image, instruction = random_image(20), "press the yellow button"
    dense = policy.step(image, instruction)
    policy.configure(skip_layers=())
    same = policy.step(image, instruction)
    assert (dense.action_tokens == same.action_tokens).all()
    np.testing.assert_array_equal(dense.normalized_actions, same.normalized_actions)
    policy.configure(skip_layers=[2])
    assert not (policy.step(image, instruction).action_tokens == dense.action_tokens).all()


@pytest.mark.parametrize(
    "skip,k_layer",
    [((2,), 1), ((1, 3), 2), ((3,), 1), ((1, 2, 3), 1)],  # last: no layer from K on runs
)
def test_skipping_with_pruning_equals_the_reference(skip, k_layer):
    policy = tiny_policy(21)
    kept = np.sort(np.random.default_rng(1).choice(256, 48, replace=False))
    image, instruction = random_image(21), "put the green cylinder on the purple plate"
    ref_tokens, _ = reference_pruned(policy, image, instruction, k_layer, kept, skip=skip)
    prune = PruneConfig(method="fixed", indices=tuple(kept), layer=k_layer)
    policy.configure(prune=prune, skip_layers=skip)
    result = policy.step(image, instruction)
    assert (result.action_tokens == ref_tokens).all()
    for i in skip:  # skipped layers never touch their cache
        assert policy.engine.cache.length[i] == 0


def test_skipping_every_layer_of_a_cache_group_runs():
    """Regression: decode() raised a bare StopIteration when skip_layers emptied a cache group
    (fastv prunes at K=1 on 4 layers; skipping 1-3 leaves the pruned group with no layer).
    Nothing runs on the kept rows, so the output must equal the unpruned run with those skips."""
    policy = tiny_policy(23)
    image, instruction = random_image(23), "pick up the red block"
    policy.configure(prune=PruneConfig(method="fastv", keep_ratio=0.25), skip_layers=[1, 2, 3])
    pruned = policy.step(image, instruction)
    assert pruned.kept_visual_tokens == 64
    policy.configure(prune=PruneConfig(), skip_layers=[1, 2, 3])
    dense = policy.step(image, instruction)
    assert (pruned.action_tokens == dense.action_tokens).all()
    np.testing.assert_array_equal(pruned.normalized_actions, dense.normalized_actions)
    # the only group emptied: every layer skipped (embeddings -> final norm -> lm_head)
    policy.configure(skip_layers=[0, 1, 2, 3])
    assert policy.step(image, instruction).actions.shape == (1, 7)
    assert policy.engine.cache.length == [0, 0, 0, 0]


def test_skips_that_break_a_pruning_method_are_refused():
    policy = tiny_policy(0)
    prune = PruneConfig(method="vla-pruner", keep_ratio=0.25)  # semantic layer 0, action 2
    with pytest.raises(ValueError, match=r"cannot skip layers \[2\]: vla-pruner"):
        policy.configure(prune=prune, skip_layers=[2])
    with pytest.raises(ValueError, match="out of range"):
        policy.configure(skip_layers=[4])
    policy.configure(prune=prune, skip_layers=[1, 3])  # fine
    assert policy.step(random_image(0), "press the red button").actions.shape == (1, 7)


def test_calibration_is_deterministic(tmp_path):
    policy = tiny_policy(22)
    steps = [(random_image(s), "push the red cube onto the blue pad") for s in range(4)]
    rec = record_influence(policy, steps)
    assert rec.count == 4 and len(rec.cos_sum) == 4
    assert record_influence(policy, steps).cos_sum == rec.cos_sum  # same inputs, same numbers
    rec.save(tmp_path / "rec.json")
    loaded = InfluenceRecording.load(tmp_path / "rec.json")
    assert choose_skips(loaded, 1) == choose_skips(rec, 1)
    assert all(0 < i < 3 for i in choose_skips(rec, 2))  # first and last layers protected
    # hand-made recording: influence = 1 - cos_sum / count
    hand = InfluenceRecording("x", cos_sum=[1.0, 1.8, 1.9, 1.2, 1.95, 0.5], count=2)
    np.testing.assert_allclose(hand.influence, [0.5, 0.1, 0.05, 0.4, 0.025, 0.75])
    assert choose_skips(hand, 2) == [2, 4]
    assert choose_skips(hand, 2, protect=[4]) == [1, 2]
    with pytest.raises(ValueError, match="at most"):
        choose_skips(hand, 5)


def test_flops_drop_with_skipped_layers():
    cfg = tiny_policy(0).config
    dense = step_flops(cfg, 20)
    skipped = step_flops(cfg, 20, skip_layers=frozenset({1, 2}))
    assert skipped.stages["prefill"] == pytest.approx(dense.stages["prefill"] / 2)

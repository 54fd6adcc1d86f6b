"""The upstream-style reference pipeline decodes the same actions as our engine (dense)."""

import numpy as np

from tests.conftest import random_image, tiny_policy
from vla_prune.reference import ReferencePipeline


def test_reference_matches_engine_dense():
    policy = tiny_policy(30)
    for attn, output_attentions in [("eager", False), ("eager", True), ("sdpa", False)]:
        ref = ReferencePipeline(policy, attn, output_attentions)
        for s in range(2):
            image, instruction = random_image(30 + s), "put the green cylinder on the purple plate"
            a, b = ref.step(image, instruction), policy.step(image, instruction)
            assert (a.action_tokens == b.action_tokens).all()
            np.testing.assert_array_equal(a.actions, b.actions)
            assert {"vision", "generate", "total"} <= set(a.timings_ms)
    assert policy.model.language_model.config._attn_implementation == "sdpa"  # restored


def test_cogact_reference_matches_engine_dense():
    """Upstream-style CogACT (generate with hidden states, uncached DiT) == our dense path."""
    from tests.conftest import tiny_cogact
    from vla_prune.benchmark import _fresh

    policy = tiny_cogact(3)
    ref = ReferencePipeline(_fresh(policy), "eager")
    ours = _fresh(policy)
    for s in range(2):
        image, instruction = random_image(40 + s), "press the yellow button"
        a, b = ref.step(image, instruction), ours.step(image, instruction)
        np.testing.assert_allclose(a.normalized_actions, b.normalized_actions, atol=1e-5)
        assert a.actions.shape == b.actions.shape == (16, 7)

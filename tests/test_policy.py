"""Policy API: batching, bad inputs, reset, actions."""

import numpy as np
import pytest

import vla_prune
from tests.conftest import INSTRUCTIONS, random_image, tiny_policy
from vla_prune import InputError, PruneConfig
from vla_prune.policy import STAGES


def test_step_result_shape_and_timings(policy):
    r = policy.step(random_image(0), "pick up the red block")
    assert r.actions.shape == (1, 7) and r.actions.dtype == np.float32
    assert r.action_tokens.shape == (7,)
    assert set(r.timings_ms) == set(STAGES) - {"action_head"}
    stages = sum(v for k, v in r.timings_ms.items() if k != "total")
    assert stages <= r.timings_ms["total"] + 1e-6
    assert r.kept_visual_tokens == 256


@pytest.mark.parametrize(
    "prune", [None, PruneConfig(method="fixed", indices=tuple(range(0, 256, 3)))]
)
def test_step_batch_equals_single_steps(prune):
    policy = tiny_policy(7)
    if prune is not None:
        policy.configure(prune=prune)
    # different instruction lengths -> left padding inside the batch
    images = [random_image(i, size=160 + 20 * i) for i in range(4)]
    batch = policy.step_batch(images, INSTRUCTIONS)
    singles = [policy.step(im, ins) for im, ins in zip(images, INSTRUCTIONS)]
    assert (
        len({len(policy.prepare(im, s)["input_ids"][0]) for im, s in zip(images, INSTRUCTIONS)}) > 1
    )
    for b, s in zip(batch, singles):
        assert (b.action_tokens == s.action_tokens).all()
        np.testing.assert_array_equal(b.actions, s.actions)
        assert b.kept_visual_tokens == s.kept_visual_tokens


def test_prepare_matches_the_model_inputs(policy):
    inputs = policy.prepare(random_image(1), "Pick up the RED block")
    assert inputs["pixel_values"].shape == (1, 6, 224, 224)
    ids = inputs["input_ids"][0].tolist()
    assert ids[0] == 1  # BOS
    tokens = policy.tokenizer.convert_ids_to_tokens(ids)
    assert tokens[1:] == [
        "in",
        ":",
        "what",
        "action",
        "should",
        "the",
        "robot",
        "take",
        "to",
        "pick",
        "up",
        "the",
        "red",
        "block",
        "?",
        "out",
        ":",
    ]


BAD_IMAGES = [
    (np.zeros((224, 224), np.uint8), "shape"),
    (np.zeros((224, 224, 4), np.uint8), "3 channels"),
    (np.zeros((224, 224, 1), np.uint8), "3 channels"),
    (np.zeros((224, 224, 3), np.float32), "uint8"),
    (np.full((224, 224, 3), np.nan, np.float32), "NaN"),
    (np.zeros((1, 224, 3), np.uint8), "size"),
    (np.zeros((5000, 10, 3), np.uint8), "size"),
    ("not an image", "numpy array"),
    (None, "numpy array"),
]


@pytest.mark.parametrize("image,words", BAD_IMAGES)
def test_bad_images_raise_clear_errors(policy, image, words):
    with pytest.raises(InputError, match=words):
        policy.step(image, "pick up the red block")


@pytest.mark.parametrize(
    "instruction,words",
    [
        ("", "empty"),
        ("   ", "empty"),
        (None, "str"),
        (42, "str"),
        ("go " * 1500, "limit"),
        ("go " * 600, "too long"),
    ],
)
def test_bad_instructions_raise_clear_errors(policy, instruction, words):
    with pytest.raises(InputError, match=words):
        policy.step(random_image(0), instruction)


def test_bad_input_changes_no_state():
    policy = tiny_policy(1)
    policy.configure(prune=PruneConfig(method="fixed", indices=(1, 2, 3)))
    policy.step(random_image(0), "press the yellow button")
    steps = list(policy._steps)
    with pytest.raises(InputError):
        policy.step_batch([random_image(0), np.zeros((3, 3), np.uint8)], ["a", "b"])
    assert policy._steps == steps


def test_reset_clears_history():
    policy = tiny_policy(2)
    policy.step(random_image(0), "press the yellow button")
    assert policy._steps == [1]
    policy.reset()
    assert policy._steps == []


def test_unnorm_key_is_checked(policy):
    with pytest.raises(ValueError, match="unknown unnorm_key 'bridge'.*identity"):
        policy.configure(unnorm_key="bridge")


def test_bad_prune_configs():
    with pytest.raises(ValueError, match="keep_ratio"):
        PruneConfig(method="fastv", keep_ratio=0.0)
    with pytest.raises(ValueError, match="not both"):
        PruneConfig(keep_ratio=0.5, keep_count=3)
    with pytest.raises(ValueError, match="semantic_query"):
        PruneConfig(semantic_query="first")
    policy = tiny_policy(0)
    with pytest.raises(ValueError, match="unknown pruning method 'fastest'"):
        policy.configure(prune=PruneConfig(method="fastest"))
    with pytest.raises(ValueError, match="layer=9 but the model has 4 layers"):
        policy.configure(prune=PruneConfig(method="fastv", keep_ratio=0.5, layer=9))


def test_layer_scaling_rule():
    assert PruneConfig().resolve_layers(32) == (3, 2, 15)
    assert PruneConfig().resolve_layers(4) == (1, 0, 2)
    assert PruneConfig().resolve_layers(12) == (1, 0, 6)
    assert PruneConfig(layer=2).resolve_layers(4) == (2, 1, 2)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown policy preset 'tiny-llava'"):
        vla_prune.build_policy("tiny-llava")

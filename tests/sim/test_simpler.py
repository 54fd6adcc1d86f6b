"""Tests of the SIMPLER adapter against a stand-in of SimplerEnv's interface (simpler_standin)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import simpler_standin  # tests/sim is on sys.path under pytest's default import mode

import sim.envs.simpler as simpler
from sim.envs import list_tasks, make_env
from sim.envs.simpler import GripperConverter, euler_to_axis_angle

GOOGLE = "google_robot_pick_coke_can"
WIDOWX = "widowx_carrot_on_plate"
DRAWER = "google_robot_place_apple_in_closed_top_drawer"
NOOP = np.array([0, 0, 0, 0, 0, 0, 1], dtype=np.float32)  # OpenVLA convention: 1 = open


@pytest.fixture
def standin(monkeypatch):
    """Installs the stand-in as `simpler_env`; yields the list of envs it made."""
    return simpler_standin.install(monkeypatch)


def _action(dx=0.0, rpy=(0.0, 0.0, 0.0), gripper=1.0) -> np.ndarray:
    return np.array([dx, 0.0, 0.0, *rpy, gripper], dtype=np.float32)


def test_tasks_listed_without_simpler_env():
    assert list_tasks("simpler") == list(simpler.TASKS)
    assert len(list_tasks("simpler")) == 10
    with pytest.raises(ValueError, match="unknown task"):
        make_env("simpler", "google_robot_juggle")


def test_missing_simpler_env_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "simpler_env", None)  # not importable, even if installed
    with pytest.raises(ImportError) as err:
        make_env("simpler", GOOGLE)
    msg = str(err.value)
    assert "git clone https://github.com/simpler-env/SimplerEnv --recurse-submodules" in msg
    assert "pip install -e ManiSkill2_real2sim" in msg and "pip install -e ." in msg
    assert "Vulkan" in msg and "CPU CI" in msg
    assert "--recurse-submodules" in simpler.__doc__ and "Vulkan" in simpler.__doc__


def test_reset_seed_image_and_instruction(standin):
    env = make_env("simpler", GOOGLE)
    obs, info = env.reset(seed=7, options={"obj_init_options": {"episode_id": 3}})
    fake = standin[-1]
    assert fake.reset_calls[-1] == {"seed": 7, "options": {"obj_init_options": {"episode_id": 3}}}
    assert obs["instruction"] == env.instruction == "pick coke can"
    assert obs["image"].shape == (224, 224, 3) and obs["image"].dtype == np.uint8
    assert obs["state"].shape == (7,) and obs["state"].dtype == np.float32
    assert info["success"] is False and info["seed"] == 7 and info["episode_id"] == 7
    again, _ = env.reset(seed=7)
    other, _ = env.reset(seed=8)
    assert np.array_equal(obs["image"], again["image"])
    assert not np.array_equal(obs["image"], other["image"])
    native = make_env("simpler", WIDOWX, image_size=None)
    assert native.reset(seed=0)[0]["image"].shape == (480, 640, 3)
    assert native.observation_space["image"].shape == (480, 640, 3)
    env.close()
    assert fake.closed


def test_euler_to_axis_angle_hand_computed():
    np.testing.assert_allclose(euler_to_axis_angle(0.0, 0.0, 0.0), np.zeros(3), atol=1e-15)
    np.testing.assert_allclose(euler_to_axis_angle(0.1, 0.0, 0.0), [0.1, 0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(euler_to_axis_angle(0.0, -0.2, 0.0), [0.0, -0.2, 0.0], atol=1e-12)
    np.testing.assert_allclose(euler_to_axis_angle(0.0, 0.0, 0.3), [0.0, 0.0, 0.3], atol=1e-12)
    # Rz(90) Rx(90) maps x->y, y->z, z->x: 120 degrees about (1, 1, 1)/sqrt(3).
    expected = (2 * np.pi / 3) / np.sqrt(3) * np.ones(3)
    np.testing.assert_allclose(euler_to_axis_angle(np.pi / 2, 0.0, np.pi / 2), expected, atol=1e-12)


def test_euler_to_axis_angle_matches_scipy():
    rotation = pytest.importorskip("scipy.spatial.transform").Rotation
    rng = np.random.default_rng(0)
    for rpy in rng.uniform(-np.pi, np.pi, (200, 3)):
        expected = rotation.from_euler("xyz", rpy).as_rotvec()  # lower case: static (sxyz) axes
        np.testing.assert_allclose(euler_to_axis_angle(*rpy), expected, atol=1e-9)


def test_action_conversion_reaches_the_env(standin):
    env = make_env("simpler", WIDOWX)
    env.reset(seed=0)
    env.step(np.array([0.01, -0.02, 0.03, np.pi / 2, 0.0, np.pi / 2, 0.7], dtype=np.float32))
    sent = standin[-1].actions[-1]
    np.testing.assert_allclose(sent[:3], [0.01, -0.02, 0.03], rtol=1e-6)
    np.testing.assert_allclose(sent[3:6], (2 * np.pi / 3) / np.sqrt(3) * np.ones(3), atol=1e-6)
    assert sent[6] == 1.0  # WidowX: open > 0.5 -> +1 (open)
    env.step(_action(gripper=0.3))
    assert standin[-1].actions[-1][6] == -1.0  # close
    np.testing.assert_array_equal(env.last_env_action, standin[-1].actions[-1])
    base = make_env("simpler", WIDOWX, gripper_convention="base")  # >= 0.5 closes
    base.reset(seed=0)
    base.step(_action(gripper=0.7))
    assert standin[-1].actions[-1][6] == -1.0


def test_google_gripper_is_relative_and_sticky():
    conv = GripperConverter("google_robot")
    opens = [1.0, 1.0] + [0.0] * 20  # open, open, then close and stay closed
    out = [conv(g) for g in opens]
    # First step 0; closing gives +1, held for 15 steps, then 0 (no further change).
    assert out == [0.0, 0.0] + [1.0] * 15 + [0.0] * 5
    conv.reset()
    assert [conv(g) for g in (0.0, 1.0)] == [0.0, -1.0]  # opening: -1


def test_subtask_advancement_and_success(standin):
    env = make_env("simpler", DRAWER)
    obs, _ = env.reset(seed=0)
    assert obs["instruction"] == "open top drawer"
    obs, _, terminated, _, info = env.step(_action(dx=0.6))
    assert not info["subtask_advanced"] and not terminated
    obs, _, terminated, _, info = env.step(_action(dx=0.6))  # drawer now open
    assert info["subtask_advanced"] and not info["success"] and not terminated
    assert obs["instruction"] == env.instruction == "place apple into top drawer"
    obs, _, terminated, truncated, info = env.step(_action(dx=1.0))
    assert terminated and info["success"] and not truncated
    assert not info["subtask_advanced"]


def test_single_task_success_terminates(standin):
    env = make_env("simpler", GOOGLE)
    env.reset(seed=0)
    _, reward, terminated, truncated, info = env.step(_action(dx=1.0))
    assert terminated and info["success"] and reward == 1.0 and not truncated


def test_step_limit_truncates(standin):
    env = make_env("simpler", WIDOWX)
    assert env.max_episode_steps == 60
    env.reset(seed=0)
    for t in range(60):
        _, _, terminated, truncated, info = env.step(NOOP)
        assert not terminated and truncated == (t == 59)
    assert info["steps"] == 60
    # SimplerEnv's own protocol: no early stop on success, the last step decides.
    env = make_env("simpler", GOOGLE, terminate_on_success=False, max_steps=3)
    env.reset(seed=0)
    results = [env.step(_action(dx=1.0))[2:] for _ in range(3)]
    assert [r[:2] for r in results] == [(False, False), (False, False), (False, True)]
    assert results[-1][2]["success"]

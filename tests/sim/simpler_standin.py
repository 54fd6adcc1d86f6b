"""A STAND-IN for SimplerEnv (``simpler_env``), used only by tests/sim/test_simpler.py.

SimplerEnv cannot be installed or rendered on the CPU CI, so this module imitates the part of its
documented interface that `sim.envs.simpler` uses — ``simpler_env.make``,
``simpler_env.utils.env.observation_utils.get_image_from_maniskill2_obs_dict``, and the env's
``reset / step / get_language_instruction / is_final_subtask / advance_to_next_subtask / close``
— with toy dynamics: "progress" is the running sum of the commanded x deltas. A task succeeds once
progress reaches 1; the two-subtask drawer task reports its drawer open at progress 1 (in
``info["episode_stats"]["is_drawer_open"]``, like ManiSkill2_real2sim) and succeeds at progress 2
on its final subtask. Nothing here is physics; it only checks the adapter's plumbing.
"""

from __future__ import annotations

import sys
import types
from typing import Any

import numpy as np

# Camera image sizes (H, W) of the real tasks: Google robot overhead camera, WidowX 3rd view.
IMAGE_SHAPE = {"google_robot_static": (512, 640), "widowx": (480, 640)}
CAMERA = {"google_robot_static": "overhead_camera", "widowx": "3rd_view_camera"}
REGISTERED_MAX_STEPS = 1000  # larger than the adapter's limits, so the adapter's limit is tested
TWO_SUBTASKS = {"google_robot_place_apple_in_closed_top_drawer"}


class StandInSimplerEnv:
    """Toy env with SimplerEnv's interface (see the module docstring)."""

    def __init__(self, task: str):
        self.task = task
        self.robot_uid = "google_robot_static" if task.startswith("google") else "widowx"
        self.n_subtasks = 2 if task in TWO_SUBTASKS else 1
        self.actions: list[np.ndarray] = []  # every action the adapter sent
        self.reset_calls: list[dict[str, Any]] = []
        self.closed = False
        self._background = np.zeros((*IMAGE_SHAPE[self.robot_uid], 3), np.uint8)
        self._subtask = 0
        self._progress = 0.0
        self._steps = 0
        self._drawer_open = False

    def reset(self, seed: int | None = None, options: dict | None = None):
        self.reset_calls.append({"seed": seed, "options": options})
        rng = np.random.default_rng(seed)
        self._background = rng.integers(0, 256, self._background.shape, dtype=np.uint8)
        self._subtask, self._progress, self._steps, self._drawer_open = 0, 0.0, 0, False
        self.actions = []
        return self._obs(), {"episode_id": seed}

    def step(self, action):
        action = np.asarray(action)
        assert action.shape == (7,), action.shape
        self.actions.append(action.copy())
        self._steps += 1
        self._progress += float(action[0])
        if self.n_subtasks == 2:
            self._drawer_open = self._drawer_open or self._progress >= 1.0
            success = self._subtask == 1 and self._progress >= 2.0
        else:
            success = self._progress >= 1.0
        info = {"success": success, "episode_stats": {"is_drawer_open": self._drawer_open}}
        truncated = self._steps >= REGISTERED_MAX_STEPS
        return self._obs(), float(success), success, truncated, info

    def get_language_instruction(self) -> str:
        if self.n_subtasks == 2:
            return "open top drawer" if self._subtask == 0 else "place apple into top drawer"
        return self.task.removeprefix("google_robot_").removeprefix("widowx_").replace("_", " ")

    def is_final_subtask(self) -> bool:
        return self._subtask == self.n_subtasks - 1

    def advance_to_next_subtask(self) -> None:
        self._subtask += 1

    def close(self) -> None:
        self.closed = True

    def _obs(self) -> dict[str, Any]:
        img = self._background.copy()
        x = int(np.clip(self._progress, 0, 2) * 100)  # a bright bar that moves with progress
        img[:20, x : x + 20] = 255
        tcp = np.array([self._progress, 0, 0, 1, 0, 0, 0], np.float32)
        return {
            "image": {CAMERA[self.robot_uid]: {"rgb": img}},
            "agent": {"qpos": np.zeros(8, np.float32)},
            "extra": {"tcp_pose": tcp},
        }


def get_image_from_maniskill2_obs_dict(env: StandInSimplerEnv, obs: dict, camera_name=None):
    return obs["image"][camera_name or CAMERA[env.robot_uid]]["rgb"]


def install(monkeypatch) -> list[StandInSimplerEnv]:
    """Inject the stand-in as ``simpler_env`` into sys.modules; returns the list of made envs."""
    made: list[StandInSimplerEnv] = []

    def make(task_name: str) -> StandInSimplerEnv:
        env = StandInSimplerEnv(task_name)
        made.append(env)
        return env

    modules = {
        name: types.ModuleType(name)
        for name in (
            "simpler_env",
            "simpler_env.utils",
            "simpler_env.utils.env",
            "simpler_env.utils.env.observation_utils",
        )
    }
    modules["simpler_env"].make = make
    modules["simpler_env"].__doc__ = "stand-in for SimplerEnv (tests only)"
    utils = modules["simpler_env.utils.env.observation_utils"]
    utils.get_image_from_maniskill2_obs_dict = get_image_from_maniskill2_obs_dict
    modules["simpler_env"].utils = modules["simpler_env.utils"]
    modules["simpler_env.utils"].env = modules["simpler_env.utils.env"]
    modules["simpler_env.utils.env"].observation_utils = utils
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return made

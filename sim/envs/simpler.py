"""SIMPLER adapter: SimplerEnv's real-to-sim tasks behind the `LanguageConditionedEnv` interface.

SimplerEnv is not on PyPI and cannot run on this project's CPU CI. To use this adapter, install
it from its repository on a machine with a Vulkan-capable GPU (SAPIEN renders with Vulkan)::

    git clone https://github.com/simpler-env/SimplerEnv --recurse-submodules
    cd SimplerEnv
    pip install -e ManiSkill2_real2sim
    pip install -e .

The adapter is written against SimplerEnv's documented interface: ``simpler_env.make(task)``,
``env.reset(seed=..., options=...)``, ``get_image_from_maniskill2_obs_dict(env, obs)``,
``env.get_language_instruction()``, ``env.is_final_subtask()``,
``env.advance_to_next_subtask()`` and ``env.step(a) -> (obs, reward, done, truncated, info)``
with ``info["success"]``. Its tests run against a stand-in of that interface.

Tasks and step limits (the limits each task is registered with in ManiSkill2_real2sim):
Google robot pick coke can / pick object / move near 80, open / close drawer 113, place apple in
closed top drawer 200; WidowX spoon on towel / carrot on plate / stack cube 60, put eggplant in
basket 120.

Actions, ``[dx, dy, dz, droll, dpitch, dyaw, gripper]``, are converted as SimplerEnv's own
OpenVLA wrapper (``simpler_env/policies/openvla/openvla_model.py``) does, to the env's
``[xyz delta, axis-angle rotation delta, gripper]``:

* xyz is passed through (times `action_scale`, 1.0 as upstream);
* roll / pitch / yaw become an axis-angle vector (transforms3d's ``euler2axangle`` with its default
  static ``sxyz`` axes, i.e. R = Rz(yaw) Ry(pitch) Rx(roll)); `euler_to_axis_angle` does it with
  numpy and returns the shortest rotation vector (angle <= pi);
* gripper (OpenVLA convention, 1 = open, 0 = closed; ``gripper_convention="base"`` takes this
  project's ``>= 0.5 closes`` instead):
  - Google robot: its gripper controller takes *relative* targets (+1 = close, -1 = open), so the
    command is ``previous_open - current_open`` (0 on the first step); once its magnitude exceeds
    0.5 it is repeated ("sticky") for 15 steps, as upstream;
  - WidowX: absolute, binarized: ``+1`` (open) if ``open > 0.5`` else ``-1`` (close).

Long-horizon tasks (place apple in closed top drawer: "open top drawer", then "place apple into
top drawer"): SimplerEnv's evaluator advances when the policy predicts "terminate"; OpenVLA never
does, so here the env decides. Rule: after every step, if ``not env.is_final_subtask()`` and the
env reports the current subtask done, call ``env.advance_to_next_subtask()`` and refresh the
instruction (``info["subtask_advanced"]`` is True on that step). "Done" is
``info["episode_stats"]["is_drawer_open"]`` for the drawer task (its ``info["success"]`` only
becomes true on the final subtask) and ``info["success"]`` for any other task.

Episodes end with ``terminated = success`` (the `sim.envs.base` convention). SimplerEnv's own
evaluation instead runs to the step limit and scores the last step: ``terminate_on_success=False``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
from gymnasium import spaces

from sim.envs.base import Obs, WrappedSimEnv, make_observation_space, validate_action

logger = logging.getLogger(__name__)

INSTALL_MESSAGE = (
    "The SIMPLER suite needs SimplerEnv, which is not on PyPI: "
    "git clone https://github.com/simpler-env/SimplerEnv --recurse-submodules && "
    "cd SimplerEnv && pip install -e ManiSkill2_real2sim && pip install -e . "
    "It renders with SAPIEN, which needs a Vulkan-capable GPU; it cannot run on this "
    "project's CPU CI."
)

Robot = Literal["google_robot", "widowx"]
GripperConvention = Literal["openvla", "base"]
SubtaskDone = Callable[[dict[str, Any]], bool]


def _success(info: dict[str, Any]) -> bool:
    return bool(info.get("success", False))


def _drawer_open(info: dict[str, Any]) -> bool:
    return bool(info.get("episode_stats", {}).get("is_drawer_open", False))


@dataclass(frozen=True)
class SimplerTask:
    robot: Robot
    max_steps: int
    subtask_done: SubtaskDone = _success


TASKS: dict[str, SimplerTask] = {
    "google_robot_pick_coke_can": SimplerTask("google_robot", 80),
    "google_robot_pick_object": SimplerTask("google_robot", 80),
    "google_robot_move_near": SimplerTask("google_robot", 80),
    "google_robot_open_drawer": SimplerTask("google_robot", 113),
    "google_robot_close_drawer": SimplerTask("google_robot", 113),
    "google_robot_place_apple_in_closed_top_drawer": SimplerTask("google_robot", 200, _drawer_open),
    "widowx_spoon_on_towel": SimplerTask("widowx", 60),
    "widowx_carrot_on_plate": SimplerTask("widowx", 60),
    "widowx_stack_cube": SimplerTask("widowx", 60),
    "widowx_put_eggplant_in_basket": SimplerTask("widowx", 120),
}
STATE_DIM = 7  # tool-centre-point pose [x, y, z, qw, qx, qy, qz] (obs["extra"]["tcp_pose"])
GOOGLE_STICKY_REPEAT = 15  # upstream's sticky_gripper_num_repeat for the Google robot


def task_names() -> list[str]:
    return list(TASKS)


def _import_simpler() -> tuple[Callable[[str], Any], Callable[..., np.ndarray]]:
    """Returns (simpler_env.make, get_image_from_maniskill2_obs_dict) or raises ImportError."""
    try:
        import simpler_env
        from simpler_env.utils.env.observation_utils import get_image_from_maniskill2_obs_dict
    except ImportError as err:
        raise ImportError(f"{INSTALL_MESSAGE} ({err})") from err
    return simpler_env.make, get_image_from_maniskill2_obs_dict


# --- conversions (pure, tested by hand-computed values) ----------------------------------------


def euler_to_axis_angle(roll: float, pitch: float, yaw: float) -> np.ndarray:
    """Rotation vector (axis * angle) of R = Rz(yaw) Ry(pitch) Rx(roll), angle in [0, pi]."""
    cr, sr = np.cos(roll / 2), np.sin(roll / 2)
    cp, sp = np.cos(pitch / 2), np.sin(pitch / 2)
    cy, sy = np.cos(yaw / 2), np.sin(yaw / 2)
    w = cr * cp * cy + sr * sp * sy
    v = np.array(
        [
            sr * cp * cy - cr * sp * sy,
            cr * sp * cy + sr * cp * sy,
            cr * cp * sy - sr * sp * cy,
        ]
    )
    if w < 0:  # q and -q are the same rotation; take the one with angle <= pi
        w, v = -w, -v
    s = float(np.linalg.norm(v))
    if s < 1e-12:
        return 2.0 * v  # small-angle limit of angle * axis
    return v * (2.0 * np.arctan2(s, w) / s)


class GripperConverter:
    """OpenVLA gripper (1 = open) -> the robot's gripper command, as upstream's OpenVLA wrapper."""

    def __init__(self, robot: Robot, sticky_repeat: int = GOOGLE_STICKY_REPEAT):
        self.robot = robot
        self.sticky_repeat = sticky_repeat
        self.reset()

    def reset(self) -> None:
        self._previous: float | None = None
        self._sticky_on = False
        self._sticky_action = 0.0
        self._repeat = 0

    def __call__(self, open_gripper: float) -> float:
        if self.robot == "widowx":
            return 1.0 if open_gripper > 0.5 else -1.0
        # Google robot: relative command, +1 closes, -1 opens, repeated while it takes effect.
        relative = 0.0 if self._previous is None else self._previous - open_gripper
        self._previous = open_gripper
        if abs(relative) > 0.5 and not self._sticky_on:
            self._sticky_on, self._sticky_action = True, relative
        if self._sticky_on:
            self._repeat += 1
            relative = self._sticky_action
        if self._repeat == self.sticky_repeat:
            self._sticky_on, self._sticky_action, self._repeat = False, 0.0, 0
        return float(relative)


@dataclass
class SimplerConfig:
    image_size: int | None = 224  # square resize of the camera image (None: native size)
    max_steps: int | None = None  # None: the task's limit (see TASKS)
    action_scale: float = 1.0  # upstream OpenVLA wrapper's action_scale
    gripper_convention: GripperConvention = "openvla"  # "openvla": 1 = open; "base": >=0.5 closes
    terminate_on_success: bool = True  # False: run to the limit as SimplerEnv's evaluator does


class SimplerEnv(WrappedSimEnv):
    """One SimplerEnv task (e.g. ``"widowx_carrot_on_plate"``); see the module docstring."""

    suite = "simpler"

    def __init__(self, task: str, config: SimplerConfig | None = None, **overrides: Any):
        if task not in TASKS:
            raise ValueError(f"unknown SIMPLER task {task!r}; choose from {task_names()}")
        self.config = cfg = replace(config or SimplerConfig(), **overrides)
        if cfg.gripper_convention not in ("openvla", "base"):
            raise ValueError(
                f"gripper_convention must be 'openvla' or 'base', got {cfg.gripper_convention!r}"
            )
        self.task = task
        self.spec = TASKS[task]
        self.max_episode_steps = cfg.max_steps or self.spec.max_steps

        make, self._get_image = _import_simpler()
        self._env = make(task)
        self._gripper = GripperConverter(self.spec.robot)

        if cfg.image_size is not None:  # else: native size, set on the first observation
            size = (cfg.image_size, cfg.image_size)
            self.observation_space = make_observation_space(size, STATE_DIM, False)
        low = np.array([-1.0] * 6 + [0.0], dtype=np.float32)
        self.action_space = spaces.Box(low=low, high=np.ones(7, dtype=np.float32))
        self._instruction: str | None = None
        self._last_obs: Obs | None = None
        self.last_env_action: np.ndarray | None = None  # what the last step sent to SimplerEnv
        self._seed: int | None = None
        self._steps = 0

    # --- gym API ------------------------------------------------------------------------------

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Obs, dict[str, Any]]:
        """Reset SimplerEnv with `seed` and `options` (e.g. ``{"obj_init_options": ...}``)."""
        super().reset(seed=seed)
        env = self._require_env()
        raw, reset_info = env.reset(seed=seed, options=options)
        self._seed, self._steps = seed, 0
        self._gripper.reset()
        self._instruction = str(env.get_language_instruction())
        info = {**dict(reset_info or {}), **self._info(success=False)}
        return self._observe(raw), info

    def step(self, action: Any) -> tuple[Obs, float, bool, bool, dict[str, Any]]:
        if self._instruction is None:
            raise RuntimeError("call reset() before step()")
        env = self._require_env()
        env_action = self.convert_action(action)
        self.last_env_action = env_action
        raw, reward, _, env_truncated, env_info = env.step(env_action)
        self._steps += 1

        advanced = False
        if not env.is_final_subtask() and self.spec.subtask_done(env_info):
            env.advance_to_next_subtask()
            self._instruction = str(env.get_language_instruction())
            advanced = True
            logger.debug("%s: next subtask %r", self.task, self._instruction)
        # Success counts only on the final subtask (the env's own rule for long-horizon tasks).
        success = bool(env_info.get("success", False)) and env.is_final_subtask() and not advanced
        terminated = success and self.config.terminate_on_success
        at_limit = self._steps >= self.max_episode_steps or bool(env_truncated)
        truncated = at_limit and not terminated
        info = {**env_info, **self._info(success), "subtask_advanced": advanced}
        return self._observe(raw), float(reward), terminated, truncated, info

    # --- conversions and helpers --------------------------------------------------------------

    def convert_action(self, action: Any) -> np.ndarray:
        """Our 7-D action -> SimplerEnv's [xyz, axis-angle, gripper] (float64, (7,))."""
        a = validate_action(action)
        scale = self.config.action_scale
        open_gripper = a[6] if self.config.gripper_convention == "openvla" else 1.0 - a[6]
        return np.concatenate(
            [a[:3] * scale, euler_to_axis_angle(*a[3:6]) * scale, [self._gripper(open_gripper)]]
        )

    def _require_env(self) -> Any:
        if self._env is None:
            raise RuntimeError("env is closed")
        return self._env

    def _observe(self, raw: Any) -> Obs:
        img = np.asarray(self._get_image(self._env, raw), dtype=np.uint8)
        size = self.config.image_size
        if size is not None and img.shape[:2] != (size, size):
            from PIL import Image

            # Upstream resizes with cv2.INTER_AREA; PIL's BOX filter is the same area average.
            img = np.asarray(Image.fromarray(img).resize((size, size), Image.BOX))
        tcp = raw.get("extra", {}).get("tcp_pose") if isinstance(raw, dict) else None
        state = np.zeros(STATE_DIM, np.float32) if tcp is None else np.asarray(tcp, np.float32)
        if size is None and getattr(self, "observation_space", None) is None:
            self.observation_space = make_observation_space(img.shape[:2], STATE_DIM, False)
        obs: Obs = {"image": img, "instruction": self.instruction, "state": state}
        self._last_obs = obs
        return obs

    @property
    def instruction(self) -> str:
        if self._instruction is None:
            raise RuntimeError("call reset() before reading the instruction")
        return self._instruction


__all__ = [
    "INSTALL_MESSAGE",
    "TASKS",
    "GripperConverter",
    "SimplerConfig",
    "SimplerEnv",
    "euler_to_axis_angle",
    "task_names",
]

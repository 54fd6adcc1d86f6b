"""The one env interface: language-conditioned image tasks with OpenVLA-style 7-D actions.

Every suite (the embedded MuJoCo tabletop, later LIBERO / SIMPLER adapters) subclasses
`LanguageConditionedEnv` and follows these conventions:

* ``reset(seed=None, options=None) -> (obs, info)``; the same seed gives the same scene.
* ``step(action) -> (obs, reward, terminated, truncated, info)`` with ``info["success"]`` (bool);
  ``terminated`` is True on success, ``truncated`` is True at the step limit.
* ``obs`` is a dict: ``"image"`` HxWx3 uint8 (agent-view camera), optionally ``"wrist_image"``
  (same format), ``"instruction"`` str, ``"state"`` float32 proprio vector.
* ``action`` is float32 ``(7,)`` = ``[dx, dy, dz, droll, dpitch, dyaw, gripper]``: end-effector
  deltas per control step and the gripper command (``>= 0.5`` closes, ``< 0.5`` opens).
  Suites document their units and what they do with the rotation deltas.

Seed convention shared by all suites: evaluation uses seeds in `EVAL_SEEDS`; demonstrations use
seeds from `DEMO_SEED_START` upwards, so training scenes never equal evaluation scenes.
"""

from __future__ import annotations

import string
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

ACTION_DIM = 7
ACTION_LABELS = ("dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper")
GRIPPER_CLOSE_THRESHOLD = 0.5  # gripper command >= this closes the gripper

EVAL_SEEDS = range(0, 10_000)
DEMO_SEED_START = 1_000_000

Obs = dict[str, Any]


def validate_action(action: Any) -> np.ndarray:
    """Return `action` as a float64 (7,) array, or raise ValueError naming the problem."""
    try:
        arr = np.asarray(action, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"action must be a numeric array of shape ({ACTION_DIM},): {err}") from err
    if arr.shape != (ACTION_DIM,):
        raise ValueError(
            f"action must have shape ({ACTION_DIM},) = {list(ACTION_LABELS)}, got {arr.shape}"
        )
    if not np.isfinite(arr).all():
        bad = [ACTION_LABELS[i] for i in np.flatnonzero(~np.isfinite(arr))]
        raise ValueError(f"action has non-finite values in {bad}: {arr.tolist()}")
    return arr


def make_observation_space(
    image_size: tuple[int, int], state_dim: int, wrist_image: bool
) -> spaces.Dict:
    h, w = image_size
    image = spaces.Box(0, 255, shape=(h, w, 3), dtype=np.uint8)
    parts: dict[str, spaces.Space] = {
        "image": image,
        "instruction": spaces.Text(max_length=256, charset=string.printable),
        "state": spaces.Box(-np.inf, np.inf, shape=(state_dim,), dtype=np.float32),
    }
    if wrist_image:
        parts["wrist_image"] = image
    return spaces.Dict(parts)


class LanguageConditionedEnv(gym.Env):
    """Base class of all language-conditioned image envs (see the module docstring)."""

    metadata = {"render_modes": ["rgb_array"]}
    render_mode = "rgb_array"

    #: suite name, e.g. "embedded"
    suite: str = ""
    #: task name within the suite, e.g. "press"
    task: str = ""
    #: steps after which an episode is truncated
    max_episode_steps: int = 0

    @property
    def instruction(self) -> str:
        """The language instruction of the current episode (valid after reset)."""
        raise NotImplementedError

    def _info(self, success: bool) -> dict[str, Any]:
        """The info dict every suite returns; suites add their own keys to it."""
        return {
            "success": bool(success),
            "task": self.task,
            "seed": getattr(self, "_seed", None),
            "steps": getattr(self, "_steps", 0),
        }


class WrappedSimEnv(LanguageConditionedEnv):
    """Base of adapters around another simulator's env (LIBERO, SIMPLER): they keep the wrapped
    env in `_env` and their latest observation in `_last_obs`."""

    _env: Any = None
    _last_obs: Obs | None = None

    def render(self) -> np.ndarray:
        """The agent-view image of the latest observation."""
        if self._last_obs is None:
            raise RuntimeError("call reset() before render()")
        return self._last_obs["image"]

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None

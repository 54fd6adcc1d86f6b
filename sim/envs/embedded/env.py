"""The embedded MuJoCo tabletop env: mocap gripper, magnetic grasp, 10 Hz control.

Control: ``action = [dx, dy, dz, droll, dpitch, dyaw, gripper]``. ``dx, dy, dz`` are metres per
control step; each is clipped to ``config.max_delta`` and added to the commanded gripper
position (clipped to the workspace). The rotation deltas are accepted and **ignored**: the
gripper always points down with its fingers along the table's x axis. ``gripper >= 0.5``
closes the fingers, ``< 0.5`` opens them.

Grasping is "magnetic" for robustness: when the gripper closes with an object centred between
its fingers, a weld equality locks the object to the gripper until it opens again.
"""

from __future__ import annotations

import atexit
import logging
import os
import weakref
from dataclasses import dataclass, replace
from typing import Any

os.environ.setdefault("MUJOCO_GL", "egl")  # headless by default; must precede `import mujoco`
import mujoco  # noqa: E402
import numpy as np
from gymnasium import spaces

from sim.envs.base import (
    GRIPPER_CLOSE_THRESHOLD,
    LanguageConditionedEnv,
    Obs,
    make_observation_space,
    validate_action,
)
from sim.envs.embedded.scene import (
    BUTTON_CAP_HALF_HEIGHT,
    FINGER_TRAVEL,
    FLOOR_Z,
    HIDDEN_GROUP,
    OBJECT_HALF,
    SHAPES,
    build_scene_xml,
    object_geom_name,
)
from sim.envs.embedded.tasks import (
    BUTTON_PRESSED_DEPTH,
    COLORS,
    FAMILIES,
    SceneState,
    TaskInstance,
)

logger = logging.getLogger(__name__)

PARKED_Z = FLOOR_Z + OBJECT_HALF  # parked distractors rest on the hidden floor
# Commanded gripper positions are clipped to this box (metres, grip-site coordinates). The
# lower z keeps the finger tips 5 mm above the table.
WORKSPACE_LOW = np.array([-0.32, -0.32, 0.02])
WORKSPACE_HIGH = np.array([0.32, 0.32, 0.30])
# The command may lead the real gripper by at most this much, so a blocked gripper (pressing,
# pushing) does not wind up a large target offset and a huge weld force.
MAX_TARGET_LEAD = 0.03
# An object is grasped if, when the gripper closes, its centre lies within this box around the
# grip site (x is the finger axis).
GRASP_BOX = np.array([0.035, 0.02, 0.02])
MOCAP_CHUNKS = 5  # the mocap moves to its new target in this many increments per step
STATE_DIM = 4  # [ee_x, ee_y, ee_z, gripper_opening in 0 (closed) .. 1 (open)]


@dataclass
class EmbeddedConfig:
    image_size: int = 128  # square images, agent view (and wrist view if enabled)
    wrist_image: bool = False  # also render the wrist camera into obs["wrist_image"]
    control_hz: float = 10.0  # control steps per simulated second
    max_delta: float = 0.03  # metres per step, clip for each of dx, dy, dz
    max_steps: int | None = None  # None: the family's default step limit
    # False: a diagnostic ablation. Objects that are neither the target nor (stack) the base are
    # parked off the table and hidden, so a failure can no longer be "picked the wrong object".
    # Distractor buttons/pads/plates stay. The seed decides the same scene either way.
    distractors: bool = True


_LIVE_ENVS: weakref.WeakSet[EmbeddedEnv] = weakref.WeakSet()
_ATEXIT_REGISTERED = False


def _close_live_envs() -> None:
    # Free GL contexts before EGL itself is torn down; avoids noisy __del__ errors at exit.
    for env in list(_LIVE_ENVS):
        env.close()


class EmbeddedEnv(LanguageConditionedEnv):
    """Tabletop env for one task family ("press", "push", "pick_place", "stack")."""

    suite = "embedded"

    def __init__(self, task: str, config: EmbeddedConfig | None = None, **overrides: Any):
        global _ATEXIT_REGISTERED
        if task not in FAMILIES:
            raise ValueError(f"unknown embedded task {task!r}; choose from {sorted(FAMILIES)}")
        self.config = cfg = replace(config or EmbeddedConfig(), **overrides)
        if not 16 <= cfg.image_size <= 1024:
            raise ValueError(f"image_size must be in [16, 1024], got {cfg.image_size}")
        self.task = task
        self.family = FAMILIES[task]
        self.max_episode_steps = cfg.max_steps or self.family.max_steps

        xml = build_scene_xml(
            self.family.n_objects, self.family.fixture_kind, self.family.n_fixtures, cfg.image_size
        )
        self.model = mujoco.MjModel.from_xml_string(xml)
        self.data = mujoco.MjData(self.model)
        self._n_substeps = max(1, round(1.0 / (cfg.control_hz * self.model.opt.timestep)))
        self._cache_ids()

        self._renderer: mujoco.Renderer | None = mujoco.Renderer(
            self.model, cfg.image_size, cfg.image_size
        )
        for flag in (mujoco.mjtRndFlag.mjRND_SHADOW, mujoco.mjtRndFlag.mjRND_REFLECTION):
            self._renderer.scene.flags[flag] = 0
        self.model.light_castshadow[:] = 0
        self._scene_option = mujoco.MjvOption()
        self._scene_option.geomgroup[HIDDEN_GROUP] = 0
        _LIVE_ENVS.add(self)
        if not _ATEXIT_REGISTERED:
            atexit.register(_close_live_envs)
            _ATEXIT_REGISTERED = True

        size = (cfg.image_size, cfg.image_size)
        self.observation_space = make_observation_space(size, STATE_DIM, cfg.wrist_image)
        d = cfg.max_delta
        self.action_space = spaces.Box(
            low=np.array([-d, -d, -d, -np.pi, -np.pi, -np.pi, 0.0], dtype=np.float32),
            high=np.array([d, d, d, np.pi, np.pi, np.pi, 1.0], dtype=np.float32),
            dtype=np.float32,
        )
        self._task_instance: TaskInstance | None = None
        self._seed: int | None = None
        self._last_obs: Obs | None = None

    # --- setup ------------------------------------------------------------------------------

    def _cache_ids(self) -> None:
        m = self.model
        self._gripper_qadr = m.jnt_qposadr[m.joint("gripper").id]
        self._grip_site = m.site("grip").id
        self._gripper_body = m.body("gripper").id
        self._finger_qadr = [m.jnt_qposadr[m.joint(f"finger_{s}").id] for s in ("left", "right")]
        n_obj = self.family.n_objects
        self._obj_qadr = [m.jnt_qposadr[m.joint(f"obj{i}").id] for i in range(n_obj)]
        self._obj_body = [m.body(f"obj{i}").id for i in range(n_obj)]
        self._obj_geoms = [
            {shape: m.geom(object_geom_name(i, shape)).id for shape in SHAPES} for i in range(n_obj)
        ]
        self._grasp_eq = [m.equality(f"grasp{i}").id for i in range(n_obj)]
        kind = self.family.fixture_kind
        n_fix = self.family.n_fixtures
        self._fix_body = [m.body(f"fix{i}").id for i in range(n_fix)]
        geom_name = {"button": "cap", "pad": "pad", "plate": "plate"}.get(kind or "", "")
        self._fix_geom = [m.geom(f"fix{i}_{geom_name}").id for i in range(n_fix)]
        self._button_qadr = (
            [m.jnt_qposadr[m.joint(f"fix{i}_press").id] for i in range(n_fix)]
            if kind == "button"
            else []
        )

    def _apply_task(self, task: TaskInstance) -> None:
        """Write a sampled task into the model (colours, shapes, fixture poses) and the state."""
        m, d = self.model, self.data
        mujoco.mj_resetData(m, d)  # also deactivates grasp welds (eq_active0)
        for i, obj in enumerate(task.objects):
            for shape, gid in self._obj_geoms[i].items():
                active = shape == obj.shape
                m.geom_group[gid] = 0 if active else HIDDEN_GROUP
                m.geom_contype[gid] = m.geom_conaffinity[gid] = int(active)
                m.geom_rgba[gid] = (*COLORS[obj.color], 1.0) if active else (0, 0, 0, 0)
            adr = self._obj_qadr[i]
            d.qpos[adr : adr + 3] = (*obj.xy, OBJECT_HALF)
            d.qpos[adr + 3 : adr + 7] = (np.cos(obj.yaw / 2), 0.0, 0.0, np.sin(obj.yaw / 2))
        if not self.config.distractors:
            self._park_distractors(task)
        for i, fix in enumerate(task.fixtures):
            m.body_pos[self._fix_body[i]] = (*fix.xy, 0.0)
            m.geom_rgba[self._fix_geom[i]] = (*COLORS[fix.color], 1.0)
        home = np.asarray(task.gripper_home)
        d.qpos[self._gripper_qadr : self._gripper_qadr + 7] = (*home, 1.0, 0.0, 0.0, 0.0)
        d.mocap_pos[0] = home
        for adr in self._finger_qadr:
            d.qpos[adr] = FINGER_TRAVEL
        d.ctrl[:] = FINGER_TRAVEL
        mujoco.mj_forward(m, d)
        self._target = home.copy()
        self._closed = False
        self._grasped: int | None = None
        self._ever_pressed = np.zeros(self.family.n_fixtures, dtype=bool)

    def _park_distractors(self, task: TaskInstance) -> None:
        keep = {task.target_object, task.base_object}
        for i in range(len(task.objects)):
            if i in keep:
                continue
            for gid in self._obj_geoms[i].values():
                self.model.geom_group[gid] = HIDDEN_GROUP  # never rendered; still collides
            adr = self._obj_qadr[i]  # resting on the hidden floor, far outside the view
            self.data.qpos[adr : adr + 3] = (1.5 + 0.2 * i, 1.5, PARKED_Z)

    # --- gym API ------------------------------------------------------------------------------

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Obs, dict[str, Any]]:
        super().reset(seed=seed)
        self._seed = seed
        self._task_instance = self.family.sample(self.np_random)
        self._apply_task(self._task_instance)
        self._steps = 0
        logger.debug("reset %s seed=%s: %s", self.task, seed, self._task_instance.instruction)
        obs = self._observe()
        return obs, self._info(success=False)

    def step(self, action: Any) -> tuple[Obs, float, bool, bool, dict[str, Any]]:
        if self._task_instance is None:
            raise RuntimeError("call reset() before step()")
        a = validate_action(action)
        self._set_target(a[:3])
        just_closed = self._set_gripper(a[6] >= GRIPPER_CLOSE_THRESHOLD)
        self._simulate()
        if just_closed:
            self._try_grasp()  # after the fingers had a step's time to close on the object
        self._latch_pressed_buttons()
        self._steps += 1

        state = self.scene_state()
        success = self.family.is_success(self._task_instance, state)
        obs = self._observe()
        truncated = self._steps >= self.max_episode_steps and not success
        return obs, float(success), success, truncated, self._info(success)

    def render(self) -> np.ndarray:
        """The agent-view image of the latest observation."""
        if self._last_obs is None:
            raise RuntimeError("call reset() before render()")
        return self._last_obs["image"]

    def close(self) -> None:
        if self._renderer is not None:
            # Free this renderer's GL objects in its own context: with another env's context
            # current, close() would free that env's objects and it would render garbage.
            context = getattr(self._renderer, "_gl_context", None)
            if context is not None:
                context.make_current()
            self._renderer.close()
            self._renderer = None
        _LIVE_ENVS.discard(self)

    # --- control ------------------------------------------------------------------------------

    def _set_target(self, delta_xyz: np.ndarray) -> None:
        delta = np.clip(delta_xyz, -self.config.max_delta, self.config.max_delta)
        target = np.clip(self._target + delta, WORKSPACE_LOW, WORKSPACE_HIGH)
        lead = target - self.ee_pos
        norm = float(np.linalg.norm(lead))
        if norm > MAX_TARGET_LEAD:
            target = self.ee_pos + lead * (MAX_TARGET_LEAD / norm)
        self._target = target

    def _set_gripper(self, close: bool) -> bool:
        """Command the fingers; opening releases a grasp. Returns True if it just closed."""
        just_closed = close and not self._closed
        self._closed = close
        if not close and self._grasped is not None:
            self.data.eq_active[self._grasp_eq[self._grasped]] = 0
            self._grasped = None
        self.data.ctrl[:] = 0.0 if close else FINGER_TRAVEL
        return just_closed

    def _simulate(self) -> None:
        """One control step of physics; the mocap glides to the target in a few increments."""
        start = self.data.mocap_pos[0].copy()
        chunks = min(MOCAP_CHUNKS, self._n_substeps)
        for k in range(1, chunks + 1):
            self.data.mocap_pos[0] = start + (self._target - start) * (k / chunks)
            n = self._n_substeps * k // chunks - self._n_substeps * (k - 1) // chunks
            mujoco.mj_step(self.model, self.data, n)

    def _latch_pressed_buttons(self) -> None:
        for i, adr in enumerate(self._button_qadr):
            if -self.data.qpos[adr] >= BUTTON_PRESSED_DEPTH:
                self._ever_pressed[i] = True

    def _try_grasp(self) -> None:
        site = self.data.site_xpos[self._grip_site]
        rot = self.data.site_xmat[self._grip_site].reshape(3, 3)
        best, best_dist = None, np.inf
        for i in range(self.family.n_objects):
            rel = rot.T @ (self.data.xpos[self._obj_body[i]] - site)
            if (np.abs(rel) <= GRASP_BOX).all() and np.linalg.norm(rel) < best_dist:
                best, best_dist = i, float(np.linalg.norm(rel))
        if best is None:
            return
        # Weld with the current relative pose: relpose is body2's pose in body1's frame.
        g, o = self._gripper_body, self._obj_body[best]
        eq = self._grasp_eq[best]
        rel_pos = self.data.xmat[g].reshape(3, 3).T @ (self.data.xpos[o] - self.data.xpos[g])
        g_quat_inv = np.zeros(4)
        mujoco.mju_negQuat(g_quat_inv, self.data.xquat[g])
        rel_quat = np.zeros(4)
        mujoco.mju_mulQuat(rel_quat, g_quat_inv, self.data.xquat[o])
        self.model.eq_data[eq, 3:6] = rel_pos
        self.model.eq_data[eq, 6:10] = rel_quat
        self.data.eq_active[eq] = 1
        self._grasped = best

    # --- observations and privileged state ----------------------------------------------------

    def _render(self, camera: str) -> np.ndarray:
        assert self._renderer is not None, "env is closed"
        self._renderer.update_scene(self.data, camera=camera, scene_option=self._scene_option)
        return self._renderer.render()

    def _observe(self) -> Obs:
        obs: Obs = {
            "image": self._render("agentview"),
            "instruction": self.instruction,
            "state": np.array([*self.ee_pos, self.gripper_opening], dtype=np.float32),
        }
        if self.config.wrist_image:
            obs["wrist_image"] = self._render("wrist")
        self._last_obs = obs
        return obs

    def _info(self, success: bool) -> dict[str, Any]:
        assert self._task_instance is not None
        failed = self.family.is_failed(self._task_instance, self.scene_state())
        return {**super()._info(success), "failed": failed}

    @property
    def instruction(self) -> str:
        if self._task_instance is None:
            raise RuntimeError("call reset() before reading the instruction")
        return self._task_instance.instruction

    @property
    def task_instance(self) -> TaskInstance:
        """The sampled scene description of the current episode (privileged)."""
        if self._task_instance is None:
            raise RuntimeError("call reset() first")
        return self._task_instance

    @property
    def ee_pos(self) -> np.ndarray:
        return self.data.site_xpos[self._grip_site].copy()

    @property
    def gripper_opening(self) -> float:
        q = np.mean([self.data.qpos[adr] for adr in self._finger_qadr])
        return float(np.clip(q / FINGER_TRAVEL, 0.0, 1.0))

    @property
    def gripper_closed(self) -> bool:
        """The last gripper command (True = closed)."""
        return self._closed

    @property
    def grasped(self) -> int | None:
        """Index of the object held by the magnetic grasp, if any."""
        return self._grasped

    def object_pos(self, i: int) -> np.ndarray:
        return self.data.xpos[self._obj_body[i]].copy()

    def button_top(self, i: int) -> np.ndarray:
        """World position of the top centre of button `i`'s cap."""
        return self.data.geom_xpos[self._fix_geom[i]] + np.array([0.0, 0.0, BUTTON_CAP_HALF_HEIGHT])

    def scene_state(self) -> SceneState:
        n_obj = self.family.n_objects
        return SceneState(
            object_pos=np.array([self.object_pos(i) for i in range(n_obj)]).reshape(n_obj, 3),
            grasped=self._grasped,
            button_depth=np.array([-self.data.qpos[adr] for adr in self._button_qadr]),
            ever_pressed=self._ever_pressed.copy(),
        )

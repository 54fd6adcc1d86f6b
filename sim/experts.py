"""Scripted experts for the embedded tabletop, one per task family.

Each expert is a closed-loop waypoint controller that reads privileged state from the env
(object / button poses, the grasp flag) and returns the same 7-D action a policy would:
``[dx, dy, dz, 0, 0, 0, gripper]``. Being closed-loop, an expert recovers from small slips
(a missed grasp, a pushed object turning) by re-planning every step.

    env = make_env("embedded", "pick_place")
    obs, _ = env.reset(seed=0)
    expert = expert_for(env)
    while True:
        obs, _, terminated, truncated, info = env.step(expert(obs))
        if terminated or truncated:
            break
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from sim.envs.embedded import EmbeddedEnv
from sim.envs.embedded.scene import OBJECT_HALF
from sim.envs.embedded.tasks import PLATE_TOP

CLOSE, OPEN = 1.0, 0.0
TRAVEL_CLEARANCE = 0.06  # grip-site height above an object's centre while moving over it
PUSH_SPEED = 0.02  # m/step while pushing; slower than free motion so objects do not fly
PUSH_BACKOFF = 0.055  # grip site distance behind the object centre before a push
CARRY_LIFT = 0.07  # carried object's height above its destination while moving there
NOISE_FADE_DISTANCE = 0.05  # per-axis action noise shrinks within this distance of a waypoint
# The "smooth" experts descend on a funnel instead of behind an xy gate: the height goal falls
# continuously from travel height (xy error >= FUNNEL_OUT) to contact (<= FUNNEL_IN), and the
# gripper closes / releases inside tolerances the env's grasp box and success checks allow.
# A policy whose xy estimate is off by a centimetre then still descends and grasps, where the
# gated expert's "descend only within 5 mm" leaves it hovering
# (bench/results/embedded-expert-noise.md).
FUNNEL_IN, FUNNEL_OUT = 0.008, 0.035
GRASP_XY_TOL = 0.012  # close when the grip site is this near the object's centre (box: 2 cm)
GRASP_Z_TOL = 0.01
RELEASE_XY_TOL = 0.012  # stack's success needs 2 cm alignment, pick_place's 4.5 cm
RELEASE_Z_TOL = 0.008
STYLES = ("smooth", "gated")


class Expert:
    """Callable expert: ``expert(obs) -> action`` (float32, shape (7,))."""

    def __init__(
        self,
        env: EmbeddedEnv,
        noise_std: float = 0.0,
        seed: int | None = None,
        style: str = "smooth",
        view: Any = None,
    ):
        if not isinstance(env, EmbeddedEnv):
            raise TypeError(f"experts need an EmbeddedEnv, got {type(env).__name__}")
        if style not in STYLES:
            raise ValueError(f"unknown expert style {style!r}; expected one of {STYLES}")
        self.env = env
        # What the expert reads positions from: the env itself, or a perturbed view of it
        # (sim.expert_noise) with the same attributes.
        self.view = env if view is None else view
        self.noise_std = noise_std  # metres, Gaussian noise on dx, dy, dz (demo diversity)
        self.style = style
        self._rng = np.random.default_rng(seed)
        self._policy: Callable[[EmbeddedEnv], tuple[np.ndarray, float]] = _POLICIES[style][env.task]

    def __call__(self, obs: Any = None) -> np.ndarray:
        goal, gripper = self._policy(self.view)
        error = goal - self.env.ee_pos
        delta = _CLIP[self.style](error, self.env.config.max_delta)
        if self.noise_std > 0:
            # Full noise in free motion, fading out per axis as that axis reaches the waypoint
            # (e.g. no sideways noise while descending onto an object).
            scale = np.minimum(1.0, np.abs(error) / NOISE_FADE_DISTANCE)
            delta = delta + self._rng.normal(0.0, 1.0, size=3) * self.noise_std * scale
        return np.array([*delta, 0.0, 0.0, 0.0, gripper], dtype=np.float32)


def expert_for(
    env: EmbeddedEnv, noise_std: float = 0.0, seed: int | None = None, style: str = "smooth"
) -> Expert:
    """The scripted expert of `env`'s task family (call after or before `env.reset`).

    `style`: "smooth" (the default: each axis clipped on its own, funnel descents) or "gated"
    (the experts the shipped policies were trained on: straight-line steps, descend only once
    within 5 mm).
    """
    return Expert(env, noise_std=noise_std, seed=seed, style=style)


def _clip_norm(v: np.ndarray, max_norm: float) -> np.ndarray:
    n = float(np.linalg.norm(v))
    return v if n <= max_norm else v * (max_norm / n)


def _clip_axes(v: np.ndarray, max_abs: float) -> np.ndarray:
    return np.clip(v, -max_abs, max_abs)


def _xy_dist(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.hypot(a[0] - b[0], a[1] - b[1]))


def _funnel(xy_err: float) -> float:
    """0 at or beyond FUNNEL_OUT, 1 at or within FUNNEL_IN, smooth in between."""
    t = min(1.0, max(0.0, (FUNNEL_OUT - xy_err) / (FUNNEL_OUT - FUNNEL_IN)))
    return t * t * (3.0 - 2.0 * t)


# --- per-family policies: env -> (goal grip-site position, gripper command) -----------------


def _press(env: EmbeddedEnv) -> tuple[np.ndarray, float]:
    top = env.button_top(env.task_instance.target_fixture)
    ee = env.ee_pos
    if _xy_dist(ee, top) > 0.01:
        return np.array([top[0], top[1], top[2] + TRAVEL_CLEARANCE]), CLOSE
    return np.array([top[0], top[1], top[2] - 0.02]), CLOSE  # press through the cap


def _push(env: EmbeddedEnv, funnel: bool = False) -> tuple[np.ndarray, float]:
    """Get behind the object (on the pad's far side), low, and push it to the pad centre.

    `funnel` (the smooth style): descend behind the object on a funnel instead of only once
    within 1 cm of the pre-push point, and do not go back up while already behind it.
    """
    task = env.task_instance
    obj = env.object_pos(task.target_object)
    pad = np.asarray(task.fixtures[task.target_fixture].xy)
    ee = env.ee_pos
    to_pad = pad - obj[:2]
    dist = float(np.linalg.norm(to_pad))
    if dist < 0.005:
        return ee, CLOSE
    u = to_pad / dist
    pre = obj[:2] - u * PUSH_BACKOFF
    rel = ee[:2] - obj[:2]
    along = float(rel @ u)
    sideways = rel - along * u
    lateral = float(np.linalg.norm(sideways))
    low = ee[2] < OBJECT_HALF + 0.035
    travel_z = OBJECT_HALF + TRAVEL_CLEARANCE
    behind = -PUSH_BACKOFF - 0.03 < along < -0.03  # on the far side of the object from the pad
    if low and lateral < 0.015 and -PUSH_BACKOFF - 0.02 < along < -0.02:
        # In position behind the object: push towards the pad centre, correcting sideways.
        goal_xy = ee[:2] + u * min(PUSH_SPEED, dist) - 0.5 * sideways
        return np.array([*goal_xy, OBJECT_HALF]), CLOSE
    if low and np.linalg.norm(rel) < 0.09 and not (funnel and behind and lateral < 0.03):
        return np.array([ee[0], ee[1], travel_z]), CLOSE  # misaligned next to it: go up first
    if funnel:
        near = _xy_dist(ee, pre)
        fall = _funnel(near) if behind or near < FUNNEL_IN else 0.0
        return np.array([*pre, travel_z - fall * (travel_z - OBJECT_HALF)]), CLOSE
    if _xy_dist(ee, pre) > 0.01:
        return np.array([*pre, max(travel_z, min(ee[2], travel_z))]), CLOSE
    return np.array([*pre, OBJECT_HALF]), CLOSE


def _carry(env: EmbeddedEnv, target: int, dest: np.ndarray) -> tuple[np.ndarray, float]:
    """Pick object `target` and release it with its centre at `dest`."""
    ee = env.ee_pos
    obj = env.object_pos(target)
    if env.grasped == target:
        offset = ee - obj  # move the object, not the grip site
        carry_z = dest[2] + CARRY_LIFT
        if _xy_dist(obj, dest) > 0.008:
            if obj[2] < carry_z - 0.03:
                return np.array([obj[0], obj[1], carry_z]) + offset, CLOSE  # lift first
            return np.array([dest[0], dest[1], carry_z]) + offset, CLOSE
        place = np.array([dest[0], dest[1], dest[2] + 0.004])
        if np.linalg.norm(obj - place) < 0.006:
            return ee, OPEN  # release
        return place + offset, CLOSE
    if env.grasped is not None or env.gripper_closed:
        # Holding the wrong thing, or a grasp that missed: open and back off upwards.
        return np.array([ee[0], ee[1], ee[2] + 0.03]), OPEN
    hover_z = obj[2] + TRAVEL_CLEARANCE
    xy_err = _xy_dist(ee, obj)
    if xy_err > 0.005:
        if ee[2] < obj[2] + 0.03 and xy_err > 0.02:
            return np.array([ee[0], ee[1], hover_z]), OPEN  # too low to move sideways
        return np.array([obj[0], obj[1], max(hover_z, min(ee[2], hover_z))]), OPEN
    if abs(ee[2] - obj[2]) < 0.006:
        return obj, CLOSE
    return obj, OPEN


Carry = Callable[[EmbeddedEnv, int, np.ndarray], tuple[np.ndarray, float]]


def _pick_place(env: EmbeddedEnv, carry: Carry | None = None) -> tuple[np.ndarray, float]:
    task = env.task_instance
    plate = task.fixtures[task.target_fixture].xy
    dest = np.array([*plate, PLATE_TOP + OBJECT_HALF])
    return (carry or _carry)(env, task.target_object, dest)


def _stack(env: EmbeddedEnv, carry: Carry | None = None) -> tuple[np.ndarray, float]:
    task = env.task_instance
    base = env.object_pos(task.base_object)
    dest = base + np.array([0.0, 0.0, 2 * OBJECT_HALF])
    return (carry or _carry)(env, task.target_object, dest)


def _carry_smooth(env: EmbeddedEnv, target: int, dest: np.ndarray) -> tuple[np.ndarray, float]:
    """`_carry` with funnel descents: onto the object, and onto `dest` with it."""
    ee = env.ee_pos
    obj = env.object_pos(target)
    if env.grasped == target:
        offset = ee - obj
        carry_z = dest[2] + CARRY_LIFT
        xy_err = _xy_dist(obj, dest)
        if obj[2] < carry_z - 0.03 and xy_err > FUNNEL_OUT:
            return np.array([obj[0], obj[1], carry_z]) + offset, CLOSE  # lift first
        place_z = dest[2] + 0.004
        if xy_err < RELEASE_XY_TOL and obj[2] - place_z < RELEASE_Z_TOL:
            return ee, OPEN  # release
        z = carry_z - _funnel(xy_err) * (carry_z - place_z)
        return np.array([dest[0], dest[1], z]) + offset, CLOSE
    if env.grasped is not None or env.gripper_closed:
        return np.array([ee[0], ee[1], ee[2] + 0.03]), OPEN
    hover_z = obj[2] + TRAVEL_CLEARANCE
    xy_err = _xy_dist(ee, obj)
    if ee[2] < obj[2] + 0.03 and xy_err > FUNNEL_OUT:
        return np.array([ee[0], ee[1], hover_z]), OPEN  # too low to move sideways
    if xy_err < GRASP_XY_TOL and abs(ee[2] - obj[2]) < GRASP_Z_TOL:
        return obj, CLOSE
    return np.array([obj[0], obj[1], hover_z - _funnel(xy_err) * TRAVEL_CLEARANCE]), OPEN


_GATED = {"press": _press, "push": _push, "pick_place": _pick_place, "stack": _stack}
# Press keeps its 1 cm gate: the shipped policy already solves it.
_SMOOTH = {
    "press": _press,
    "push": partial(_push, funnel=True),
    "pick_place": partial(_pick_place, carry=_carry_smooth),
    "stack": partial(_stack, carry=_carry_smooth),
}
_POLICIES = {"smooth": _SMOOTH, "gated": _GATED}
# How a waypoint error becomes a step. The smooth experts clip each axis on its own (the env
# clips per axis too): far from a waypoint an axis's label is just the sign of its error at full
# speed, near it the error itself, both simple functions of what the image shows. The gated
# ones scale the whole vector (a straight line), so every axis's label depends on the ratio of
# all three errors: the policies trained on them output dx = 0 where the expert says 0.6 cm.
_CLIP = {"smooth": _clip_axes, "gated": _clip_norm}

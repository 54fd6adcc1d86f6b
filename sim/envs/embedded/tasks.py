"""Task families of the embedded tabletop: scene sampling, instructions and success checks.

Every family names its target only by attributes (colour and/or shape), and every scene holds
distractors that share one attribute with the target where possible, so the policy has to look
at the right place to succeed. Nothing here touches MuJoCo: the env turns a `TaskInstance` into
a scene and hands privileged `SceneState`s back for the success check.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sim.envs.embedded.scene import (
    BUTTON_TRAVEL,
    OBJECT_HALF,
    PAD_HALF,
    PLATE_HALF_HEIGHT,
    PLATE_RADIUS,
    SHAPES,
    SPAWN_HALF,
)

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.1, 0.1),
    "green": (0.1, 0.65, 0.15),
    "blue": (0.1, 0.25, 0.9),
    "yellow": (0.95, 0.85, 0.1),
    "purple": (0.55, 0.15, 0.75),
    "orange": (1.0, 0.5, 0.0),
}
COLOR_NAMES = tuple(COLORS)

# Minimum centre-to-centre distances. Objects need room for the open fingers on either side;
# objects must not start on a pad/plate; fixtures must not overlap.
MIN_SEP = {
    ("object", "object"): 0.10,
    ("fixture", "object"): 0.13,
    ("fixture", "fixture"): 0.17,
}
# Nothing spawns right in front of the gripper's home pose, where the gripper hides the table
# from the agent-view camera at the first frame.
HOME_KEEPOUT = (0.1, -0.15)  # |x| < 0.1 and y < -0.15
BUTTON_PRESSED_DEPTH = 0.7 * BUTTON_TRAVEL
PLATE_TOP = 2 * PLATE_HALF_HEIGHT


@dataclass(frozen=True)
class ObjectSpec:
    color: str
    shape: str
    xy: tuple[float, float]
    yaw: float

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class FixtureSpec:
    color: str
    xy: tuple[float, float]


@dataclass(frozen=True)
class TaskInstance:
    """Everything a seed decides about an episode."""

    family: str
    instruction: str
    objects: tuple[ObjectSpec, ...]
    fixtures: tuple[FixtureSpec, ...]
    target_object: int | None  # index into objects (the thing to move)
    target_fixture: int | None  # index into fixtures (the button / pad / plate)
    base_object: int | None  # stack: the object to put the target on
    gripper_home: tuple[float, float, float]


@dataclass(frozen=True)
class SceneState:
    """Privileged simulator state the success checks need."""

    object_pos: np.ndarray  # [n_objects, 3]
    grasped: int | None  # index of the object held by the gripper
    button_depth: np.ndarray  # [n_fixtures], metres pushed in (buttons only)
    ever_pressed: np.ndarray  # [n_fixtures] bool, latched once a button went past the threshold


@dataclass(frozen=True)
class TaskFamily:
    name: str
    n_objects: int
    fixture_kind: str | None  # "button" | "pad" | "plate" | None
    n_fixtures: int
    max_steps: int

    def sample(self, rng: np.random.Generator) -> TaskInstance:
        return _SAMPLERS[self.name](self, rng)

    def is_success(self, task: TaskInstance, state: SceneState) -> bool:
        return _SUCCESS[self.name](task, state)

    def is_failed(self, task: TaskInstance, state: SceneState) -> bool:
        """True once success became impossible (only `press`: a wrong button was pressed)."""
        if self.name != "press":
            return False
        wrong = np.delete(state.ever_pressed, task.target_fixture)
        return bool(wrong.any())


FAMILIES: dict[str, TaskFamily] = {
    f.name: f
    for f in (
        TaskFamily("press", n_objects=0, fixture_kind="button", n_fixtures=4, max_steps=40),
        TaskFamily("push", n_objects=3, fixture_kind="pad", n_fixtures=3, max_steps=80),
        TaskFamily("pick_place", n_objects=3, fixture_kind="plate", n_fixtures=3, max_steps=80),
        TaskFamily("stack", n_objects=4, fixture_kind=None, n_fixtures=0, max_steps=80),
    )
}


# --- Sampling ---------------------------------------------------------------------------------


def _sample_layout(rng: np.random.Generator, kinds: list[str]) -> list[tuple[float, float]]:
    """Uniform positions over the spawn square, rejection-sampled for minimum separation."""
    for _ in range(1000):
        placed: list[tuple[float, float]] = []
        for kind in kinds:
            for _ in range(200):
                xy = rng.uniform(-SPAWN_HALF, SPAWN_HALF, size=2)
                if abs(xy[0]) < HOME_KEEPOUT[0] and xy[1] < HOME_KEEPOUT[1]:
                    continue
                ok = all(
                    np.hypot(*(xy - np.asarray(p))) >= MIN_SEP[tuple(sorted((kind, k)))]
                    for p, k in zip(placed, kinds[: len(placed)], strict=True)
                )
                if ok:
                    placed.append((float(xy[0]), float(xy[1])))
                    break
            else:
                break  # dead end: restart the whole layout
        if len(placed) == len(kinds):
            return placed
    raise RuntimeError(f"could not place {kinds} with the required separation")


def _sample_distractors(
    rng: np.random.Generator, used: list[tuple[str, str]], n: int, shapes: tuple[str, ...]
) -> list[tuple[str, str]]:
    """Distinct (colour, shape) pairs, preferring ones that share an attribute with `used[0]`.

    Sharing the target's shape (other colour) or colour (other shape) makes both words of the
    instruction matter.
    """
    target_color, target_shape = used[0]
    taken = set(used)
    out: list[tuple[str, str]] = []
    same_shape = [(c, target_shape) for c in COLOR_NAMES if (c, target_shape) not in taken]
    same_color = [(target_color, s) for s in shapes if (target_color, s) not in taken]
    for pool in (same_shape, same_color):
        if len(out) < n and pool:
            pick = pool[rng.integers(len(pool))]
            out.append(pick)
            taken.add(pick)
    while len(out) < n:
        pick = (COLOR_NAMES[rng.integers(len(COLOR_NAMES))], shapes[rng.integers(len(shapes))])
        if pick not in taken:
            out.append(pick)
            taken.add(pick)
    return out


def _gripper_home(rng: np.random.Generator) -> tuple[float, float, float]:
    # Near the camera side of the table and high, so the gripper hides little of the scene.
    x, y = rng.uniform(-0.05, 0.05), rng.uniform(-0.31, -0.28)
    return (float(x), float(y), float(rng.uniform(0.1, 0.13)))


def _objects(
    rng: np.random.Generator, attrs: list[tuple[str, str]], xys: list[tuple[float, float]]
) -> tuple[ObjectSpec, ...]:
    return tuple(
        ObjectSpec(color=c, shape=s, xy=xy, yaw=float(rng.uniform(0, np.pi / 2)))
        for (c, s), xy in zip(attrs, xys, strict=True)
    )


def _shuffled(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.permutation(n)


def _sample_press(family: TaskFamily, rng: np.random.Generator) -> TaskInstance:
    colors = [COLOR_NAMES[i] for i in rng.choice(len(COLOR_NAMES), family.n_fixtures, False)]
    xys = _sample_layout(rng, ["fixture"] * family.n_fixtures)
    fixtures = tuple(FixtureSpec(c, xy) for c, xy in zip(colors, xys, strict=True))
    target = int(rng.integers(family.n_fixtures))
    return TaskInstance(
        family=family.name,
        instruction=f"press the {colors[target]} button",
        objects=(),
        fixtures=fixtures,
        target_object=None,
        target_fixture=target,
        base_object=None,
        gripper_home=_gripper_home(rng),
    )


def _sample_object_to_fixture(family: TaskFamily, rng: np.random.Generator) -> TaskInstance:
    # push: spheres would roll past the pad; pick_place: any shape can be carried.
    shapes = ("cube", "cylinder") if family.name == "push" else SHAPES
    target = (COLOR_NAMES[rng.integers(len(COLOR_NAMES))], shapes[rng.integers(len(shapes))])
    attrs = [target, *_sample_distractors(rng, [target], family.n_objects - 1, SHAPES)]
    order = _shuffled(rng, family.n_objects)  # the target is not always slot 0
    attrs = [attrs[i] for i in order]
    target_idx = int(np.argmax(order == 0))

    fix_colors = [COLOR_NAMES[i] for i in rng.choice(len(COLOR_NAMES), family.n_fixtures, False)]
    target_fix = int(rng.integers(family.n_fixtures))
    xys = _sample_layout(rng, ["fixture"] * family.n_fixtures + ["object"] * family.n_objects)
    fixture_xys = xys[: family.n_fixtures]
    fixtures = tuple(FixtureSpec(c, xy) for c, xy in zip(fix_colors, fixture_xys, strict=True))
    objects = _objects(rng, attrs, xys[family.n_fixtures :])
    name, goal = objects[target_idx].name, fix_colors[target_fix]
    if family.name == "push":
        instruction = f"push the {name} onto the {goal} pad"
    else:
        instruction = f"put the {name} on the {goal} plate"
    return TaskInstance(
        family=family.name,
        instruction=instruction,
        objects=objects,
        fixtures=fixtures,
        target_object=target_idx,
        target_fixture=target_fix,
        base_object=None,
        gripper_home=_gripper_home(rng),
    )


def _sample_stack(family: TaskFamily, rng: np.random.Generator) -> TaskInstance:
    # Only flat-topped, non-rolling shapes are stacked; spheres appear as distractors.
    flat = ("cube", "cylinder")
    top_color, base_color = (COLOR_NAMES[i] for i in rng.choice(len(COLOR_NAMES), 2, False))
    top = (top_color, flat[rng.integers(2)])
    base = (base_color, flat[rng.integers(2)])
    # Hard negatives: the top's shape in the base's colour and vice versa, when still free.
    distractors: list[tuple[str, str]] = []
    for cand in ((base_color, top[1]), (top_color, base[1])):
        if cand not in (top, base) and len(distractors) < family.n_objects - 2:
            distractors.append(cand)
    used = [top, base, *distractors]
    distractors += _sample_distractors(rng, used, family.n_objects - len(used), SHAPES)
    attrs = [top, base, *distractors]
    order = _shuffled(rng, family.n_objects)
    attrs = [attrs[i] for i in order]
    top_idx, base_idx = int(np.argmax(order == 0)), int(np.argmax(order == 1))
    objects = _objects(rng, attrs, _sample_layout(rng, ["object"] * family.n_objects))
    return TaskInstance(
        family=family.name,
        instruction=f"stack the {objects[top_idx].name} on the {objects[base_idx].name}",
        objects=objects,
        fixtures=(),
        target_object=top_idx,
        target_fixture=None,
        base_object=base_idx,
        gripper_home=_gripper_home(rng),
    )


_SAMPLERS = {
    "press": _sample_press,
    "push": _sample_object_to_fixture,
    "pick_place": _sample_object_to_fixture,
    "stack": _sample_stack,
}


# --- Success checks ---------------------------------------------------------------------------


def _press_success(task: TaskInstance, s: SceneState) -> bool:
    assert task.target_fixture is not None
    wrong = np.delete(s.ever_pressed, task.target_fixture)
    return bool(s.button_depth[task.target_fixture] >= BUTTON_PRESSED_DEPTH and not wrong.any())


def _push_success(task: TaskInstance, s: SceneState) -> bool:
    assert task.target_object is not None and task.target_fixture is not None
    pos = s.object_pos[task.target_object]
    offset = np.abs(pos[:2] - np.asarray(task.fixtures[task.target_fixture].xy))
    on_table = pos[2] < OBJECT_HALF + 0.01
    return bool((offset <= PAD_HALF).all() and on_table and s.grasped != task.target_object)


def _pick_place_success(task: TaskInstance, s: SceneState) -> bool:
    assert task.target_object is not None and task.target_fixture is not None
    pos = s.object_pos[task.target_object]
    dist = np.hypot(*(pos[:2] - np.asarray(task.fixtures[task.target_fixture].xy)))
    resting = abs(pos[2] - (PLATE_TOP + OBJECT_HALF)) < 0.01
    return bool(dist <= PLATE_RADIUS - 0.01 and resting and s.grasped != task.target_object)


def _stack_success(task: TaskInstance, s: SceneState) -> bool:
    assert task.target_object is not None and task.base_object is not None
    top, base = s.object_pos[task.target_object], s.object_pos[task.base_object]
    aligned = np.hypot(*(top[:2] - base[:2])) <= 0.02
    on_top = abs(top[2] - base[2] - 2 * OBJECT_HALF) < 0.01
    base_on_table = abs(base[2] - OBJECT_HALF) < 0.01
    return bool(aligned and on_top and base_on_table and s.grasped != task.target_object)


_SUCCESS = {
    "press": _press_success,
    "push": _push_success,
    "pick_place": _pick_place_success,
    "stack": _stack_success,
}

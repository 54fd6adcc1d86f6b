"""Labelled frames of the embedded tabletop: RGB + MuJoCo segmentation -> per-patch targets.

A `SceneSampler` resets the embedded env with a seed (the same scenes the suite's seeds give),
optionally moves the gripper / lifts or stacks an object / presses a button / jitters camera
and lighting, and renders the agent view twice from the same camera: RGB and segmentation
(`mujoco.Renderer.enable_segmentation_rendering`, per pixel (objid, objtype)). Geom ids map to
*entities* (background, table, gripper, each fixture, each object), entities to *classes*
(fixture kind x colour, object colour x shape, ...). `patch_labels` turns an entity map into
one label per ViT patch: which thing it shows, and where that thing's centre is relative to the
patch centre (sub-patch offset) and how high it is.

Used by `sim.pretrain_vision` (dense pretraining of the ViT pair) and by the grounding
objective of `sim.train` (which patches hold the instruction's target and goal).
"""

from __future__ import annotations

import atexit
import os
import weakref
from dataclasses import dataclass

os.environ.setdefault("MUJOCO_GL", "egl")  # headless; must precede `import mujoco`
import mujoco  # noqa: E402
import numpy as np  # noqa: E402

from sim.envs.embedded import EmbeddedEnv  # noqa: E402
from sim.envs.embedded.scene import (  # noqa: E402
    BUTTON_TRAVEL,
    FINGER_TRAVEL,
    HIDDEN_GROUP,
    OBJECT_HALF,
    SHAPES,
)
from sim.envs.embedded.tasks import COLOR_NAMES  # noqa: E402

FIXTURE_KINDS = ("button", "pad", "plate")
CLASS_BACKGROUND, CLASS_TABLE, CLASS_GRIPPER = 0, 1, 2
FIXTURE_CLASS0 = 3  # + kind * len(COLORS) + colour
OBJECT_CLASS0 = FIXTURE_CLASS0 + len(FIXTURE_KINDS) * len(COLOR_NAMES)  # + colour * 3 + shape
N_CLASSES = OBJECT_CLASS0 + len(COLOR_NAMES) * len(SHAPES)  # 39
ENT_BACKGROUND, ENT_TABLE, ENT_GRIPPER = 0, 1, 2  # then fixtures, then objects
MIN_FRACTION = 0.08  # a thing labels a patch when it covers >= 8% of it (a 5 cm object ~ 1 patch)
HEIGHT_SCALE = 10.0  # metres -> ~[0, 3] for the regression target


def fixture_class(kind: str, color: str) -> int:
    return FIXTURE_CLASS0 + FIXTURE_KINDS.index(kind) * len(COLOR_NAMES) + COLOR_NAMES.index(color)


def object_class(color: str, shape: str) -> int:
    return OBJECT_CLASS0 + COLOR_NAMES.index(color) * len(SHAPES) + SHAPES.index(shape)


@dataclass
class Frame:
    """One labelled frame: image uint8 [H, W, 3], entity per pixel uint8 [H, W], and per entity
    its class, projected centre (u = column, v = row, pixels) and height (metres)."""

    image: np.ndarray
    entities: np.ndarray
    ent_class: np.ndarray  # int64 [E]
    ent_uv: np.ndarray  # float32 [E, 2]
    ent_z: np.ndarray  # float32 [E]
    family: str
    seed: int
    instruction: str
    target: int  # entity index of the thing to move (press: the button)
    goal: int  # entity index of where it goes (press: the button; stack: the base object)
    ent_xy: np.ndarray | None = None  # float32 [E, 2] world x, y (metres; probes, not training)


def patch_labels(
    entities: np.ndarray,
    ent_class: np.ndarray,
    ent_uv: np.ndarray,
    ent_z: np.ndarray,
    grid: int,
    min_fraction: float = MIN_FRACTION,
) -> dict[str, np.ndarray]:
    """Per patch of a grid x grid split (row-major, as the ViT's patches): `entity` (a thing
    covering >= min_fraction of the patch: objects first, then the gripper, then fixtures, the
    most pixels within a kind; else the more common of table/background), `cls`, `offset`
    [P, 2] (the entity's projected centre minus the patch centre, in patch widths, clipped to
    +-1.5), `height` [P] (scaled) and `reg_mask` [P] (True where offset/height are meaningful:
    gripper, fixtures, objects)."""
    h, w = entities.shape
    ph, pw = h // grid, w // grid
    n_ent = len(ent_class)
    blocks = entities[: ph * grid, : pw * grid].reshape(grid, ph, grid, pw).transpose(0, 2, 1, 3)
    flat = blocks.reshape(grid * grid, ph * pw).astype(np.int64)
    counts = np.zeros((grid * grid, n_ent), dtype=np.int64)
    np.add.at(counts, (np.repeat(np.arange(grid * grid), ph * pw), flat.ravel()), 1)
    # Priority objects > gripper > fixtures: a 5 cm object in front of a plate or a button is
    # what the patch must say (it is what the policy has to find); most pixels within a tier.
    tier = np.where(ent_class >= OBJECT_CLASS0, 3, np.where(ent_class == CLASS_GRIPPER, 2, 1))
    tier[[ENT_BACKGROUND, ENT_TABLE]] = 0
    eligible = (counts >= min_fraction * ph * pw) & (tier > 0)
    score = np.where(eligible, tier * (ph * pw + 1) + counts, -1)
    best = score.argmax(1)
    is_thing = eligible.any(1)
    ent = np.where(is_thing, best, counts[:, [ENT_BACKGROUND, ENT_TABLE]].argmax(1))
    rows, cols = np.divmod(np.arange(grid * grid), grid)
    centre = np.stack([(cols + 0.5) * pw, (rows + 0.5) * ph], axis=1)
    offset = np.clip((ent_uv[ent] - centre) / np.array([pw, ph]), -1.5, 1.5)
    return {
        "entity": ent,
        "cls": ent_class[ent],
        "offset": offset.astype(np.float32),
        "height": (ent_z[ent] * HEIGHT_SCALE).astype(np.float32),
        "reg_mask": is_thing,
    }


def entity_patches(
    labels: dict[str, np.ndarray], entity: int, uv: np.ndarray, grid: int, size: int
) -> np.ndarray:
    """Boolean [P]: the patches labelled with `entity`; if none (hidden behind the gripper),
    the patch its projected centre falls in."""
    hit = labels["entity"] == entity
    if not hit.any():
        col = int(np.clip(uv[0] * grid / size, 0, grid - 1))
        row = int(np.clip(uv[1] * grid / size, 0, grid - 1))
        hit[row * grid + col] = True
    return hit


_LIVE: weakref.WeakSet[SceneSampler] = weakref.WeakSet()


@atexit.register
def _close_live() -> None:
    # Free GL contexts before EGL itself is torn down (a run stopped by an exception).
    for sampler in list(_LIVE):
        sampler.close()


class SceneSampler:
    """Renders labelled frames of one family's scenes; reuse it for many seeds, then close()."""

    def __init__(self, family: str, size: int = 128):
        # A 16 px env: its own reset-time render is cheap; we render at `size` ourselves.
        self.env = env = EmbeddedEnv(family, image_size=16)
        self.family, self.size = family, size
        m = env.model
        m.vis.global_.offwidth = max(m.vis.global_.offwidth, size)
        m.vis.global_.offheight = max(m.vis.global_.offheight, size)
        self.rgb = mujoco.Renderer(m, size, size)
        self.seg = mujoco.Renderer(m, size, size)
        self.seg.enable_segmentation_rendering()
        for r in (self.rgb, self.seg):
            for flag in (mujoco.mjtRndFlag.mjRND_SHADOW, mujoco.mjtRndFlag.mjRND_REFLECTION):
                r.scene.flags[flag] = 0
        self.option = mujoco.MjvOption()
        self.option.geomgroup[HIDDEN_GROUP] = 0
        self.cam = m.camera("agentview").id
        self.base = {
            "cam_pos": m.cam_pos[self.cam].copy(),
            "cam_quat": m.cam_quat[self.cam].copy(),
            "light_diffuse": m.light_diffuse.copy(),
            "light_dir": m.light_dir.copy(),
            "head_ambient": m.vis.headlight.ambient.copy(),
            "head_diffuse": m.vis.headlight.diffuse.copy(),
        }
        self._geom_entity = self._map_geoms()
        self._closed = False
        _LIVE.add(self)

    def _map_geoms(self) -> np.ndarray:
        """geom id -> entity index (objects' and fixtures' geoms by their body)."""
        m, env = self.env.model, self.env
        out = np.zeros(m.ngeom + 1, dtype=np.uint8)  # last slot: "no geom" (-1)
        n_fix = env.family.n_fixtures
        body_entity = {m.body("gripper").id: ENT_GRIPPER}
        for name in ("finger_left", "finger_right"):
            body_entity[m.body(name).id] = ENT_GRIPPER
        for i, b in enumerate(env._fix_body):
            body_entity[b] = 3 + i
            for child in range(m.nbody):  # the button cap is a child body
                if m.body_parentid[child] == b:
                    body_entity[child] = 3 + i
        for i, b in enumerate(env._obj_body):
            body_entity[b] = 3 + n_fix + i
        for g in range(m.ngeom):
            out[g] = body_entity.get(int(m.geom_bodyid[g]), ENT_BACKGROUND)
        out[m.geom("table").id] = ENT_TABLE
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        _LIVE.discard(self)
        for r in (self.rgb, self.seg):
            ctx = getattr(r, "_gl_context", None)
            if ctx is not None:
                ctx.make_current()
            r.close()
        self.env.close()

    def frame(
        self,
        seed: int,
        rng: np.random.Generator | None = None,
        jitter: bool = False,
        home: bool = False,
    ) -> Frame:
        """The scene of `seed`. With `rng`: a random gripper pose / opening and (object
        families) sometimes a lifted or stacked object or a pressed button; home=True keeps the
        episode's first-frame gripper. jitter: random camera pose and lighting."""
        env = self.env
        env.reset(seed=seed)
        task = env.task_instance
        m, d = env.model, env.data
        if rng is not None and not home:
            self._randomize_state(rng)
        self._set_view(rng if jitter else None)
        mujoco.mj_forward(m, d)
        self.rgb.update_scene(d, camera=self.cam, scene_option=self.option)
        image = self.rgb.render()
        self.seg.update_scene(d, camera=self.cam, scene_option=self.option)
        seg = self.seg.render()
        geom = np.where(seg[..., 1] == int(mujoco.mjtObj.mjOBJ_GEOM), seg[..., 0], -1)
        entities = self._geom_entity[geom]  # -1 indexes the "no geom" slot
        n_fix = len(task.fixtures)
        cls = [CLASS_BACKGROUND, CLASS_TABLE, CLASS_GRIPPER]
        pos = [np.zeros(3), np.zeros(3), env.ee_pos]
        for i, f in enumerate(task.fixtures):
            cls.append(fixture_class(env.family.fixture_kind, f.color))
            top = env.button_top(i) if env.family.fixture_kind == "button" else (*f.xy, 0.0)
            pos.append(np.asarray(top, dtype=np.float64))
        for i, o in enumerate(task.objects):
            cls.append(object_class(o.color, o.shape))
            pos.append(env.object_pos(i))
        pos_arr = np.asarray(pos)
        uv = self.project(pos_arr)
        if task.target_object is None:  # press: the button is both target and goal
            target = goal = 3 + task.target_fixture
        else:
            target = 3 + n_fix + task.target_object
            goal = (
                3 + task.target_fixture
                if task.base_object is None
                else 3 + n_fix + task.base_object
            )
        self._set_view(None)  # leave the model as the env had it
        return Frame(
            image.copy(),
            entities,
            np.asarray(cls, dtype=np.int64),
            uv.astype(np.float32),
            pos_arr[:, 2].astype(np.float32),
            self.family,
            seed,
            task.instruction,
            target,
            goal,
            pos_arr[:, :2].astype(np.float32),
        )

    def project(self, points: np.ndarray) -> np.ndarray:
        """World points [N, 3] -> pixel (column, row) [N, 2] in the agent view (after a forward)."""
        d = self.env.data
        cam_pos, rot = d.cam_xpos[self.cam], d.cam_xmat[self.cam].reshape(3, 3)
        local = (points - cam_pos) @ rot  # camera frame: x right, y up, looking along -z
        f = 0.5 * self.size / np.tan(np.deg2rad(self.env.model.cam_fovy[self.cam]) / 2)
        depth = np.maximum(-local[:, 2], 1e-6)
        u = 0.5 * self.size + f * local[:, 0] / depth
        v = 0.5 * self.size - f * local[:, 1] / depth
        return np.stack([u, v], axis=1)

    def _randomize_state(self, rng: np.random.Generator) -> None:
        env, d = self.env, self.env.data
        task = env.task_instance
        anchors = [f.xy for f in task.fixtures] + [o.xy for o in task.objects]
        r = rng.random()
        if r < 0.45 and anchors:  # approaching something: low, near a thing
            ax, ay = anchors[rng.integers(len(anchors))]
            xyz = (ax + rng.normal(0, 0.03), ay + rng.normal(0, 0.03), rng.uniform(0.03, 0.14))
        else:  # anywhere in the workspace
            xyz = (rng.uniform(-0.3, 0.3), rng.uniform(-0.3, 0.3), rng.uniform(0.03, 0.28))
        adr = env._gripper_qadr
        d.qpos[adr : adr + 7] = (*xyz, 1.0, 0.0, 0.0, 0.0)
        opening = rng.uniform(0, FINGER_TRAVEL)
        n_obj = len(task.objects)
        if n_obj and rng.random() < 0.3:  # an object held between the fingers
            i = int(rng.integers(n_obj))
            lift = (xyz[0], xyz[1], max(xyz[2], OBJECT_HALF + 0.005))
            d.qpos[adr : adr + 3] = lift
            d.qpos[env._obj_qadr[i] : env._obj_qadr[i] + 3] = lift
            opening = 0.012
        elif n_obj >= 2 and rng.random() < 0.25:  # one object on top of another
            i, j = rng.choice(n_obj, 2, replace=False)
            base = d.qpos[env._obj_qadr[j] : env._obj_qadr[j] + 2].copy()
            d.qpos[env._obj_qadr[i] : env._obj_qadr[i] + 3] = (*base, 3 * OBJECT_HALF)
        for a in env._finger_qadr:
            d.qpos[a] = opening
        for a in env._button_qadr:
            if rng.random() < 0.3:
                d.qpos[a] = -rng.uniform(0, BUTTON_TRAVEL)

    def _set_view(self, rng: np.random.Generator | None) -> None:
        m, b = self.env.model, self.base
        m.cam_pos[self.cam] = b["cam_pos"]
        m.cam_quat[self.cam] = b["cam_quat"]
        m.light_diffuse[:] = b["light_diffuse"]
        m.light_dir[:] = b["light_dir"]
        m.vis.headlight.ambient[:] = b["head_ambient"]
        m.vis.headlight.diffuse[:] = b["head_diffuse"]
        if rng is None:
            return
        # Small: the policy always sees the fixed camera; this is robustness, not a new view.
        m.cam_pos[self.cam] = b["cam_pos"] + rng.normal(0, 0.01, 3)
        axis = rng.normal(0, 1, 3)
        quat = np.zeros(4)
        mujoco.mju_axisAngle2Quat(quat, axis / np.linalg.norm(axis), np.deg2rad(rng.normal(0, 1.5)))
        out = np.zeros(4)
        mujoco.mju_mulQuat(out, b["cam_quat"], quat)
        m.cam_quat[self.cam] = out
        m.light_diffuse[:] = b["light_diffuse"] * rng.uniform(0.7, 1.3)
        m.light_dir[:] = b["light_dir"] + rng.normal(0, 0.15, b["light_dir"].shape)
        m.vis.headlight.ambient[:] = b["head_ambient"] * rng.uniform(0.75, 1.25)
        m.vis.headlight.diffuse[:] = b["head_diffuse"] * rng.uniform(0.75, 1.25)

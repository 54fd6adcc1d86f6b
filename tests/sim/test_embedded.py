"""Tests of the embedded MuJoCo tabletop suite, its experts and the demo dataset."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

pytest.importorskip("mujoco")
pytest.importorskip("gymnasium")

from sim.demos import DemoConfig, DemoDatasetError, generate_demos, load_demos  # noqa: E402
from sim.envs import list_tasks, make_env  # noqa: E402
from sim.envs.embedded import EmbeddedConfig, EmbeddedEnv  # noqa: E402
from sim.envs.embedded.scene import TABLE_HALF, object_geom_name  # noqa: E402
from sim.envs.embedded.tasks import COLOR_NAMES, MIN_SEP  # noqa: E402
from sim.experts import expert_for  # noqa: E402

pytestmark = pytest.mark.sim

FAMILIES = ["press", "push", "pick_place", "stack"]
SMALL = 32  # image size for tests that do not look at images


@pytest.fixture(scope="module")
def envs():
    """One env per family at the default image size, shared by the module's tests."""
    made = {family: make_env("embedded", family) for family in FAMILIES}
    yield made
    for env in made.values():
        env.close()


def _run_expert(env: EmbeddedEnv, seed: int, style: str = "smooth") -> dict:
    obs, info = env.reset(seed=seed)
    expert = expert_for(env, style=style)
    for _ in range(env.max_episode_steps):
        obs, _, terminated, truncated, info = env.step(expert(obs))
        if terminated or truncated:
            break
    return info


def test_registry_lists_and_rejects():
    assert list_tasks("embedded") == FAMILIES
    with pytest.raises(ValueError, match="unknown suite"):
        make_env("nope", "press")
    with pytest.raises(ValueError, match="unknown task"):
        make_env("embedded", "juggle")


@pytest.mark.parametrize("family", FAMILIES)
def test_reset_step_render(envs, family):
    env = envs[family]
    obs, info = env.reset(seed=0)
    assert set(obs) == {"image", "instruction", "state"}
    assert obs["image"].shape == (128, 128, 3) and obs["image"].dtype == np.uint8
    assert obs["image"].std() > 10  # something was drawn
    assert obs["state"].shape == (4,) and obs["state"].dtype == np.float32
    assert isinstance(obs["instruction"], str)
    assert any(color in obs["instruction"] for color in COLOR_NAMES)
    assert info["success"] is False
    assert env.observation_space.contains(obs)

    action = np.array([0.01, -0.01, -0.01, 0.0, 0.0, 0.0, 1.0], dtype=np.float32)
    obs2, reward, terminated, truncated, info = env.step(action)
    assert obs2["image"].shape == (128, 128, 3) and obs2["image"].dtype == np.uint8
    assert isinstance(info["success"], bool) and isinstance(reward, float)
    assert not truncated
    assert np.array_equal(env.render(), obs2["image"])
    assert obs2["state"][2] < obs["state"][2]  # moved down
    assert obs2["state"][3] < obs["state"][3]  # gripper closing


def test_image_size_and_wrist_camera():
    env = make_env("embedded", "pick_place", image_size=64, wrist_image=True)
    try:
        obs, _ = env.reset(seed=3)
        assert obs["image"].shape == (64, 64, 3)
        assert obs["wrist_image"].shape == (64, 64, 3) and obs["wrist_image"].dtype == np.uint8
        assert not np.array_equal(obs["image"], obs["wrist_image"])
    finally:
        env.close()
        env.close()  # closing twice is fine


@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_same_scene(envs, family):
    env = envs[family]
    obs_a, _ = env.reset(seed=123)
    scene_a = env.task_instance
    for _ in range(3):  # disturb the state before resetting again
        env.step(np.array([0.03, 0.03, -0.03, 0, 0, 0, 1.0]))
    obs_b, _ = env.reset(seed=123)
    assert env.task_instance == scene_a
    assert obs_a["instruction"] == obs_b["instruction"]
    assert np.array_equal(obs_a["image"], obs_b["image"])
    assert np.array_equal(obs_a["state"], obs_b["state"])

    other = EmbeddedEnv(family)  # a fresh env instance agrees too
    try:
        obs_c, _ = other.reset(seed=123)
        assert np.array_equal(obs_a["image"], obs_c["image"])
    finally:
        other.close()


@pytest.mark.parametrize("family", FAMILIES)
def test_different_seeds_different_scenes(envs, family):
    env = envs[family]
    scenes, images, instructions = [], [], set()
    for seed in range(6):
        obs, _ = env.reset(seed=seed)
        scenes.append(env.task_instance)
        images.append(obs["image"])
        instructions.add(obs["instruction"])
    for a, b in itertools.combinations(range(6), 2):
        assert scenes[a] != scenes[b]
        assert not np.array_equal(images[a], images[b])
    assert len(instructions) > 1  # target attributes vary with the seed


@pytest.mark.parametrize("family", FAMILIES)
def test_scene_has_distractors_and_unique_target(envs, family):
    env = envs[family]
    for seed in range(10):
        env.reset(seed=seed)
        task = env.task_instance
        attrs = [(o.color, o.shape) for o in task.objects]
        assert len(set(attrs)) == len(attrs)  # every object is named uniquely
        colors = [f.color for f in task.fixtures]
        assert len(set(colors)) == len(colors)
        if family == "press":
            assert len(task.fixtures) >= 3  # target + at least 2 distractor buttons
        else:
            assert len(task.objects) - (2 if family == "stack" else 1) >= 2
        xys = [(o.xy, "object") for o in task.objects] + [(f.xy, "fixture") for f in task.fixtures]
        for (p, kp), (q, kq) in itertools.combinations(xys, 2):
            assert np.hypot(p[0] - q[0], p[1] - q[1]) >= MIN_SEP[tuple(sorted((kp, kq)))] - 1e-9


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros(6),
        np.zeros((7, 1)),
        np.array([np.nan, 0, 0, 0, 0, 0, 0]),
        np.array([0, 0, np.inf, 0, 0, 0, 1]),
        "close",
    ],
)
def test_bad_actions_raise(envs, bad):
    env = envs["press"]
    env.reset(seed=0)
    with pytest.raises(ValueError, match="action"):
        env.step(bad)


def test_step_before_reset_raises():
    env = EmbeddedEnv("press", image_size=SMALL)
    try:
        with pytest.raises(RuntimeError, match="reset"):
            env.step(np.zeros(7))
    finally:
        env.close()


def test_rotation_ignored_and_deltas_clipped(envs):
    env = envs["push"]
    env.reset(seed=5)
    env.step(np.array([0.5, 0, 0, 1.0, -1.0, 2.0, 0.0]))  # 0.5 m is clipped to max_delta
    after_big = env.ee_pos
    env.reset(seed=5)
    env.step(np.array([env.config.max_delta, 0, 0, 0, 0, 0, 0.0]))
    np.testing.assert_allclose(env.ee_pos, after_big, atol=1e-9)


def test_truncates_at_step_limit():
    env = EmbeddedEnv("press", image_size=SMALL, max_steps=5)
    try:
        env.reset(seed=0)
        flags = [env.step(np.zeros(7))[2:4] for _ in range(5)]
        assert flags[:4] == [(False, False)] * 4
        assert flags[4] == (False, True)
    finally:
        env.close()


@pytest.mark.parametrize("style", ["smooth", "gated"])
@pytest.mark.parametrize("family", FAMILIES)
def test_expert_solves_family(family, style):
    env = EmbeddedEnv(family, image_size=SMALL)
    try:
        successes = [_run_expert(env, seed, style)["success"] for seed in range(20)]
    finally:
        env.close()
    assert sum(successes) >= 18, f"{family} ({style}): expert solved {sum(successes)}/20"


def test_expert_style_is_checked():
    env = EmbeddedEnv("press", image_size=SMALL)
    try:
        with pytest.raises(ValueError, match="unknown expert style"):
            expert_for(env, style="jerky")
    finally:
        env.close()


def test_smooth_expert_forgives_a_centimetre_where_the_gated_one_hovers():
    # Why the smooth experts exist: with every object seen 1 cm off (per-episode bias) the gated
    # expert waits for a 5 mm xy match that never comes; the funnel descends and grasps anyway.
    # Measured over seeds 0-19: gated 3/20, smooth 19/20 (bench/results/embedded-expert-noise.md).
    from sim.expert_noise import success_rate

    seeds = range(8)
    gated = success_rate("pick_place", "gated", 0.01, 0.005, seeds)
    smooth = success_rate("pick_place", "smooth", 0.01, 0.005, seeds)
    assert smooth >= gated + 0.25, (gated, smooth)


def test_expert_noise_diversifies_but_still_solves():
    env = EmbeddedEnv("pick_place", image_size=SMALL)
    try:
        env.reset(seed=11)
        clean = expert_for(env)(None)
        noisy = expert_for(env, noise_std=0.005, seed=0)(None)
        assert not np.allclose(clean, noisy) and clean[6] == noisy[6]
        wins = 0
        for seed in range(5):
            obs, _ = env.reset(seed=seed)
            expert = expert_for(env, noise_std=0.005, seed=seed)
            for _ in range(env.max_episode_steps):
                obs, _, terminated, truncated, info = env.step(expert(obs))
                if terminated or truncated:
                    break
            wins += info["success"]
        assert wins >= 4
    finally:
        env.close()


def test_expert_terminates_on_success(envs):
    info = _run_expert(envs["press"], seed=1)
    assert info["success"] and info["steps"] <= envs["press"].max_episode_steps


def test_demos_roundtrip(tmp_path):
    cfg = DemoConfig(
        out_dir=tmp_path / "demos",
        tasks=("press", "pick_place"),
        episodes_per_task=2,
        env=EmbeddedConfig(image_size=SMALL),
    )
    records = generate_demos(cfg)
    assert len(records) == 4
    lines = (cfg.out_dir / "manifest.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == records
    assert all(r["seed"] >= 1_000_000 for r in records)

    episodes = list(load_demos(cfg.out_dir))
    assert [e.family for e in episodes] == ["press", "press", "pick_place", "pick_place"]
    for ep, rec in zip(episodes, records, strict=True):
        assert ep.success and ep.seed == rec["seed"] and ep.instruction == rec["instruction"]
        assert ep.images.dtype == np.uint8 and ep.images.shape[1:] == (SMALL, SMALL, 3)
        assert ep.actions.dtype == np.float32 and ep.actions.shape == (len(ep), 7)
        assert ep.states.shape == (len(ep), 4)
    assert len(list(load_demos(cfg.out_dir, tasks=["press"]))) == 2

    # Replaying the stored actions from the same seed reproduces the stored episode.
    ep = episodes[2]
    env = EmbeddedEnv("pick_place", image_size=SMALL)
    try:
        obs, _ = env.reset(seed=ep.seed)
        for t, action in enumerate(ep.actions):
            assert np.array_equal(obs["image"], ep.images[t])
            obs, _, terminated, _, info = env.step(action)
        assert terminated and info["success"]
    finally:
        env.close()

    with pytest.raises(FileExistsError):
        generate_demos(cfg)


def test_demo_seeds_must_not_overlap_eval(tmp_path):
    with pytest.raises(ValueError, match="eval seeds"):
        generate_demos(DemoConfig(out_dir=tmp_path, seed_start=0))


def test_load_demos_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(load_demos(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="manifest"):
        list(load_demos(tmp_path))

    cfg = DemoConfig(
        out_dir=tmp_path / "d", tasks=("press",), episodes_per_task=2, env=EmbeddedConfig(SMALL)
    )
    records = generate_demos(cfg)
    first, second = (cfg.out_dir / r["file"] for r in records)

    second.write_bytes(b"not a zip file")
    with pytest.raises(DemoDatasetError, match="corrupt"):
        list(load_demos(cfg.out_dir))

    second.unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        list(load_demos(cfg.out_dir))

    with open(cfg.out_dir / "manifest.jsonl", "a") as f:
        f.write("{broken json\n")
    with pytest.raises(DemoDatasetError, match="manifest"):
        list(load_demos(cfg.out_dir))
    assert first.exists()


def _visible_geoms(env: EmbeddedEnv) -> set[int]:
    """Geom ids drawn in the agent view (segmentation render, hidden groups excluded)."""
    import mujoco

    with mujoco.Renderer(env.model, 64, 64) as renderer:
        renderer.enable_segmentation_rendering()
        option = mujoco.MjvOption()
        option.geomgroup[:] = 1
        option.geomgroup[5] = 0  # HIDDEN_GROUP, as the env's own renders
        renderer.update_scene(env.data, camera="agentview", scene_option=option)
        seg = renderer.render()
    return {int(g) for g, kind in seg.reshape(-1, 2) if kind == mujoco.mjtObj.mjOBJ_GEOM}


@pytest.mark.parametrize("family", ["pick_place", "stack"])
def test_without_distractors_same_task_only_target_objects(family):
    """The diagnostic ablation: same seed, same task; the other objects are gone from view and
    from the table; the expert still solves it."""
    full = EmbeddedEnv(family, image_size=SMALL)
    bare = EmbeddedEnv(family, image_size=SMALL, distractors=False)
    try:
        for seed in range(3):
            obs_full, _ = full.reset(seed=seed)
            obs_bare, _ = bare.reset(seed=seed)
            task = bare.task_instance
            assert task == full.task_instance and obs_bare["instruction"] == obs_full["instruction"]
            assert not np.array_equal(obs_bare["image"], obs_full["image"])
            kept = {task.target_object, task.base_object} - {None}
            shown = _visible_geoms(bare)
            for i, obj in enumerate(task.objects):
                geom = bare.model.geom(object_geom_name(i, obj.shape)).id
                assert (geom in shown) == (i in kept)
                on_table = np.abs(bare.object_pos(i)[:2]).max() < TABLE_HALF
                assert on_table == (i in kept)
            assert _run_expert(bare, seed)["success"]
            assert all(np.abs(bare.object_pos(i)[:2]).max() > 1 for i in range(3) if i not in kept)
    finally:
        full.close()
        bare.close()

"""Domain pretraining of the ViT pair (sim.pretrain_vision), its segmentation labels
(sim.seglabels) and the grounding objective / --init-vision of sim.train (sim.grounding)."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import vla_prune
from sim import pretrain_vision as pv
from sim import train as train_mod
from sim.demos import DemoConfig, generate_demos
from sim.grounding import MASK_ROLES, GroundingScenes, grounding_loss
from sim.seglabels import (
    CLASS_TABLE,
    OBJECT_CLASS0,
    SceneSampler,
    entity_patches,
    fixture_class,
    object_class,
    patch_labels,
)

pytestmark = pytest.mark.sim


def test_patch_at_a_known_objects_projected_centre_gets_its_class():
    """Each object's projected centre lands on its own pixels, and the patch there is labelled
    with its colour x shape; target/goal entities are the instruction's."""
    sampler = SceneSampler("pick_place")
    try:
        f = sampler.frame(1_000_123)  # the episode's first frame, no jitter
        task = sampler.env.task_instance
    finally:
        sampler.close()
    lab = patch_labels(f.entities, f.ent_class, f.ent_uv, f.ent_z, grid=8)
    n_fix = len(task.fixtures)
    for i, obj in enumerate(task.objects):
        e = 3 + n_fix + i
        u, v = f.ent_uv[e]
        assert f.entities[int(v), int(u)] == e  # nothing hides an object at the first frame
        patch = int(v) // 16 * 8 + int(u) // 16
        assert lab["cls"][patch] == object_class(obj.color, obj.shape)
        assert lab["reg_mask"][patch] and np.all(np.abs(lab["offset"][patch]) <= 0.5)
        assert lab["height"][patch] == pytest.approx(0.25, abs=0.01)  # 2.5 cm, scaled x10
    assert f.ent_class[f.target] == object_class(*task.objects[task.target_object].name.split())
    goal = task.fixtures[task.target_fixture]
    assert f.ent_class[f.goal] == fixture_class("plate", goal.color)
    assert task.objects[task.target_object].name in f.instruction
    assert (lab["cls"] == CLASS_TABLE).mean() > 0.5  # most of the view is table
    # the target's patches are exactly the ones labelled with it
    hit = entity_patches(lab, f.target, f.ent_uv[f.target], 8, 128)
    assert hit.any() and (lab["cls"][hit] >= OBJECT_CLASS0).all()


def _pcfg(out, **kw):
    base = dict(
        out=str(out),
        steps=30,
        batch_size=8,
        lr=2e-3,
        warmup=2,
        buffer_size=64,
        initial_frames=32,
        refresh=2,
        heldout_frames=8,
        log_every=1,
        eval_every=15,
        save_every=15,
    )
    return pv.PretrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain")
    pv.pretrain(_pcfg(out, export_dir=str(out / "exported"), export_every_min=0.0))
    return out


def test_pretraining_loss_falls_and_is_logged(pretrained):
    recs = [json.loads(line) for line in (pretrained / "pretrain_log.jsonl").open()]
    losses = [r["loss"] for r in recs if "loss" in r]
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])
    held = [r["heldout"] for r in recs if "heldout" in r]
    assert len(held) == 2 and 0 <= held[-1]["patch_acc"] <= 1
    exported = pretrained / "exported"
    for name in ("vision_backbone.safetensors", "train_state.pt", "pretrain_log.jsonl"):
        assert (exported / name).exists()


def test_pretraining_resumes_from_the_saved_step(pretrained, tmp_path):
    import shutil

    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copyfile(pretrained / "exported" / "train_state.pt", out / "train_state.pt")
    pv.pretrain(_pcfg(out, steps=35))  # more steps is an operational change: allowed
    state = torch.load(out / "train_state.pt", weights_only=True)
    assert state["step"] == 35
    steps = [json.loads(line)["step"] for line in (out / "pretrain_log.jsonl").open()]
    assert steps[0] == 31  # continued, not restarted
    with pytest.raises(ValueError, match="different config"):
        pv.pretrain(_pcfg(out, steps=40, lr=1e-4))


def test_init_vision_loads_the_weights_and_rejects_another_preset(pretrained):
    path = pretrained / "exported" / "vision_backbone.safetensors"
    policy = vla_prune.build_policy("tiny-openvla-112", seed=3)
    pv.load_vision_backbone(policy.model.vision_backbone, path)
    state = torch.load(pretrained / "train_state.pt", weights_only=True)["backbone"]
    got = policy.model.vision_backbone.state_dict()
    assert all(torch.equal(got[k], v) for k, v in state.items())
    with pytest.raises(ValueError, match="does not fit"):
        pv.load_vision_backbone(vla_prune.build_policy("tiny-openvla").model.vision_backbone, path)
    with pytest.raises(FileNotFoundError):
        pv.load_vision_backbone(policy.model.vision_backbone, pretrained / "nope.safetensors")
    pv.export_from_state(pretrained, pretrained / "again")  # e.g. before stopping a run
    again = load_file(str(pretrained / "again" / "vision_backbone.safetensors"))
    assert all(torch.equal(again[k], v) for k, v in state.items())


def test_grounding_loss_prefers_the_labelled_patches():
    masks = torch.zeros(1, 2, 64, dtype=torch.bool)
    masks[0, 0, 5] = masks[0, 1, 9] = masks[0, 1, 10] = True
    right = torch.zeros(1, 2, 64)
    right[0, 0, 5] = right[0, 1, 9] = 8.0
    wrong = torch.zeros(1, 2, 64)
    wrong[0, :, 30] = 8.0
    loss_r, acc_r = grounding_loss(right, masks)
    loss_w, acc_w = grounding_loss(wrong, masks)
    assert loss_r < loss_w and acc_r == 1.0 and acc_w == 0.0


def test_bc_with_init_vision_and_grounding_logs_and_resumes_exactly(pretrained, tmp_path):
    demos = tmp_path / "demos"
    generate_demos(DemoConfig(out_dir=demos, tasks=("press",), episodes_per_task=2))
    init = str(pretrained / "exported" / "vision_backbone.safetensors")

    def cfg(out, **kw):
        base = dict(
            data=str(demos),
            out=str(out),
            preset="tiny-openvla-112",
            batch_size=4,
            steps=6,
            warmup=1,
            log_every=1,
            save_every=3,
            threads=1,
            init_vision=init,
            ground_weight=1.0,
            ground_batch=4,
            ground_heldout=8,
            attn_weight=1.0,  # the query-attention objective rides on the grounding scenes
            pos_weight=1.0,  # and the position loss shares the action loss's vision pass
            offset_weight=1.0,  # the sub-patch offsets come from the grounding scenes' labels
            readout_weight=1.0,  # and the world positions the query must read
        )
        return train_mod.TrainConfig(**{**base, **kw})

    run_a = cfg(tmp_path / "a", export_dir=str(tmp_path / "exp"), export_every_min=0.0)
    ref = vla_prune.load_policy(train_mod.train(run_a)).model.state_dict()
    exported = vla_prune.load_policy(tmp_path / "exp" / "policy").model.state_dict()
    assert all(torch.equal(ref[k], exported[k]) for k in ref)
    heads = load_file(str(tmp_path / "exp" / "heads.safetensors"))
    assert any(k.startswith("ground_head.") for k in heads)
    assert (tmp_path / "exp" / "train_log.jsonl").exists()
    recs = [json.loads(line) for line in (tmp_path / "a/train_log.jsonl").open()]
    assert all("ground_loss" in r for r in recs if "loss" in r)
    masses = [r[f"attn_mass_{role}"] for r in recs if "loss" in r for role in MASK_ROLES]
    assert len(masses) == 3 * 6 and all(0 < m < 1 for m in masses)
    held = [r["ground_heldout"] for r in recs if "ground_heldout" in r]
    assert len(held) == 2 and {"press_target", "stack_goal", "all"} <= set(held[-1])
    state = torch.load(tmp_path / "a/train_state.pt", weights_only=True)
    assert {"ground_head", "pos_head", "offset_head", "readout_head"} <= set(state)
    assert all(r["offset_loss"] > 0 and r["readout_loss"] > 0 for r in recs if "loss" in r)
    # interrupted after the step-3 save: the resumed run ends with the same weights
    calls = {"n": 0}
    real = train_mod._ground_step

    def crashing(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*args, **kw)

    train_mod._ground_step = crashing
    try:
        with pytest.raises(KeyboardInterrupt):
            train_mod.train(cfg(tmp_path / "b"))
    finally:
        train_mod._ground_step = real
    got = vla_prune.load_policy(train_mod.train(cfg(tmp_path / "b"))).model.state_dict()
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    # the exported policy is plain OpenVLA: no grounding head in it
    assert not any("ground" in k for k in got)


def test_grounding_scenes_are_a_function_of_the_step():
    policy = vla_prune.build_policy("tiny-openvla-112")
    scenes = GroundingScenes(policy, families=("push",))
    try:
        a = scenes.for_step(7, 2, seed=0)
        b = scenes.for_step(7, 2, seed=0)
        c = scenes.for_step(8, 2, seed=0)
    finally:
        scenes.close()
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2]) and a[1] == b[1]
    assert not torch.equal(a[0], c[0])
    assert a.masks.shape == (2, 3, 64) and a.masks.any(-1).all()  # target, goal, gripper
    # every patch showing a thing has an offset inside the +-1.5-patch clip
    assert a.offsets.shape == (2, 64, 2) and a.has_thing.any()
    assert a.offsets[a.has_thing].abs().max() <= 1.5
    assert a.xy.shape == (2, 3, 2) and a.xy.abs().max() < 1.0  # metres, on the table

"""The trainer: loss falls on a tiny dataset; an interrupted run resumes to the same weights."""

import json

import pytest
import torch

import vla_prune
from sim import dataset
from sim import train as train_mod
from sim.dataset import normalize
from sim.demos import DemoConfig, generate_demos
from sim.train import TrainConfig, train
from vla_prune.models.openvla import unnormalize

pytestmark = pytest.mark.sim


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    out = tmp_path_factory.mktemp("demos")
    # The gated expert's press labels: the thresholds below were set on them, and what is
    # tested here is the trainer, not which expert style is easier to imitate.
    cfg = DemoConfig(out_dir=out, tasks=("press",), episodes_per_task=3, expert_style="gated")
    generate_demos(cfg)
    return out


def _cfg(demos, out, **kw):
    base = dict(
        data=str(demos),
        out=str(out),
        batch_size=4,
        lr=1e-3,
        warmup=2,
        steps=30,
        log_every=1,
        save_every=10,
        threads=1,
        shift=2,
    )
    return TrainConfig(**{**base, **kw})


def test_loss_falls_and_checkpoint_loads(demos, tmp_path):
    final = train(_cfg(demos, tmp_path / "run"))
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run/train_log.jsonl").open()]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
    policy = vla_prune.load_policy(final)
    assert policy.unnorm_key == "embedded"
    r = policy.step(torch.zeros(128, 128, 3, dtype=torch.uint8).numpy(), "press the red button")
    assert r.actions.shape == (1, 7)
    # the action probe: teacher forced on its own demos, the trained policy's tokens are
    # closer to the expert's than an untrained model's (with the same statistics)
    from sim.probe import action_errors

    trained = action_errors(policy, str(demos), frames_per_family=40)
    fresh = vla_prune.build_policy("tiny-openvla", seed=1)
    fresh.norm_stats, fresh.unnorm_key = policy.norm_stats, policy.unnorm_key
    untrained = action_errors(fresh, str(demos), frames_per_family=40)
    assert set(trained) == {"press"} and trained["press"]["frames"] == 40
    assert len(trained["press"]["bin_error"]) == len(trained["press"]["token_acc"]) == 7
    assert sum(trained["press"]["bin_error"]) < 0.5 * sum(untrained["press"]["bin_error"])


def test_interrupted_run_resumes_to_identical_weights(demos, tmp_path, monkeypatch):
    cfg = _cfg(demos, tmp_path / "a", steps=20, log_every=5)
    ref = vla_prune.load_policy(train(cfg)).model.state_dict()

    calls = {"n": 0}
    real = train_mod.action_loss

    def crashing(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 13:  # after the step-10 save, before the end
            raise KeyboardInterrupt
        return real(*args, **kw)

    cfg_b = _cfg(demos, tmp_path / "b", steps=20, log_every=5)
    monkeypatch.setattr(train_mod, "action_loss", crashing)
    with pytest.raises(KeyboardInterrupt):
        train(cfg_b)
    monkeypatch.setattr(train_mod, "action_loss", real)
    got = vla_prune.load_policy(train(cfg_b)).model.state_dict()
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    with pytest.raises(ValueError, match="different config"):
        train(_cfg(demos, tmp_path / "b", steps=20, lr=5e-4))


def test_normalize_inverts_unnormalize():
    import numpy as np

    actions = np.random.default_rng(0).uniform(-0.03, 0.03, (100, 7)).astype(np.float32)
    actions[:, 3:6] = 0
    actions[:, 6] = np.random.default_rng(1).integers(0, 2, 100)
    stats = dataset.action_stats(actions)
    norm = normalize(actions, stats)
    assert norm.min() >= -1 and norm.max() <= 1
    inside = (actions >= stats["action"]["q01"]) & (actions <= stats["action"]["q99"])
    back = unnormalize(norm, stats["action"])
    assert np.abs(back - actions)[inside].max() < 1e-6
    assert (back[:, 6] == actions[:, 6]).all()  # the gripper passes through


def test_soft_label_loss_is_ordinal():
    from sim.train import soft_label_loss

    first, n = 256, 256
    target = torch.tensor([[300]])

    def peaked(at):  # logits strongly preferring one token of a 512-token vocabulary
        logits = torch.zeros(1, 1, 512)
        logits[0, 0, at] = 10.0
        return logits

    hard = [soft_label_loss(peaked(a), target, first, n, 0.0) for a in (300, 301, 340)]
    soft = [soft_label_loss(peaked(a), target, first, n, 1.5) for a in (300, 301, 340)]
    assert hard[1] == pytest.approx(hard[2])  # one-hot: a near miss is as bad as a far one
    assert soft[0] < soft[1] < soft[2]  # soft targets: it is not
    assert hard[0] < hard[1]


def test_cogact_diffusion_training_loss_falls(demos, tmp_path):
    """The same trainer trains CogACT's DiT head (noise-prediction MSE on 16-step chunks)."""
    cfg = _cfg(demos, tmp_path / "cogact", preset="tiny-cogact", steps=40, lr=2e-3)
    final = train(cfg)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "cogact/train_log.jsonl").open()]
    assert sum(losses[-8:]) / 8 < 0.7 * sum(losses[:8]) / 8
    policy = vla_prune.load_policy(final)
    r = policy.step(torch.zeros(128, 128, 3, dtype=torch.uint8).numpy(), "press the red button")
    assert r.actions.shape == (16, 7)


def test_aux_targets_match_the_scene(demos):
    """The geometry targets are the episode's real scene: the target button's position, in the
    same scaled units as the demos' gripper state."""
    import numpy as np

    from sim.demos import load_demos
    from sim.envs.embedded import EmbeddedEnv

    aux = dataset.aux_targets(str(demos))
    episodes = list(load_demos(demos))
    assert aux.shape == (sum(len(e) for e in episodes), dataset.AUX_DIM)
    env = EmbeddedEnv("press", image_size=16)
    row = 0
    for ep in episodes:
        env.reset(seed=ep.seed)
        task = env.task_instance
        button = np.asarray(task.fixtures[task.target_fixture].xy) * dataset.AUX_SCALE
        block = aux[row : row + len(ep)]
        assert np.allclose(block[:, 4:6], button) and np.allclose(block[:, 6:8], button)
        assert np.allclose(block[:, :3], ep.states[:, :3] * dataset.AUX_SCALE)
        row += len(ep)
    env.close()
    # different seeds put the target button in different places
    assert len({tuple(np.round(aux[i, 4:6], 4)) for i in range(len(aux))}) == len(episodes)


def test_aux_loss_trains_and_is_not_exported(demos, tmp_path):
    cfg = _cfg(demos, tmp_path / "aux", preset="tiny-openvla-112", aux_weight=1.0, steps=30)
    final = train(cfg)
    log = [json.loads(line) for line in (tmp_path / "aux/train_log.jsonl").open()]
    aux = [r["aux_loss"] for r in log]
    assert sum(aux[-5:]) / 5 < 0.8 * sum(aux[:5]) / 5
    policy = vla_prune.load_policy(final)  # plain OpenVLA: the regression head is not saved
    assert policy.config.image_size == 112 and policy.config.num_patches == 64
    state = torch.load(tmp_path / "aux/train_state.pt", weights_only=True)
    assert set(state["aux_head"]) == {"weight", "bias"}
    # the grounding probe reads that head back (3 press scenes, one of 4 buttons each)
    from sim.probe import probe

    got = probe(str(tmp_path / "aux/train_state.pt"), str(demos))
    assert set(got) == {"press"} and got["press"]["episodes"] == 3
    assert 0.0 <= got["press"]["grounded"] <= 1.0 and 0.0 < got["press"]["median_error_m"] < 1.0
    assert 0.0 < got["press"]["median_gripper_xy_error_m"] < 1.0
    train(_cfg(demos, tmp_path / "plain", steps=2))
    with pytest.raises(ValueError, match="no auxiliary head"):
        probe(str(tmp_path / "plain/train_state.pt"), str(demos))


def test_init_heads_continues_every_training_head_and_rejects_a_mismatch(demos, tmp_path):
    from safetensors.torch import load_file, save_file

    heads = dict(aux_weight=1.0, pos_weight=1.0)
    first = _cfg(demos, tmp_path / "a", steps=3, export_dir=str(tmp_path / "exp"), **heads)
    train(first)
    state = torch.load(tmp_path / "a/train_state.pt", weights_only=True)
    exported = load_file(tmp_path / "exp/heads.safetensors")
    # the export holds every head the run trained (it used to keep only aux and grounding)
    assert {k.split(".")[0] for k in exported} == {"aux_head", "pos_head"}
    for source in (tmp_path / "exp/heads.safetensors", tmp_path / "a/train_state.pt"):
        out = tmp_path / f"b-{source.suffix[1:]}"
        # lr 0: one step that saves the state without moving a weight
        train(_cfg(demos, out, steps=1, lr=0.0, init_heads=str(source), **heads))
        got = torch.load(out / "train_state.pt", weights_only=True)
        for name in ("aux_head", "pos_head"):
            for k, v in state[name].items():
                assert torch.equal(got[name][k], v), (source.name, name, k)
    # a misshapen head is an error, not a silent fresh start
    bad = {k: (v[:1] if k == "aux_head.weight" else v) for k, v in exported.items()}
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="aux_head does not fit"):
        train(
            _cfg(
                demos,
                tmp_path / "d",
                steps=1,
                init_heads=str(tmp_path / "bad.safetensors"),
                aux_weight=1.0,
            )
        )


def test_token_position_objective_trains_and_stays_out_of_the_policy(demos, tmp_path):
    cfg = _cfg(demos, tmp_path / "pos", preset="tiny-openvla-112", pos_weight=1.0, steps=20)
    final = train(cfg)
    log = [json.loads(line) for line in (tmp_path / "pos/train_log.jsonl").open()]
    pos = [r["pos_loss"] for r in log if "pos_loss" in r]
    assert len(pos) == 20 and sum(pos[-5:]) / 5 < 0.8 * sum(pos[:5]) / 5
    state = torch.load(tmp_path / "pos/train_state.pt", weights_only=True)
    assert state["pos_head"]["linear.weight"].shape == (2, 256)
    policy = vla_prune.load_policy(final)  # plain OpenVLA: no position head in it
    fresh = vla_prune.build_policy("tiny-openvla-112", seed=0)
    assert set(policy.model.state_dict()) == set(fresh.model.state_dict())


def test_token_offset_loss_counts_only_tokens_that_show_a_thing():
    from sim.token_position import TokenPositionHead, token_offset_loss

    head = TokenPositionHead(8)
    tokens = torch.randn(2, 4, 8)
    offsets = head(tokens).detach().clone()  # a perfect prediction ...
    has_thing = torch.tensor([[True, False, True, False], [False, False, True, False]])
    offsets[~has_thing] = 5.0  # ... except where no thing is shown, which must not count
    assert token_offset_loss(head, tokens, offsets, has_thing).item() == 0.0
    offsets[0, 0] += 1.0
    assert token_offset_loss(head, tokens, offsets, has_thing).item() > 0.0
    assert token_offset_loss(head, tokens, offsets, torch.zeros(2, 4, dtype=torch.bool)) == 0


def test_token_position_probe_tells_position_carrying_tokens_from_blind_ones(demos):
    """`sim.probe --positions`: tokens that are their grid position (one-hot) are read back
    exactly; tokens that are noise, independent of where they sit, are not."""
    from sim.probe import token_positions

    policy = vla_prune.build_policy("tiny-openvla-112", seed=0)
    n = policy.config.num_patches

    class OneHot(torch.nn.Module):
        def forward(self, pixels):
            return torch.eye(n).expand(pixels.shape[0], n, n)

    gen = torch.Generator().manual_seed(0)

    class Noise(torch.nn.Module):  # fresh noise for every frame and token
        def forward(self, pixels):
            return torch.randn(pixels.shape[0], n, 32, generator=gen)

    policy.model.projector = torch.nn.Identity()
    policy.model.vision_backbone = OneHot()
    exact = token_positions(policy, str(demos))
    assert exact["projector"]["exact"] == 1.0 and max(exact["vision"]["row_col_mae_patches"]) < 0.05
    policy.model.vision_backbone = Noise()
    blind = token_positions(policy, str(demos))
    # a blind probe predicts about the mean row / column: MAE near 2 patches on an 8 x 8 grid
    assert min(blind["projector"]["row_col_mae_patches"]) > 1.5
    assert blind["projector"]["exact"] < 0.1


def test_token_offset_probe_tells_offset_carrying_tokens_from_blind_ones(monkeypatch):
    """`sim.probe --offsets`: tokens that hold their thing's sub-patch offset are read back
    to round-off; noise tokens score like the no-information baseline."""
    import sim.probe
    from sim.grounding import GroundingScenes

    policy = vla_prune.build_policy("tiny-openvla-112", seed=0)
    last = {}
    real = GroundingScenes.scenes

    def remembering(self, seeds, rng):
        batch = real(self, seeds, rng)
        last["offsets"] = batch.offsets
        return batch

    monkeypatch.setattr(GroundingScenes, "scenes", remembering)
    gen = torch.Generator().manual_seed(0)

    class Carrying(torch.nn.Module):  # the offsets plus independent noise features
        def forward(self, pixels):
            noise = torch.randn(*last["offsets"].shape[:2], 6, generator=gen)
            return torch.cat([last["offsets"], noise], -1)

    class Noise(torch.nn.Module):
        def forward(self, pixels):
            return torch.randn(*last["offsets"].shape[:2], 8, generator=gen)

    policy.model.projector = torch.nn.Identity()
    policy.model.vision_backbone = Carrying()
    good = sim.probe.token_offsets(policy, scenes_per_family=6)
    assert max(good["projector"]["col_row_mae_patches"]) < 0.01
    policy.model.vision_backbone = Noise()
    blind = sim.probe.token_offsets(policy, scenes_per_family=6)
    base = blind["no_information_mae_patches"]
    assert good["tokens_scored"] > 50 and min(base) > 0.1
    for got, ref in zip(blind["projector"]["col_row_mae_patches"], base):
        assert got > 0.8 * ref


def test_init_from_copies_the_vlm_and_rejects_a_mismatch(tmp_path):
    """CogACT starts from a trained OpenVLA's VLM: every checkpoint tensor is copied, the DiT
    head stays fresh; a checkpoint of another shape is refused by name."""
    src = vla_prune.build_policy("tiny-openvla-112", seed=1)
    src.save(tmp_path / "ovla")
    cogact = vla_prune.build_policy("tiny-cogact-112", seed=0)
    head_before = {
        k: v.clone() for k, v in cogact.model.state_dict().items() if "action_model" in k
    }
    train_mod.init_weights(cogact.model, str(tmp_path / "ovla"))
    got = cogact.model.state_dict()
    for k, v in src.model.state_dict().items():
        assert torch.equal(got[k], v), k
    assert all(torch.equal(got[k], v) for k, v in head_before.items())
    with pytest.raises(ValueError, match="does not fit the model"):
        train_mod.init_weights(vla_prune.build_policy("tiny-cogact").model, str(tmp_path / "ovla"))


def test_frame_stride_keeps_every_kth_frame_with_its_labels(demos, tmp_path):
    """Subsampled frames keep their own action tokens and geometry targets (nothing shifts)."""
    import numpy as np

    from sim.demos import load_demos

    policy = vla_prune.build_policy("tiny-openvla-112")
    full = dataset.DemoBatches(str(demos), policy, _cfg(demos, tmp_path, aux_weight=1.0))
    cfg = _cfg(demos, tmp_path, aux_weight=1.0, frame_stride=3)
    sub = dataset.DemoBatches(str(demos), policy, cfg)
    rows, start = [], 0
    for ep in load_demos(demos):
        rows += [start + t for t in range(ep.seed % 3, len(ep), 3)]
        start += len(ep)
    assert len(sub) == len(rows) < len(full) / 2
    assert np.array_equal(sub.images, full.images[rows])
    assert torch.equal(sub.aux, full.aux[rows])
    # the same actions, discretized with the kept frames' own statistics
    raw = np.concatenate([ep.actions for ep in load_demos(demos)])[rows]
    expect = policy.action_tokenizer.encode(normalize(raw, sub.stats))
    assert np.array_equal(sub.action_tokens.numpy(), expect)
    with pytest.raises(ValueError, match="frame_stride"):
        dataset.DemoBatches(str(demos), policy, _cfg(demos, tmp_path, frame_stride=0))


def test_validation_on_held_out_scenes_is_logged_and_deterministic(demos, tmp_path):
    held_out = tmp_path / "held_out"
    generate_demos(
        DemoConfig(out_dir=held_out, tasks=("press",), episodes_per_task=2, seed_start=1_900_000)
    )
    cfg = _cfg(demos, tmp_path / "v", val_data=str(held_out), val_size=20, aux_weight=1.0)
    final = train(cfg)
    log = [json.loads(line) for line in (tmp_path / "v/train_log.jsonl").open()]
    val = [r for r in log if "val_loss" in r]
    assert [r["step"] for r in val] == [10, 20, 30]
    assert all(0 <= r["val_acc"] <= 1 for r in val)
    # validating the untrained model on the same rows, with the run's own statistics, gives
    # a far higher loss: the logged numbers measure the weights; the same weights give the
    # same numbers (no augmentation, fixed rows)
    stats = vla_prune.load_policy(final).norm_stats["embedded"]
    fresh = vla_prune.build_policy(cfg.preset, seed=cfg.seed)
    data = dataset.DemoBatches(str(held_out), fresh, cfg, stats=stats)
    before = train_mod.validate(fresh, data, cfg)
    assert before == train_mod.validate(fresh, data, cfg)
    assert val[-1]["val_loss"] < 0.8 * before["val_loss"]


def test_query_readout_probe_scores_a_constant_query_as_no_information():
    """`sim.probe --readout`: the query entering layer 0 is the last prompt token's embedding,
    the same for every scene of an instruction set: it must score as the mean predictor would
    (and not crash a singular fit); the rows are the chain token -> each layer -> final."""
    from sim.probe import query_readout

    policy = vla_prune.build_policy("tiny-openvla-112", seed=0)
    out = query_readout(policy, scenes_per_family=4)
    layers = policy.model.language_model.config.num_hidden_layers
    assert {"target token", "query final"} | {
        f"query into layer {i}" for i in range(layers)
    } <= set(out)
    assert out["scenes_fit"] == out["scenes_scored"] == 8
    # every prompt ends in the same token: layer 0's input is one constant vector
    assert out["query into layer 0"] == out["no_information"]
    assert out["no_information"]["target_cm"] > 1.0

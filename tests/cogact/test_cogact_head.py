"""CogACT's head: DiT structure, DDIM (vs diffusers), guidance, feature caching, ensemble."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vla_prune
from tests.conftest import random_image, tiny_cogact
from vla_prune.caching import CacheConfig
from vla_prune.caching.dit_cache import DiTFeatureCache
from vla_prune.caching.dit_cache import forward as dit_forward
from vla_prune.cogact import AdaptiveEnsembler, CogACTPolicy
from vla_prune.models.cogact import DDIMSampler, SamplingConfig, ddim_timesteps, guided_eps
from vla_prune.models.dit import DiT, DiTConfig

INSTRUCTION = "pick up the red block"


@pytest.fixture(scope="module")
def policy() -> CogACTPolicy:
    return tiny_cogact(0)


def tiny_dit(seed: int = 0) -> DiT:
    torch.manual_seed(seed)
    net = DiT(DiTConfig(depth=3, hidden_size=64, num_heads=4, token_size=32)).eval()
    with torch.no_grad():
        for w in net.parameters():
            w.normal_(0, 0.2)
    return net


# -- architecture -------------------------------------------------------------------------------


def test_dit_b_parameter_names_and_shapes_follow_cogact():
    net = vla_prune.build_policy("cogact-base").model.action_model  # meta device
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert shapes["net.x_embedder.linear.weight"] == (768, 7)
    assert shapes["net.history_embedder.linear.weight"] == (768, 7)
    assert shapes["net.t_embedder.mlp.0.weight"] == (768, 256)
    assert shapes["net.t_embedder.mlp.2.weight"] == (768, 768)
    assert shapes["net.z_embedder.linear.weight"] == (768, 4096)
    assert shapes["net.z_embedder.uncondition"] == (1, 4096)
    assert shapes["net.positional_embedding"] == (17, 768)  # condition token + 16 actions
    assert shapes["net.blocks.11.attn.qkv.weight"] == (2304, 768)
    assert shapes["net.blocks.11.attn.proj.bias"] == (768,)
    assert shapes["net.blocks.11.mlp.fc1.weight"] == (3072, 768)
    assert shapes["net.blocks.11.mlp.fc2.weight"] == (768, 3072)
    assert shapes["net.final_layer.linear.weight"] == (7, 768)
    assert "net.blocks.12.attn.qkv.weight" not in shapes
    # LayerNorms without affine parameters, as CogACT's DiT blocks and final layer
    assert not any("norm" in k for k in shapes)


def test_cogact_base_parameter_count():
    policy = vla_prune.build_policy("cogact-base")
    total = sum(p.numel() for p in policy.model.parameters())
    dit = sum(p.numel() for p in policy.model.action_model.parameters())
    openvla = sum(p.numel() for p in vla_prune.build_policy("openvla-7b").model.parameters())
    print(f"cogact-base: {total:,} parameters (DiT-B head {dit:,}; OpenVLA-7B {openvla:,})")
    assert dit == 88_986_887  # FACTS: DiT-B ~89 M
    assert total == openvla + dit == 7_630_224_071  # FACTS: 7.63 B
    assert policy.model.vision_backbone is not None and policy.model.language_model is not None


def test_presets_and_cognition_token(policy):
    for name, size in (("small-cogact", (6, 384, 4)), ("cogact-base", (12, 768, 12))):
        cfg = vla_prune.models.presets.get_preset(name)
        assert (cfg.dit.depth, cfg.dit.hidden_size, cfg.dit.num_heads) == size
    ids = policy.token_ids(INSTRUCTION)
    assert ids[-1] == policy.config.cognition_token_id == policy.tokenizer.eos_token_id == 2
    assert policy.head.max_new_tokens == 0 and policy.head.stage == "action_head"


def test_cognition_feature_is_final_hidden_state_of_last_token(policy):
    """The DiT is conditioned on the last prompt token's final-norm hidden state (checked
    against a plain transformers forward)."""
    seen = []
    z_linear = policy.model.action_model.net.z_embedder.linear
    handle = z_linear.register_forward_hook(lambda m, inp, out: seen.append(inp[0].clone()))
    try:
        policy.reset()
        policy.step(random_image(1), INSTRUCTION)
    finally:
        handle.remove()
    inputs = policy.prepare(random_image(1), INSTRUCTION)
    with torch.no_grad():
        embeds = policy.model.embed_inputs(inputs["pixel_values"], inputs["input_ids"])
        ref = policy.model.language_model.model(inputs_embeds=embeds).last_hidden_state[:, -1]
    cognition = seen[0][0, 0]  # first call, conditional half of the CFG batch
    torch.testing.assert_close(cognition, ref[0], atol=1e-5, rtol=1e-5)


# -- DDIM and guidance --------------------------------------------------------------------------


def test_ddim_timesteps_follow_cogact_respacing():
    assert ddim_timesteps(100, 10) == [90, 80, 70, 60, 50, 40, 30, 20, 10, 0]
    assert ddim_timesteps(100, 7) == [90, 75, 60, 45, 30, 15, 0]  # guided-diffusion "ddim7"
    with pytest.raises(ValueError):
        SamplingConfig(ddim_steps=0)


def test_ddim_matches_diffusers():
    diffusers = pytest.importorskip("diffusers", reason="diffusers not installed")
    sched = diffusers.DDIMScheduler(
        num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", clip_sample=False
    )
    sched.set_timesteps(10)
    ours = DDIMSampler(100, 10)
    assert [int(t) for t in sched.timesteps] == ours.timesteps
    torch.testing.assert_close(ours.alphas_cumprod.float(), sched.alphas_cumprod)

    net = tiny_dit(3)
    cognition = torch.randn(2, 1, 32, generator=torch.Generator().manual_seed(4))
    uncond = net.z_embedder.uncondition.detach()

    def eps(x, t):  # the same model outputs for both samplers: a DiT with guidance
        with torch.no_grad():
            return guided_eps(net, x, t, cognition, uncond, 1.5)

    noise = torch.randn(2, 16, 7, generator=torch.Generator().manual_seed(0))
    x = noise.clone()
    for t in sched.timesteps:
        x = sched.step(eps(x, int(t)), t, x, eta=0.0).prev_sample
    got = ours.sample(lambda xx, t, i: eps(xx, t), noise.clone())
    torch.testing.assert_close(got, x, atol=1e-5, rtol=1e-5)


def test_cfg_scale_one_runs_no_doubling_and_equals_the_guided_formula():
    net = tiny_dit(5)
    x = torch.randn(3, 16, 7, generator=torch.Generator().manual_seed(1))
    cognition = torch.randn(3, 1, 32, generator=torch.Generator().manual_seed(2))
    uncond = net.z_embedder.uncondition.detach()
    batches = []

    def net_fn(xx, tt, zz):
        batches.append(xx.shape[0])
        return net(xx, tt, zz)

    with torch.no_grad():
        one = guided_eps(net_fn, x, 50, cognition, uncond, 1.0)
        guided = guided_eps(net_fn, x, 50, cognition, uncond, 1.5)
        # the doubled batch at scale 1: uncond + 1 * (cond - uncond) = cond (up to rounding)
        z = torch.cat([cognition, uncond[None].expand(3, 1, -1)])
        both = net(torch.cat([x, x]), torch.full((6,), 50), z)
        cond, unc = both[:3], both[3:]
    assert batches == [3, 6]
    torch.testing.assert_close(one, cond, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(one, unc + 1.0 * (cond - unc), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(guided, unc + 1.5 * (cond - unc))
    with pytest.raises(ValueError):
        SamplingConfig(cfg_scale=0.5)


def test_policy_cfg_batch(policy):
    sizes = []
    x_emb = policy.model.action_model.net.x_embedder
    handle = x_emb.register_forward_hook(lambda m, inp, out: sizes.append(inp[0].shape[0]))
    try:
        policy.configure(sampling=SamplingConfig(cfg_scale=1.0))
        policy.step(random_image(2), INSTRUCTION)
        policy.configure(sampling=SamplingConfig())
        policy.step(random_image(2), INSTRUCTION)
    finally:
        handle.remove()
    assert sizes == [1] * 10 + [2] * 10  # 10 DDIM steps each; default scale 1.5 doubles


def test_outputs_clipped_binarized_unnormalized(policy):
    policy.norm_stats = {
        "d": {"action": {"q01": [-0.5] * 7, "q99": [0.5] * 7, "mask": [True] * 6 + [False]}}
    }
    policy.unnorm_key = "d"
    try:
        policy.reset()
        r = policy.step(random_image(3), INSTRUCTION)
    finally:
        policy.norm_stats = {"identity": vla_prune.models.openvla.identity_stats(7)}
        policy.unnorm_key = "identity"
    n = r.normalized_actions
    assert r.actions.shape == n.shape == (16, 7) and r.actions.dtype == np.float32
    assert np.abs(n).max() <= 1.0 and set(np.unique(n[:, 6])) <= {0.0, 1.0}
    np.testing.assert_allclose(r.actions[:, :6], 0.5 * n[:, :6], atol=1e-7)  # q01 -.5, q99 .5
    np.testing.assert_array_equal(r.actions[:, 6], n[:, 6])  # gripper unmasked
    np.testing.assert_array_equal(r.extra["chunk"], r.actions)
    assert r.action_tokens is None and "action_head" in r.timings_ms


# -- feature caching ----------------------------------------------------------------------------


def test_cache_interval_one_is_bit_exact(policy):
    image = random_image(4)
    policy.configure(cache=CacheConfig())  # disabled
    dense = [policy.step(image, INSTRUCTION) for _ in range(2)]
    policy.configure(cache=CacheConfig(interval=1, enabled=True))
    cached = [policy.step(image, INSTRUCTION) for _ in range(2)]
    policy.configure(cache=CacheConfig())
    for a, b in zip(dense, cached):
        np.testing.assert_array_equal(a.actions, b.actions)
        np.testing.assert_array_equal(a.normalized_actions, b.normalized_actions)
        np.testing.assert_array_equal(a.extra["chunk"], b.extra["chunk"])
    depth = len(policy.model.action_model.net.blocks)
    assert cached[0].extra["dit_blocks_computed"] == 10 * depth
    assert cached[0].extra["dit_blocks_skipped"] == 0


def test_cache_interval_five_computes_two_of_ten_steps(policy):
    blocks = policy.model.action_model.net.blocks
    calls = []
    handles = [
        b.attn.register_forward_hook(lambda m, i, o, idx=idx: calls.append(idx))
        for idx, b in enumerate(blocks)
    ]
    try:
        policy.configure(cache=CacheConfig(interval=5, enabled=True))
        r = policy.step(random_image(5), INSTRUCTION)
        cached_calls = len(calls)
        policy.configure(cache=CacheConfig())
        calls.clear()
        d = policy.step(random_image(5), INSTRUCTION)
    finally:
        for h in handles:
            h.remove()
    depth = len(blocks)
    assert cached_calls == 2 * depth and len(calls) == 10 * depth  # block evaluations
    assert r.extra["dit_blocks_computed"] == 2 * depth
    assert r.extra["dit_blocks_skipped"] == 8 * depth
    assert d.extra["dit_blocks_skipped"] == 0
    assert not np.array_equal(r.extra["chunk"], d.extra["chunk"])  # the cache does something


def test_cache_full_steps_are_0_n_2n():
    net = tiny_dit(7)
    cache = DiTFeatureCache(3)
    x, z = torch.randn(1, 16, 7), torch.randn(1, 1, 32)
    full = []
    with torch.no_grad():
        for step in range(10):
            before = cache.computed
            dit_forward(net, x, torch.tensor([step]), z, step=step, cache=cache)
            full.append(cache.computed > before)
    assert [i for i, f in enumerate(full) if f] == [0, 3, 6, 9]
    with pytest.raises(ValueError):
        CacheConfig(interval=0)


# -- adaptive ensemble --------------------------------------------------------------------------


def test_ensemble_weights_match_formula():
    alpha = 0.1
    e = AdaptiveEnsembler(horizon=3, alpha=alpha)
    c0 = np.zeros((4, 3))
    c0[2] = [2.0, 0.0, 0.0]  # predicts the step two ahead: same direction as a_now
    c1 = np.zeros((4, 3))
    c1[1] = [0.0, 1.0, 0.0]  # orthogonal to a_now
    c2 = np.zeros((4, 3))
    c2[0] = [1.0, 0.0, 0.0]  # a_now
    first = e.push(c0)
    np.testing.assert_allclose(first, c0[0])  # one chunk: weight 1
    e.push(c1)
    out = e.push(c2)
    preds = e.predictions()
    np.testing.assert_array_equal(preds, [c0[2], c1[1], c2[0]])
    w = np.array([np.exp(alpha * 1.0), np.exp(alpha * 0.0), np.exp(alpha * 1.0)])
    w /= w.sum()
    np.testing.assert_allclose(e.weights(preds), w, rtol=1e-6)
    np.testing.assert_allclose(out, (w[:, None] * preds).sum(0), rtol=1e-6)
    c3 = np.ones((4, 3))
    e.push(c3)  # horizon 3: c0 falls out
    np.testing.assert_array_equal(e.predictions(), [c1[2], c2[1], c3[0]])


def test_policy_ensemble_per_slot_and_reset():
    policy = tiny_cogact(2)
    policy.configure(sampling=SamplingConfig(ensemble=True, ensemble_horizon=2, ensemble_alpha=0.1))
    images = [random_image(10), random_image(11)]
    instructions = [INSTRUCTION, "press the yellow button"]
    first = policy.step_batch(images, instructions)
    second = policy.step_batch(images, instructions)
    for a, b in zip(first, second):
        assert b.actions.shape == (1, 7) and b.extra["chunk"].shape == (16, 7)
        np.testing.assert_array_equal(a.actions[0], a.extra["chunk"][0])
        preds = np.stack([a.extra["chunk"][1], b.extra["chunk"][0]]).astype(np.float64)
        now = preds[-1]
        cos = preds @ now / (np.linalg.norm(preds, axis=1) * np.linalg.norm(now) + 1e-7)
        w = np.exp(0.1 * cos) / np.exp(0.1 * cos).sum()
        np.testing.assert_allclose(b.actions[0], (w[:, None] * preds).sum(0), rtol=1e-5)
    policy.reset()
    again = policy.step_batch(images, instructions)
    for a, b in zip(first, again):  # reset: fresh ensemble and the same noise
        np.testing.assert_array_equal(a.actions, b.actions)
    with pytest.raises(ValueError):
        policy.configure(sampling=SamplingConfig(ensemble=True, ensemble_horizon=17))


def test_batch_slot_matches_single_step():
    policy = tiny_cogact(3)
    images = [random_image(20), random_image(21)]
    batch = policy.step_batch(images, [INSTRUCTION, "push the blue cube onto the green pad"])
    policy.reset()
    single = policy.step(images[0], INSTRUCTION)  # slot 0: the same noise stream
    np.testing.assert_allclose(batch[0].extra["chunk"], single.extra["chunk"], atol=1e-4)


def test_head_flops_match_a_flop_counter_and_the_cache_saves_blocks():
    from torch.utils.flop_counter import FlopCounterMode

    from vla_prune.caching import sampling_flops
    from vla_prune.models.dit import forward_flops

    net = tiny_dit(8)
    cfg = net.cfg
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(torch.randn(2, 16, 7), torch.tensor([5, 5]), torch.randn(2, 1, 32))
    ours = sum(forward_flops(cfg, 2).values())
    attention = 2 * 2 * cfg.depth * 2 * 17 * 17 * cfg.hidden_size  # QK^T and AV
    # torch's counter may or may not see SDPA's two matmuls on the CPU; the rest must match
    assert counter.get_total_flops() in (ours, ours - attention)
    f = forward_flops(cfg, 2)  # guidance doubles the batch
    dense = sampling_flops(cfg, 1, 10, 1.5)
    cached = sampling_flops(cfg, 1, 10, 1.5, CacheConfig(interval=5, enabled=True))
    assert dense == 10 * sum(f.values())
    assert dense - cached == 8 * f["blocks"]

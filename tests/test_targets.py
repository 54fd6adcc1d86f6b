"""Robot-GPU projection: the datasheet table, roofline bounds on a target, `info --target`."""

import json

import pytest

import vla_prune
from vla_prune.engine.flops import step_flops
from vla_prune.roofline import GPU_PEAKS, project_step
from vla_prune.targets import TARGETS, get_target
from vla_prune_cli.latency import _flops
from vla_prune_cli.main import main

INSTRUCTION = "pick up the red block"
TARGETS_W = ("bf16", "int8", "int4")


@pytest.fixture(scope="module")
def openvla():
    return vla_prune.build_policy("openvla-7b")  # meta device: shapes only, no weights


def _n_text(policy) -> int:
    return len(policy.token_ids(INSTRUCTION))


def test_table_has_the_robot_and_datacenter_targets():
    required = {
        "jetson-agx-orin-64gb",
        "jetson-agx-orin-32gb",
        "jetson-orin-nx-16gb",
        "jetson-thor",
        "h200",
        "h100-sxm",
        "h100-pcie",
        "a100-80gb",
        "l40s",
        "rtx-4090",
        "rtx-a6000",
        "a40",
    }
    assert required <= set(TARGETS)
    for t in TARGETS.values():
        assert t.bf16_flops > 0 and t.int8_ops > 0 and t.bandwidth > 0 and t.memory_gb > 0
        assert t.int8_ops >= t.bf16_flops  # INT8 tensor rate is never below BF16
        assert len(t.source) > 40 and "dense" in t.source  # says which figure is used
    orin, thor = get_target("jetson-agx-orin-64gb"), get_target("Jetson-AGX-Thor")
    assert orin.bandwidth == 204.8e9 and thor.bandwidth == 273e9
    assert orin.int8_ops == 170e12 / 2  # the GPU's dense INT8, not the 275 sparse GPU+DLA headline
    assert thor.bf16_flops == 517e12 / 2  # dense BF16 = sparse FP16 / 2, not the FP4 headline
    # roofline's datasheet peaks come from the same table, first match wins
    fragments = [f for f, _, _ in GPU_PEAKS]
    assert fragments.index("H100 PCIe") < fragments.index("H100")
    assert fragments.index("A6000") < fragments.index("A40")


def test_bf16_dense_decode_bound_is_bytes_over_bandwidth_by_hand(openvla):
    cfg, n_text = openvla.config, _n_text(openvla)
    orin = get_target("jetson-agx-orin-64gb")
    roofs = project_step(openvla, step_flops(cfg, n_text), orin, "bf16", n_text)
    # Llama-2-7B: 32 layers of q, k, v, o (4 d^2), gate/up/down (3 d f), two RMSNorms (2 d)
    d, f, vocab, n_layers, steps = 4096, 11008, 32064, 32, 6
    layer = 4 * d * d + 3 * d * f + 2 * d
    weights = n_layers * layer + vocab * d  # + the LM head, re-read at every decode step
    t = n_text + 256
    kv = n_layers * sum(t + s + 1 for s in range(steps)) * 2 * d  # K and V rows read
    nbytes = 2 * (steps * weights + kv)
    assert roofs["decode"].nbytes == nbytes
    assert roofs["decode"].bound == "memory"
    assert roofs["decode"].ms == pytest.approx(1e3 * nbytes / 204.8e9, rel=1e-12)
    assert roofs["decode"].ms == pytest.approx(391.4, abs=0.1)  # ~80 GB at 204.8 GB/s


def test_int8_halves_the_memory_bound_decode(openvla):
    cfg, n_text = openvla.config, _n_text(openvla)
    flops = step_flops(cfg, n_text)
    for name in ("jetson-agx-orin-64gb", "jetson-thor"):
        target = get_target(name)
        by = {w: project_step(openvla, flops, target, w, n_text)["decode"] for w in TARGETS_W}
        assert all(r.bound == "memory" for r in by.values())
        assert by["int8"].ms / by["bf16"].ms == pytest.approx(0.5, rel=0.02)  # KV stays bf16
        assert by["int4"].ms / by["bf16"].ms == pytest.approx(0.25, rel=0.05)
        # exactly: weights W halve, the bf16 KV traffic K does not (bf16 = W + K, int8 = W/2 + K)
        kv_ms = 2 * by["int8"].ms - by["bf16"].ms
        assert 0 < kv_ms < 0.02 * by["bf16"].ms
        assert by["int4"].ms == pytest.approx((by["bf16"].ms - kv_ms) / 4 + kv_ms)
        # the compute roof is the same bf16 peak for every weight format
        assert by["int8"].compute_ms == by["bf16"].compute_ms == by["int4"].compute_ms


def test_pruning_lowers_the_prefill_bound(openvla):
    cfg, n_text = openvla.config, _n_text(openvla)
    k = 3  # VLA-Pruner's layer on 32 layers
    for name in ("jetson-agx-orin-64gb", "jetson-thor", "h100-sxm"):
        target = get_target(name)
        for w in TARGETS_W:
            dense = project_step(openvla, step_flops(cfg, n_text), target, w, n_text)
            pruned = project_step(openvla, step_flops(cfg, n_text, 64, k), target, w, n_text, 64, k)
            assert pruned["prefill"].ms < dense["prefill"].ms
            assert pruned["prefill"].flops < dense["prefill"].flops
            assert pruned["prefill"].nbytes < dense["prefill"].nbytes  # fewer KV rows written
            assert pruned["vision"].ms == dense["vision"].ms


def test_cogact_has_an_action_head_and_no_decode():
    policy = vla_prune.build_policy("cogact-base")
    n_text = _n_text(policy)
    thor = get_target("jetson-thor")
    roofs = project_step(policy, _flops(policy, n_text, None, None), thor, "bf16", n_text)
    assert list(roofs) == ["vision", "projector", "prefill", "action_head"]
    net = policy.model.action_model.net
    used = sum(p.numel() for p in net.parameters()) - net.history_embedder.linear.weight.numel()
    used -= net.history_embedder.linear.bias.numel()
    assert roofs["action_head"].nbytes == 2 * policy.sampling.ddim_steps * used  # 10 full steps
    lm_head = policy.model.language_model.lm_head.weight.numel()
    openvla_like = project_step(
        policy, step_flops(policy.config, n_text, decode_steps=0), thor, "bf16", n_text
    )
    assert roofs["prefill"].nbytes == openvla_like["prefill"].nbytes - 2 * lm_head  # no LM head


def test_cli_info_target_prints_the_rates(capsys, tmp_path):
    out = tmp_path / "orin.json"
    argv = ["info", "--target", "jetson-agx-orin-64gb", "--policy", "openvla-7b", "--out", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "Hz" in text and "binds: decode (memory-bound)" in text
    for w in TARGETS_W:
        assert f"{w} weights" in text
    data = json.loads(out.read_text())
    rows = data["targets"][0]["tables"]["bf16"]
    assert [r["budget"] for r in rows] == ["dense", "50%", "25%", "12.5%"]
    assert [r["kept_visual_tokens"] for r in rows] == [256, 128, 64, 32]
    assert all(r["hz"] > 0 and r["total_ms"] == pytest.approx(1e3 / r["hz"]) for r in rows)


def test_cli_info_target_takes_keep_and_lists_targets(capsys, tmp_path):
    out = tmp_path / "thor.json"
    argv = ["info", "--target", "jetson-thor", "--policy", "openvla-7b", "--keep", "64,0.5"]
    assert main([*argv, "--weights", "int4", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["targets"][0]["tables"]["int4"]
    assert [(r["budget"], r["kept_visual_tokens"]) for r in rows] == [
        ("dense", 256),
        ("64", 64),
        ("50%", 128),
    ]
    capsys.readouterr()
    assert main(["info", "--target", "list"]) == 0
    listing = capsys.readouterr().out
    assert all(key in listing for key in TARGETS) and "204.8" in listing


def test_unknown_target_is_a_clear_error(capsys):
    assert main(["info", "--target", "jetson-nano-9000", "--policy", "openvla-7b"]) == 2
    err = capsys.readouterr().err
    assert "unknown target 'jetson-nano-9000'" in err
    assert "jetson-agx-orin-64gb" in err and "jetson-thor" in err
    with pytest.raises(ValueError, match="known: jetson-agx-orin-64gb"):
        get_target("tpu")

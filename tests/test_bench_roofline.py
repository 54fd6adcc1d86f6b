"""Roofline bytes/bounds by hand on the tiny model, and the side-by-side bench runner."""

import pytest

import vla_prune
from vla_prune.benchmark import format_markdown, run_bench
from vla_prune.engine.flops import step_flops
from vla_prune.roofline import DevicePeak, bounds_ms, stage_bytes


def test_stage_bytes_by_hand():
    policy = vla_prune.build_policy("tiny-openvla")
    cfg, m = policy.config, policy.model
    b = stage_bytes(m, cfg, prompt_tokens=20, kept_visual=None, prune_layer=None, dtype_bytes=4)
    assert b["projector"] == 4 * sum(p.numel() for p in m.projector.parameters())
    lm = m.language_model
    layer_w = sum(p.numel() for p in lm.model.layers.parameters())
    head_w = lm.lm_head.weight.numel()
    kv_row = 2 * 256  # k and v, 4 heads x 64
    t = 20 + 256
    assert b["prefill"] == 4 * (layer_w + head_w + 4 * t * kv_row)
    decode_kv = 4 * sum(t + s + 1 for s in range(6)) * kv_row
    assert b["decode"] == 4 * (6 * (layer_w + head_w) + decode_kv)
    pruned = stage_bytes(m, cfg, 20, kept_visual=64, prune_layer=1, dtype_bytes=4)
    assert pruned["prefill"] == b["prefill"] - 4 * 3 * (256 - 64) * kv_row


def test_bounds_take_the_slower_roof():
    cfg = vla_prune.build_policy("openvla-7b").config
    flops = step_flops(cfg, 20)
    nbytes = {"vision": 1e9, "projector": 1e8, "prefill": 1e10, "decode": 8e10}
    peak = DevicePeak("toy", flops=1e15, bandwidth=1e12, source="test")
    b = bounds_ms(flops, nbytes, peak)
    assert b["decode"] == pytest.approx(80.0)  # 8e10 B / 1e12 B/s: memory-bound
    head = flops.lm_head / 7
    assert b["prefill"] == pytest.approx(1e3 * max((flops.stages["prefill"] + head) / 1e15, 1e-2))
    assert b["total"] == pytest.approx(sum(v for k, v in b.items() if k != "total"))


def test_bench_runs_all_configs_side_by_side():
    policy = vla_prune.build_policy("tiny-openvla")
    rows = run_bench(policy, ("reference", "dense", "vla-pruner@0.25", "fastv@0.125"), steps=2)
    assert [r["config"] for r in rows] == ["reference", "dense", "vla-pruner@0.25", "fastv@0.125"]
    assert [r["kept"] for r in rows] == [256, 256, 64, 32]  # timed after vla-pruner's warm-up
    assert rows[0]["speedup_vs_reference"] == 1.0 and rows[1]["speedup_vs_dense"] == 1.0
    assert "| fastv@0.125 | 32 |" in format_markdown(rows, "t")


def test_bench_writes_table_json_and_stacked_bars(tmp_path):
    from vla_prune.benchmark import write_results

    policy = vla_prune.build_policy("tiny-openvla")
    rows = run_bench(policy, ("reference", "dense", "fastv@0.25"), steps=1)
    stem = write_results(rows, tmp_path, "tiny-openvla", "cpu", "float32", "vla-prune bench")
    for suffix in (".md", ".json", ".png"):
        assert stem.with_suffix(suffix).stat().st_size > 0
    assert "Command: `vla-prune bench`" in stem.with_suffix(".md").read_text()

"""The latency-budget controller on synthetic latency traces (pure Python, no ROS needed)."""

from __future__ import annotations

import pytest

from vla_prune.runtime.budget import (
    AccelLevel,
    BudgetConfig,
    BudgetController,
    LevelCost,
    keep_counts,
    make_levels,
)


def step_latency(keep: int, per_token_ms: float, fixed_ms: float = 20.0) -> tuple[float, dict]:
    """A step whose prefill grows with the kept tokens (like the LLM of a full-size VLA)."""
    prefill = per_token_ms * keep
    return fixed_ms + prefill, {"vision": fixed_ms, "prefill": prefill}


def run(ctrl: BudgetController, per_token: list[float]) -> list[int]:
    """Feed one step per entry; returns the kept-token count each step ran with."""
    keeps = []
    for pt in per_token:
        keep = ctrl.current.keep_count
        total, stages = step_latency(keep, pt)
        ctrl.observe(total, stages)
        keeps.append(keep)
    return keeps


def collapse(keeps: list[int]) -> list[int]:
    return [k for i, k in enumerate(keeps) if i == 0 or k != keeps[i - 1]]


def test_make_levels_from_baseline_to_floor():
    assert [lv.keep_count for lv in make_levels(256)] == [256, 192, 128, 96, 64, 48, 32]
    assert [lv.keep_count for lv in make_levels(256, baseline_keep=100, min_keep=40)] == [
        100,
        96,
        64,
        48,
        40,
    ]
    assert [lv.keep_count for lv in make_levels(256, min_keep=256)] == [256]
    assert make_levels(64)[0] == AccelLevel(64)
    # Relative to the policy's own visual tokens: 64 patches give 64 .. 8, not 256's counts.
    assert keep_counts(64, min_keep=16) == [64, 48, 32, 24, 16]
    assert keep_counts(64, baseline_keep=16, min_keep=16) == [16]
    level = AccelLevel(64, dit_cache_interval=2, skip_layers=(3, 1), compile=True, weights="int8")
    assert level.name == "keep64+cache2+skip[1,3]+compile+int8"
    assert level.spec("vla-pruner") == "vla-pruner@64+cache2+skip[1,3]+compile+int8"
    # The lever order: more tokens, less caching, fewer skips, more precise weights.
    assert AccelLevel(64).at_least_as_good(level)
    assert not level.at_least_as_good(AccelLevel(64))
    assert AccelLevel(32, compile=True).at_least_as_good(AccelLevel(32))  # same math
    with pytest.raises(ValueError, match="weights"):
        AccelLevel(64, weights="fp8")


def test_load_step_up_then_down():
    """Normal load fits at full quality; a 4x per-token load is answered within two steps
    without a deadline miss afterwards; when the load goes away the controller relaxes back,
    one level at a time, after sustained headroom."""
    ctrl = BudgetController(BudgetConfig(budget_ms=100.0, relax_after=15), make_levels(256))
    trace = [0.1] * 30 + [0.4] * 50 + [0.1] * 80
    keeps = run(ctrl, trace)

    assert set(keeps[:30]) == {256}  # 45.6 ms: no reason to prune
    # Load step at step 30 (122 ms at 256 tokens): a miss -> one level (97 ms at 192: over
    # the target again) -> the model's jump to 128 tokens (71 ms, under the 85 ms target).
    assert keeps[30:33] == [256, 192, 128]
    assert set(keeps[32:80]) == {128}
    # Load gone at step 80: 33 ms < 60 ms relax threshold -> one level per 15 quiet steps.
    assert collapse(keeps[80:]) == [128, 192, 256]
    assert keeps.index(192, 80) == 80 + 15
    assert keeps.index(256, 96) == 80 + 30
    assert keeps[-1] == 256
    # Every step after the reaction fits the budget.
    loads = [step_latency(k, pt)[0] for k, pt in zip(keeps, trace)]
    assert [i for i, ms in enumerate(loads) if ms > 100.0] == [30]


def test_escalates_one_level_after_consecutive_over_target_steps():
    """Between target (85) and budget (100): two consecutive over-target steps -> one level up."""
    ctrl = BudgetController(BudgetConfig(budget_ms=100.0), make_levels(256))
    # 20 + 0.27 * 256 = 89 ms at full tokens; at 192 tokens 72 ms.
    keeps = run(ctrl, [0.27] * 10)
    assert keeps[:3] == [256, 256, 192]
    assert set(keeps[2:]) == {192}


def test_lone_outlier_moves_one_level():
    ctrl = BudgetController(BudgetConfig(budget_ms=100.0), make_levels(256))
    ctrl.observe(500.0, {"prefill": 10.0})  # a spike, mostly outside the token-bound stages
    assert ctrl.current.keep_count == 192
    ctrl.observe(40.0, {"prefill": 20.0})
    assert ctrl.current.keep_count == 192


def test_quality_floor_is_never_crossed():
    ctrl = BudgetController(BudgetConfig(budget_ms=50.0), make_levels(256, min_keep=64))
    keeps = run(ctrl, [1.0] * 40)  # hopeless: 84 ms even at the floor
    assert min(keeps) == 64
    assert keeps[-1] == 64
    assert ctrl.current.keep_count == 64


def test_failed_relax_backs_off():
    """A level that looks fine to the model but overruns when tried: the wait before the next
    try doubles, so the controller does not oscillate."""
    ctrl = BudgetController(
        BudgetConfig(budget_ms=100.0, relax_after=10, escalate_after=2),
        make_levels(256, min_keep=128),
        level=1,  # start at 192 tokens
    )
    keeps = []
    for _ in range(120):
        keep = ctrl.current.keep_count
        total = 95.0 if keep == 256 else 50.0  # no stage split: the model predicts 50 for all
        ctrl.observe(total)
        keeps.append(keep)
    tries = [i for i in range(1, len(keeps)) if keeps[i] == 256 and keeps[i - 1] == 192]
    assert len(tries) >= 2
    gaps = [b - a for a, b in zip(tries, tries[1:])]
    assert gaps == sorted(gaps) and gaps[-1] > gaps[0]  # growing waits
    assert sum(k == 256 for k in keeps) <= 2 * len(tries)  # each try lasts two steps


def test_late_step_is_learned_at_its_own_level():
    ctrl = BudgetController(BudgetConfig(budget_ms=100.0), make_levels(256), level=2)
    ctrl.observe(150.0, {"prefill": 128.0}, level=0)  # it ran at level 0, 256 tokens
    assert ctrl.predict_ms(0) == pytest.approx(150.0)
    assert ctrl.predict_ms(2) == pytest.approx(22.0 + 0.5 * 128)


def test_pruner_warmup_step_is_learned_with_its_real_token_count():
    """VLA-Pruner keeps every token in its first steps: a slow step at a 64-token level that
    kept 256 says 'tokens are expensive', not 'this level is slow'."""
    ctrl = BudgetController(BudgetConfig(budget_ms=1000.0), make_levels(256), level=4)  # 64
    ctrl.observe(276.0, {"prefill": 256.0}, kept=256)
    assert ctrl.predict_ms(4) == pytest.approx(20.0 + 64.0)


def test_disabled_and_runtime_budget_change():
    ctrl = BudgetController(BudgetConfig(budget_ms=0.0), make_levels(256))
    for _ in range(5):
        assert ctrl.observe(1000.0).reason == "disabled"
    assert ctrl.level == 0
    # 1000 ms at every level: a new 100 ms budget goes straight to the fastest level.
    d = ctrl.set_budget(100.0)
    assert d.reason == "budget" and d.changed and ctrl.level == len(ctrl.levels) - 1
    assert "100" in d.detail


def measured_front() -> tuple[list[AccelLevel], list[LevelCost]]:
    """A measured front mixing levers: tokens, then the DiT cache, then int8 weights."""
    levels = [
        AccelLevel(64), AccelLevel(32), AccelLevel(64, dit_cache_interval=5),
        AccelLevel(32, dit_cache_interval=5, weights="int8"),
    ]
    costs = [LevelCost(30.0, 10.0), LevelCost(30.0, 5.0), LevelCost(15.0, 10.0),
             LevelCost(8.0, 5.0)]
    return levels, costs


def test_measured_levels_start_where_they_fit_and_follow_a_load():
    levels, costs = measured_front()
    cfg = BudgetConfig(budget_ms=40.0)  # target 34 ms: 40 and 35 do not fit, 25 does
    ctrl = BudgetController(cfg, levels, level=None, costs=costs)
    assert ctrl.current == levels[2]  # chosen before any step, from the measurements
    # The machine gets 2x slower (every part): 50 ms at level 2 -> int8 level (26 ms).
    d = ctrl.observe(50.0, {"prefill": 20.0})
    assert d.reason == "escalate" and ctrl.current == levels[3], d
    assert d.detail == "50.0 ms > budget 40 ms"
    assert 25.0 < ctrl.predict_ms(2) < 50.0  # the EMA moves from the measurement towards 2x
    for _ in range(20):  # 26 ms: between the relax (24 ms) and target (34 ms) thresholds
        assert ctrl.observe(26.0, {"prefill": 10.0}).reason == "hold"
    assert ctrl.predict_ms(2) == pytest.approx(50.0, rel=0.01)
    # A new generous budget: back to the best level predicted to fit.
    d = ctrl.set_budget(200.0)
    assert d.changed and ctrl.level == 0


def test_measured_levels_walk_where_the_model_predicts():
    """Measured levels in quality order need not get faster with every index: a pruned level
    that costs more than the full one (its scoring) is skipped until the token part grows."""
    levels = [AccelLevel(64), AccelLevel(32), AccelLevel(16)]
    costs = [LevelCost(10.0, 4.0), LevelCost(12.0, 2.0), LevelCost(12.0, 1.0)]  # 14, 14, 13
    ctrl = BudgetController(BudgetConfig(budget_ms=100.0), levels, costs=costs)
    # The machine: 2x in the fixed part, the token part 40x (a bigger LLM): 180 ms at 64.
    d = ctrl.observe(180.0, {"prefill": 160.0})
    assert d.reason == "escalate" and ctrl.level == 1  # 64 -> 32: predicted faster now
    # A fresh controller with the same costs and no load change: a lone miss goes to the
    # next level predicted faster, skipping the one predicted slower.
    calm = BudgetController(BudgetConfig(budget_ms=10.0), levels, costs=costs)
    calm.observe(14.0, {"prefill": 4.0})
    assert calm.level == 2  # 32 would be 14 ms too: 16 is the next one predicted faster
    with pytest.raises(ValueError, match="costs"):
        BudgetController(BudgetConfig(budget_ms=40.0), levels, costs=costs[:2])
    with pytest.raises(ValueError, match=">= 0"):
        BudgetController(BudgetConfig(budget_ms=40.0), levels, costs=[LevelCost(-1, 0)] * 3)


def test_an_infeasible_budget_holds_at_the_fastest_predicted_level():
    """Measured levels in quality order: the fastest is the first one here. Under a budget
    nothing meets, the controller stays there instead of drifting to slower levels."""
    levels = [AccelLevel(32, weights="int8"), AccelLevel(64, weights="bf16"), AccelLevel(24)]
    costs = [LevelCost(13.0, 2.5), LevelCost(15.0, 4.0), LevelCost(17.0, 2.5)]
    ctrl = BudgetController(BudgetConfig(budget_ms=10.0), levels, costs=costs, level=0)
    for _ in range(10):
        d = ctrl.observe(25.0, {"prefill": 4.0})
        assert d.over_budget and d.reason == "hold" and ctrl.level == 0, d


def test_set_levels_keeps_nearest_count():
    ctrl = BudgetController(BudgetConfig(budget_ms=100.0), make_levels(256), level=3)  # 96
    ctrl.set_levels(make_levels(256, baseline_keep=128, min_keep=32))
    assert ctrl.current.keep_count == 96
    ctrl.set_levels(make_levels(256, min_keep=128))
    assert ctrl.current.keep_count == 128  # below the new floor: clamp to it


@pytest.mark.parametrize(
    "kw",
    [
        {"target_fraction": 0.5, "relax_fraction": 0.6},
        {"escalate_after": 0},
        {"ema_alpha": 0.0},
        {"relax_after": 50, "max_relax_after": 10},
    ],
)
def test_bad_config(kw):
    with pytest.raises(ValueError):
        BudgetConfig(budget_ms=100.0, **kw)
    with pytest.raises(ValueError):
        BudgetController(BudgetConfig(budget_ms=1.0), [AccelLevel(32), AccelLevel(64)])

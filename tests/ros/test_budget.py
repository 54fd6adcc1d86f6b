"""The latency-budget controller on synthetic latency traces (pure Python, no ROS needed)."""

from __future__ import annotations

import pytest

from vla_prune.runtime.budget import AccelLevel, BudgetConfig, BudgetController, make_levels


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
    assert AccelLevel(64, dit_cache_interval=2, skip_layers=(3,)).name == "keep64+dit2+skip3"


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
    ctrl = BudgetController(BudgetConfig(budget_ms=100.0), make_levels(256))
    ctrl.observe(150.0, {"prefill": 128.0}, kept=256)
    assert ctrl.current.keep_count < 256
    assert ctrl.predict_ms(0) == pytest.approx(150.0)


def test_disabled_and_runtime_budget_change():
    ctrl = BudgetController(BudgetConfig(budget_ms=0.0), make_levels(256))
    for _ in range(5):
        assert ctrl.observe(1000.0).reason == "disabled"
    assert ctrl.level == 0
    ctrl.set_budget(100.0)
    assert ctrl.observe(1000.0).reason == "escalate"


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

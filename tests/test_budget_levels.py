"""Acceleration levels: candidates from a policy, quality from eval summaries, the Pareto front,
levels applied to a real (micro) policy without losing the episode, and the budgeted loop."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from vla_prune.runtime.budget import AccelLevel, BudgetConfig
from vla_prune.runtime.levels import (
    ASSUMED_PENALTY,
    Engine,
    LevelFront,
    LevelSearch,
    MeasuredLevel,
    QualityTable,
    build_front,
    pareto_front,
    parse_engines,
    parse_ints,
    skip_sets_from_calibration,
    smooth_token_costs,
)

REPO = Path(__file__).resolve().parents[1]
SWEEP = REPO / "bench" / "results" / "embedded-sweep-press"
COGACT = REPO / "bench" / "results" / "embedded-cogact-press"


def test_candidates_cover_every_lever_from_the_baseline_down():
    search = LevelSearch(skip_sets=((1,),))
    cands = search.candidates(AccelLevel(64), 64, prunes=True, has_dit=True)
    assert cands[0] == AccelLevel(64)  # the baseline first
    assert len(cands) == len(set(cands)) == 5 * 4 * 2 * 6  # keeps x caches x skips x engines
    assert sorted({c.keep_count for c in cands}) == [16, 24, 32, 48, 64]  # floor: 25 % of 64
    assert sorted({c.dit_cache_interval for c in cands}) == [1, 2, 3, 5]
    assert {c.skip_layers for c in cands} == {(), (1,)}
    assert {(c.compile, c.weights) for c in cands} == {
        (c, w) for c in (False, True) for w in ("fp32", "bf16", "int8")
    }
    # A count floor above the fraction; no DiT: no cache levels; "dense": no keep lever.
    search = LevelSearch(min_keep_tokens=20, engines=())
    cands = search.candidates(AccelLevel(64), 64, prunes=True, has_dit=False)
    assert [c.keep_count for c in cands] == [64, 48, 32, 24, 20]
    assert search.candidates(AccelLevel(64), 64, prunes=False) == [AccelLevel(64)]


def test_engines_only_go_down_in_precision():
    base = AccelLevel(32, weights="bf16", compile=True)
    engines = LevelSearch().engines_for(base)
    assert engines[0] == Engine(True, "bf16")
    assert {e.weights for e in engines} == {"bf16", "int8"}
    asked = LevelSearch(engines=parse_engines("fp32,int8+compile")).engines_for(base)
    assert asked == [Engine(True, "bf16"), Engine(True, "int8")]  # fp32 cannot come back
    assert parse_engines("") == () and parse_engines("auto") is None
    assert parse_ints("2, 5", "level_cache") == (2, 5) and parse_ints("auto", "x") is None
    for bad in ("fp16", "int8+bf16", "compile+fast"):
        with pytest.raises(ValueError, match="bad engine"):
            parse_engines(bad)
    with pytest.raises(ValueError, match=">= 1"):
        parse_ints("0,2", "level_cache")


def test_skip_sets_from_a_calibration_file(tmp_path):
    assert skip_sets_from_calibration(COGACT / "skip_layers.json") == ((1,),)
    path = tmp_path / "skips.json"
    path.write_text(json.dumps({"skip_layers": [3, 1], "influence": [0.5, 0.2, 0.4, 0.1, 0.9]}))
    assert skip_sets_from_calibration(path) == ((3,), (1, 3))  # least influential first
    path.write_text("{}")
    with pytest.raises(ValueError, match="skip list"):
        skip_sets_from_calibration(path)


def test_quality_from_the_embedded_sweep(tmp_path):
    table = QualityTable.load(SWEEP / "summary.json", 64, "vla-pruner")
    assert "episodes.jsonl" in table.source  # the episodes name cache / skips / weights
    q = {k: table.estimate(AccelLevel(k))[0] for k in (64, 48, 32, 24, 16, 8)}
    # dense 34/40 (not the blind control's 0/40: another checkpoint), vla-pruner@0.5 34/40,
    # @0.25 27/40, @0.125 12/40; between them linear in kept tokens.
    assert q[64] == q[32] == 34 / 40 and q[48] == 34 / 40
    assert q[16] == 27 / 40 and q[8] == 12 / 40
    assert q[24] == pytest.approx((34 / 40 + 27 / 40) / 2)
    assert table.estimate(AccelLevel(16))[1].startswith("measured")
    q8, how = table.estimate(AccelLevel(32, weights="int8", compile=True))
    assert q8 == pytest.approx(34 / 40 - ASSUMED_PENALTY) and "assumed" in how
    worst, how = table.estimate(AccelLevel(64, dit_cache_interval=5))
    assert worst < 12 / 40 and "last resort" in how
    # A summary.json alone: labels that are run specs still say what they measured.
    shutil.copy(SWEEP / "summary.json", tmp_path / "summary.json")
    alone = QualityTable.load(tmp_path / "summary.json", 64, "vla-pruner")
    assert alone.estimate(AccelLevel(16))[0] == 27 / 40
    with pytest.raises(ValueError, match="no eval summary"):
        QualityTable.load(tmp_path / "nothing", 64, "vla-pruner")


def test_quality_of_cogact_cache_and_skip_levels():
    table = QualityTable.load(COGACT, 64, "vla-pruner")
    assert table.estimate(AccelLevel(64, 5))[0] == 22 / 40  # cogact-cache5
    assert table.estimate(AccelLevel(16, 5))[0] == 23 / 40  # cogact-cache5-vp25
    assert table.estimate(AccelLevel(32, 5))[0] == pytest.approx(22.5 / 40, abs=0.01)
    assert table.estimate(AccelLevel(16, 5, (1,)))[0] == 4 / 40  # + skip layer 1
    assert table.estimate(AccelLevel(64))[0] == 17 / 40  # dense


def m(level: AccelLevel, p50: float, quality: float | None = None, p90: float | None = None):
    return MeasuredLevel(level, p50, p90 or 1.1 * p50, 0.2 * p50, 3, quality, "test")


def test_pareto_front_with_quality():
    a, b, c, d, e = (AccelLevel(64), AccelLevel(48), AccelLevel(32), AccelLevel(64, 5),
                     AccelLevel(16, 5))
    measured = [m(a, 30, 0.85), m(b, 29, 0.85), m(c, 27, 0.80), m(d, 20, 0.82), m(e, 19.9, 0.5)]
    # a goes (b: as good, faster); c goes (d: better and cheaper); e saves 0.5 % over d, so
    # it stays only without a minimum gain. Order: by quality.
    assert [x.level for x in pareto_front(measured, min_gain=0.03)] == [b, d]
    assert [x.level for x in pareto_front(measured)] == [b, d, e]


def test_pareto_front_keeps_a_level_cheaper_in_one_part():
    """A pruned level no faster in total (its scoring costs what the tokens save) stays when
    its token part is lower: under a token-heavy load it is the faster one."""
    full = MeasuredLevel(AccelLevel(64), 6.0, 6.5, 2.0, 3)  # fixed 4.0, token 2.0
    pruned = MeasuredLevel(AccelLevel(32), 6.5, 7.0, 1.0, 3)  # fixed 5.5, token 1.0
    same = MeasuredLevel(AccelLevel(48), 6.6, 7.0, 1.98, 3)  # saves nothing over full
    front = pareto_front([full, pruned, same], min_gain=0.03)
    assert [x.level for x in front] == [AccelLevel(64), AccelLevel(32)]


def test_pareto_front_by_levers_alone_and_infeasible_budgets():
    a, b, c, d = AccelLevel(64), AccelLevel(48), AccelLevel(64, compile=True), AccelLevel(64, 5)
    # No quality: c beats a (same math, faster); b stays (fewer tokens, but faster than c);
    # d stays (the fastest). Ordered by latency alone.
    measured = [m(a, 30), m(b, 24), m(c, 25), m(d, 15, p90=22.0)]
    front = build_front(measured, "vla-pruner")
    assert [x.level for x in front.front] == [c, b, d]
    slower_b = build_front([m(a, 30), m(b, 34), m(c, 25)], "vla-pruner")
    assert [x.level for x in slower_b.front] == [c]  # c keeps more tokens and is cheaper
    assert "levers alone" in front.quality_note
    assert front.infeasible(25.0) is None and front.infeasible(0.0) is None
    msg = front.infeasible(20.0)
    assert "20 ms" in msg and "22.0 ms" in msg and d.name in msg
    assert isinstance(front, LevelFront) and front.costs[0].total == pytest.approx(25.0)


def test_token_costs_shrink_with_every_pruned_token():
    """Noisy prefill times on a small model (48 tokens measured dearer than 64): the token part
    becomes one rate per lever combination times the kept tokens."""
    noisy = [MeasuredLevel(AccelLevel(64), 8.0, 9.0, 1.1, 3),
             MeasuredLevel(AccelLevel(48), 8.0, 9.0, 1.2, 3),
             MeasuredLevel(AccelLevel(32), 7.5, 8.0, 0.5, 3),
             MeasuredLevel(AccelLevel(64, compile=True), 6.0, 7.0, 3.0, 3)]
    smooth = smooth_token_costs(noisy)
    tokens = [x.token_ms for x in smooth[:3]]
    assert tokens[0] > tokens[1] > tokens[2] > 0
    assert tokens[0] / 64 == pytest.approx(tokens[2] / 32)
    assert smooth[3].token_ms == pytest.approx(3.0)  # its own group, its own rate
    assert all(x.p50_ms == y.p50_ms for x, y in zip(noisy, smooth))


# -- levels on a real policy ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def micro():
    pytest.importorskip("torch")
    from tests.ros.ros_helpers import micro_policy

    return micro_policy


def test_level_changes_keep_the_episode_across_weight_copies(micro):
    from vla_prune.runspec import parse_run_spec
    from vla_prune.runtime.accel import LevelRunner

    image = np.random.default_rng(0).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    runner = LevelRunner(micro(), parse_run_spec("vla-pruner@1.0"), weights=["int8"])
    assert set(runner.copies) == {"fp32", "int8"}
    assert runner.copies["fp32"] is not runner.copies["int8"]
    runner.apply(AccelLevel(32), reset=True)
    for _ in range(4):  # past VLA-Pruner's 3 warm-up steps, which keep every token
        runner.step(image, "press the button")
    assert runner.step(image, "press the button").kept_visual_tokens == 32
    history = runner.policy._histories
    # Another weight format is another model: the episode moves with the level.
    runner.apply(AccelLevel(16, weights="int8"))
    assert runner.policy is runner.copies["int8"] and runner.policy._histories is history
    assert runner.step(image, "press the button").kept_visual_tokens == 16
    # A new episode starts over: the pruner's warm-up again, whichever copy runs.
    runner.apply(AccelLevel(16, weights="int8"), reset=True)
    assert runner.step(image, "press the button").kept_visual_tokens == 64


def test_measure_drops_a_level_the_policy_cannot_run(micro):
    from vla_prune.runspec import parse_run_spec
    from vla_prune.runtime.accel import LevelRunner, measure_levels

    runner = LevelRunner(micro(), parse_run_spec("vla-pruner@1.0"))
    # Layer 1 is VLA-Pruner's action layer on a 2-layer LLM: skipping it is refused.
    cands = [AccelLevel(64), AccelLevel(32), AccelLevel(32, skip_layers=(1,))]
    measured, failed = measure_levels(runner, cands, steps=2, warmup=3)
    assert [x.level for x in measured] == cands[:2]
    assert list(failed) == ["keep32+skip[1]"] and "cannot skip" in failed["keep32+skip[1]"]
    assert all(x.p90_ms >= x.p50_ms > 0 and x.steps == 2 for x in measured)
    with pytest.raises(RuntimeError, match="baseline"):
        measure_levels(runner, cands[2:], steps=1, warmup=0)


class FakeRunner:
    """LevelRunner's interface with a fake clock: a step at level L takes MS[L] ms."""

    MS = {AccelLevel(64): 50.0, AccelLevel(32): 20.0}

    def __init__(self):
        self.now, self.level, self.resets = 0.0, None, 0

    def apply(self, level, reset=False):
        self.level = level
        self.resets += reset

    def step(self, image, instruction):
        from vla_prune.policy import StepResult

        self.now += self.MS[self.level] / 1e3
        actions = np.full((1, 7), 0.01, dtype=np.float32)
        actions[0, -1] = 0.7
        ms = self.MS[self.level]
        return StepResult(actions, None, {"prefill": ms / 2, "total": ms}, self.level.keep_count)


def test_budgeted_policy_answers_misses_safely_and_counts_per_episode():
    from vla_prune.runtime.accel import BudgetedPolicy

    runner = FakeRunner()
    levels = [m(AccelLevel(64), 25.0), m(AccelLevel(32), 10.0)]  # measured on a faster day
    front = LevelFront(levels, levels, "vla-pruner", "test")
    bp = BudgetedPolicy(runner, front, BudgetConfig(budget_ms=30.0), clock=lambda: runner.now)
    assert bp.infeasible is None and bp.controller.level == 0  # 25 ms fits the 25.5 ms target
    image = np.zeros((8, 8, 3), np.uint8)
    first = bp.step(image, "x")  # 50 ms today: a miss, the safe action, one level faster
    assert first.missed and first.level == AccelLevel(64)
    np.testing.assert_array_equal(first.actions, np.zeros((1, 7)))  # gripper 0: none yet
    second = bp.step(image, "x")
    assert not second.missed and second.level == AccelLevel(32)
    assert second.actions[0, -1] == pytest.approx(0.7)
    assert bp.counts == {"steps": 2, "deadline_misses": 1, "level_changes": 1}
    assert bp.levels_used == {"keep64": 1, "keep32": 1}
    assert bp.changes[0]["reason"] == "escalate" and "50.0 ms" in bp.changes[0]["detail"]
    bp.reset()
    assert bp.counts == {} and bp.levels_used == {} and bp.changes == []
    assert bp.step(image, "x").level == AccelLevel(32)  # the level carries over episodes
    # A budget below every level's measured p90 is infeasible, and says so.
    tight = BudgetedPolicy(runner, front, BudgetConfig(budget_ms=5.0), clock=lambda: runner.now)
    assert "infeasible" in tight.infeasible and "11.0 ms" in tight.infeasible


def test_eval_under_a_simulated_budget(micro, tmp_path):
    """EvalConfig.budget_ms runs each configuration through the controller: a budget nothing
    meets executes only safe actions and says why; a generous one the policy's own."""
    import os

    os.environ.setdefault("MUJOCO_GL", "egl")  # headless, before mujoco is first imported
    pytest.importorskip("mujoco", reason="needs the sim extra")
    from sim.eval.config import EvalConfig, parse_runs
    from sim.eval.runner import run_eval

    checkpoint = micro().save(tmp_path / "micro")
    records = {}
    for name, budget in (("tight", 1e-3), ("generous", 1e5)):
        cfg = EvalConfig(
            policy=str(checkpoint), tasks=("press",), episodes=2, max_steps=4,
            runs=parse_runs("vla-pruner@1.0"), out=str(tmp_path / name), warmup=1,
            budget_ms=budget, budget_min_keep=0.5,
        )
        run_eval(cfg, progress=False)
        lines = (tmp_path / name / "episodes.jsonl").read_text().splitlines()
        records[name] = [json.loads(x) for x in lines]
    for r in records["tight"]:
        b = r["budget"]
        assert b["deadline_misses"] == b["policy_steps"] == r["policy_steps"] == 4, b
        assert "infeasible" in b["infeasible"]
        assert sum(b["levels"].values()) == 4  # per episode, not across them
    for r in records["generous"]:
        b = r["budget"]
        assert b["deadline_misses"] == 0 and b["infeasible"] is None and b["policy_steps"] == 4
        assert b["levels"] == {"keep64": 4}  # the best level fits: no reason to move
    # The budget is part of what an OUT folder measured: resuming with another is refused.
    cfg = EvalConfig(policy=str(checkpoint), tasks=("press",), episodes=2, max_steps=4,
                     runs=parse_runs("vla-pruner@1.0"), out=str(tmp_path / "tight"),
                     budget_ms=50.0)
    with pytest.raises(ValueError, match="budget_ms"):
        run_eval(cfg, progress=False)

"""A policy at any acceleration level: apply levels, time them, run under a latency budget.

`LevelRunner` holds the policy and one copy per weight format the levels need (a weight
conversion only goes down in precision, so fp32 / bf16 / int8 levels cannot share one model;
`compile` and everything else are set with `configure` on the same copy). Changing level never
starts a new episode: the episode's temporal state (VLA-Pruner's action-score history and step
count, CogACT's ensemble and noise streams) moves to the copy that runs the next step.

`measure_levels` times every candidate level on a few steps (real shapes, this process's
threads and device), interleaved round by round so load drift spreads over all levels alike.
`build_level_front` chains candidates -> measurement -> quality -> front
(vla_prune.runtime.levels). `BudgetedPolicy` is the ROS node's control loop without ROS: the
controller walks the front, and a step over the budget is answered with the safe action, as the
node does at a deadline (a simulated budget: the step still runs to its end).
"""

from __future__ import annotations

import copy
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .budget import WEIGHT_ORDER, AccelLevel, BudgetConfig, BudgetController, Decision
from .levels import LevelFront, LevelSearch, MeasuredLevel, QualityTable, build_front

log = logging.getLogger(__name__)

MEASURE_INSTRUCTION = "pick up the block"

StepFn = Callable[[np.ndarray, str], Any]  # (image, instruction) -> StepResult


def transfer_episode(src: Any, dst: Any) -> None:
    """Continue `src`'s episode on `dst` (another copy of the same policy)."""
    if src is not dst:
        dst.set_episode_state(src.episode_state())


def baseline_level(spec: Any, policy: Any) -> AccelLevel:
    """The least accelerated level: what the run spec itself configures."""
    n = policy.config.num_patches
    keep = spec.prune.budget(n) if spec.prune.prunes else n
    weights = spec.weights or policy.engine_config.weights
    return AccelLevel(
        keep_count=keep,
        dit_cache_interval=spec.cache or 1,
        skip_layers=tuple(spec.skip_layers),
        compile=bool(spec.compile),
        weights=weights,
    )


class LevelRunner:
    """One policy, run at any `AccelLevel` (see the module docstring).

    `spec` is a `vla_prune.runspec.RunSpec`: its pruning method and layer settings hold at
    every level; a level sets the keep count, DiT cache, skipped layers and engine.
    `policy` must not have been converted below the precision any level needs; copies for
    other weight formats are made from it (deep copies) before anything is converted.
    """

    def __init__(self, policy: Any, spec: Any, weights: Sequence[str] = ()):
        self.spec = spec
        self.num_visual = policy.config.num_patches
        self.has_dit = policy.head.cache_config is not None
        self.baseline = baseline_level(spec, policy)
        if spec.cache is not None and not self.has_dit:
            raise ValueError(f"{spec.label!r}: cache{spec.cache} needs a CogACT policy")
        loaded = policy.engine_config.weights
        need = sorted({self.baseline.weights, *weights}, key=WEIGHT_ORDER.index)
        if WEIGHT_ORDER.index(need[0]) < WEIGHT_ORDER.index(loaded):
            raise ValueError(f"the policy is loaded with {loaded} weights; {need[0]} needs the "
                             "original weights: load it again")
        # Copies first, all from the weights as loaded; conversions happen at the first
        # apply(). The policy itself serves the most precise format needed.
        self.copies: dict[str, Any] = {need[0]: policy}
        for w in need[1:]:
            self.copies[w] = copy.deepcopy(policy)
        self._active = self.copies[self.baseline.weights]
        self.level: AccelLevel | None = None

    @property
    def policy(self) -> Any:
        """The copy that runs the next step."""
        return self._active

    def ensure_weights(self, weights: str) -> None:
        if weights not in self.copies:
            raise ValueError(f"no {weights} copy: give it to LevelRunner(weights=...)")

    def settings(self, level: AccelLevel) -> dict[str, Any]:
        """configure() keywords for `level` (on the copy holding its weights)."""
        import dataclasses

        from ..config import EngineConfig

        prune = self.spec.prune
        if prune.prunes:  # vla-cache alone keeps every token, like dense
            prune = dataclasses.replace(prune, keep_ratio=None, keep_count=level.keep_count)
        kw: dict[str, Any] = {
            "prune": prune,
            "skip_layers": list(level.skip_layers),
            "engine": EngineConfig(compile=level.compile, weights=level.weights),
        }
        if self.has_dit:
            from ..caching import CacheConfig

            on = level.dit_cache_interval > 1
            kw["cache"] = CacheConfig(interval=level.dit_cache_interval if on else 5, enabled=on)
        return kw

    def apply(self, level: AccelLevel, reset: bool = False) -> None:
        """Run the next steps at `level`; `reset` starts a new episode, else it continues."""
        self.ensure_weights(level.weights)
        target = self.copies[level.weights]
        if not reset:
            transfer_episode(self._active, target)
        target.configure(**self.settings(level), reset=reset)
        self._active, self.level = target, level

    def reset(self) -> None:
        """New episode (the other copies pick it up when they run)."""
        self._active.reset()

    def step(self, image: np.ndarray, instruction: str):
        return self._active.step(image, instruction)


def measure_levels(
    runner: LevelRunner,
    candidates: Sequence[AccelLevel],
    steps: int = 3,
    warmup: int = 3,
    step_fn: StepFn | None = None,
    token_stages: Sequence[str] = ("prefill",),
    image: np.ndarray | None = None,
    instruction: str = MEASURE_INSTRUCTION,
) -> tuple[list[MeasuredLevel], dict[str, str]]:
    """Time each candidate: `warmup` untimed steps first (lazy init; a pruner's own warm-up
    steps, which keep every token), one untimed step per candidate (compilation, a copy's
    first run), then `steps` rounds over all candidates (engine by engine, one untimed step
    after each engine switch). Wall-clock ms of `step_fn` (default
    the runner's step; the ROS node passes its own, with its injected slowdown). A candidate
    that fails to configure or run is dropped: returns (measured, {level name: why})."""
    step_fn = step_fn or runner.step
    if image is None:
        size = runner.policy.config.image_size
        image = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    failed: dict[str, str] = {}
    alive: list[AccelLevel] = []
    try:
        runner.apply(candidates[0], reset=True)
        for _ in range(warmup):
            step_fn(image, instruction)
    except Exception as e:
        raise RuntimeError(f"the baseline level {candidates[0].name} fails: "
                           f"{type(e).__name__}: {e}") from e
    for level in candidates:
        try:
            runner.apply(level)
            step_fn(image, instruction)
            alive.append(level)
        except Exception as e:  # noqa: BLE001 - a lever this policy/machine cannot run
            failed[level.name] = f"{type(e).__name__}: {e}"[:300]
            log.warning("level %s dropped: %s", level.name, failed[level.name])
    if candidates[0] not in alive:
        raise RuntimeError(f"the baseline level {candidates[0].name} fails: "
                           f"{failed[candidates[0].name]}")
    times: dict[AccelLevel, list[float]] = {lv: [] for lv in alive}
    tokens: dict[AccelLevel, list[float]] = {lv: [] for lv in alive}
    # Levels of one engine (weights copy + compile) together: the first step after an engine
    # switch pays for it (caches reallocated, the static decoder rebuilt), which operation,
    # where levels change rarely, does not; that step is not timed.
    groups: dict[tuple[bool, str], list[AccelLevel]] = {}
    for lv in alive:
        groups.setdefault((lv.compile, lv.weights), []).append(lv)
    for _ in range(steps):
        for group in groups.values():
            runner.apply(group[0])
            step_fn(image, instruction)
            for level in group:
                runner.apply(level)
                t0 = time.perf_counter()
                result = step_fn(image, instruction)
                times[level].append((time.perf_counter() - t0) * 1e3)
                tokens[level].append(sum(result.timings_ms.get(s, 0.0) for s in token_stages))
    runner.reset()
    measured = [
        MeasuredLevel(
            lv,
            float(np.percentile(times[lv], 50)),
            float(np.percentile(times[lv], 90)),
            float(np.median(tokens[lv])),
            steps,
        )
        for lv in alive
    ]
    return measured, failed


def build_level_front(
    runner: LevelRunner,
    search: LevelSearch,
    quality: QualityTable | None = None,
    step_fn: StepFn | None = None,
    warmup: int = 3,
    token_stages: Sequence[str] = ("prefill",),
) -> LevelFront:
    """Candidates from `search` -> measured on `runner` -> the front (see levels.py)."""
    method = runner.spec.prune.method
    candidates = search.candidates(
        runner.baseline, runner.num_visual, prunes=runner.spec.prune.prunes, has_dit=runner.has_dit
    )
    window = runner.spec.prune.warmup_steps if runner.spec.prune.prunes else 0
    measured, failed = measure_levels(
        runner, candidates, search.timing_steps, max(warmup, window), step_fn, token_stages
    )
    return build_front(measured, method, quality, search.min_gain, failed)


def runner_for(policy: Any, spec: Any, search: LevelSearch) -> LevelRunner:
    """A LevelRunner with a copy for every weight format `search` can reach from `spec`."""
    base = baseline_level(spec, policy)
    engines = search.engines_for(base)
    return LevelRunner(policy, spec, weights=[e.weights for e in engines])


@dataclass
class BudgetedStep:
    """One step of a BudgetedPolicy."""

    result: Any  # the policy's StepResult (its actions are not executed when `missed`)
    actions: np.ndarray  # what to execute: the policy's, or the safe action
    latency_ms: float
    missed: bool  # over the budget: answered with the safe action
    level: AccelLevel  # the level the step ran at
    decision: Decision


@dataclass
class BudgetedPolicy:
    """The node's control loop without ROS (see the module docstring): reset(), step()."""

    runner: LevelRunner
    front: LevelFront
    config: BudgetConfig
    safe_action: str = "hold"  # hold: zero deltas, gripper kept | zero: all zeros
    counts: Counter = field(default_factory=Counter)  # this episode: steps, misses, changes
    levels_used: Counter = field(default_factory=Counter)  # this episode: level name -> steps
    changes: list[dict[str, Any]] = field(default_factory=list)  # this episode's level changes
    clock: Callable[[], float] = time.perf_counter  # seconds; tests pass a fake one

    def __post_init__(self):
        self.controller = BudgetController(
            self.config, self.front.levels, level=None, costs=self.front.costs
        )
        self.infeasible = self.front.infeasible(self.config.budget_ms)
        if self.infeasible:
            log.error("%s", self.infeasible)
        self._gripper = 0.0
        self.runner.apply(self.controller.current, reset=True)

    def reset(self) -> None:
        self.counts, self.levels_used, self.changes = Counter(), Counter(), []
        self._gripper = 0.0
        self.runner.apply(self.controller.current, reset=True)

    def step(self, image: np.ndarray, instruction: str) -> BudgetedStep:
        level = self.controller.current
        if self.runner.level != level:
            self.runner.apply(level)  # same episode: the temporal history carries over
        index = self.controller.level
        t0 = self.clock()
        result = self.runner.step(image, instruction)
        latency = (self.clock() - t0) * 1e3
        decision = self.controller.observe(
            latency, result.timings_ms, kept=result.kept_visual_tokens, level=index
        )
        missed = self.config.enabled and latency > self.config.budget_ms
        self.counts["steps"] += 1
        self.levels_used[level.name] += 1
        if missed:
            self.counts["deadline_misses"] += 1
            actions = np.zeros((1, 7), dtype=np.float32)
            if self.safe_action == "hold":
                actions[0, -1] = self._gripper
        else:
            actions = np.asarray(result.actions)
            self._gripper = float(actions[-1, -1])
        if decision.changed:
            self.counts["level_changes"] += 1
            self.changes.append({
                "step": self.counts["steps"], "from": level.name,
                "to": self.controller.current.name, "reason": decision.reason,
                "detail": decision.detail,
            })
        return BudgetedStep(result, actions, latency, missed, level, decision)

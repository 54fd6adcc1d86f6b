"""Success under a latency budget, in simulation, before a robot (EvalConfig.budget_ms > 0).

Each configuration's spec is the least accelerated level, as the ROS node's `accel`: its levels
are built and measured once (vla_prune.runtime.accel.build_level_front), and every episode runs
through `BudgetedPolicy`, the node's control loop without ROS: the latency controller walks the
front, and a step whose measured latency exceeds the budget is executed as the safe action
(hold: zero deltas, gripper kept), as the node answers a missed deadline. The budget is
simulated (the env waits for the step, like the lock-step bridge), so a miss costs the episode
one held step, never a late action.

Levers here: kept tokens (down to `budget_min_keep` of the visual tokens), CogACT's DiT cache
and the configuration's own engine; weights are not converted (one policy per configuration).
Each record gets a ``budget`` entry: budget_ms, deadline_misses, policy_steps, levels (level
name -> policy steps), level_changes (step, from, to, reason, detail) and infeasible (the error,
or null).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from sim.eval.config import EvalConfig, RunConfig

log = logging.getLogger(__name__)


class _Answering:
    """A BudgetedPolicy seen as a policy by run_episode: a missed step's actions are the safe
    action (its timings and kept tokens stay the step's own)."""

    def __init__(self, budgeted):
        self.budgeted = budgeted

    def reset(self) -> None:
        self.budgeted.reset()

    def step(self, image, instruction):
        s = self.budgeted.step(image, instruction)
        return dataclasses.replace(s.result, actions=s.actions)


class BudgetRuns:
    """One BudgetedPolicy per configuration label, built on first use.

    The eval loop hands in its own pieces (loading a policy, a run's engine, one episode), so
    this module needs nothing from sim.eval.runner, which imports it."""

    def __init__(
        self,
        cfg: EvalConfig,
        load_policy: Callable[..., Any],
        run_engine: Callable[[RunConfig, EvalConfig], Any],
        run_episode: Callable[..., dict[str, Any]],
    ):
        if cfg.budget_ms <= 0:
            raise ValueError("BudgetRuns needs EvalConfig.budget_ms > 0")
        self.cfg = cfg
        self._load_policy, self._run_engine = load_policy, run_engine
        self._run_episode = run_episode
        self._by_label: dict[str, Any] = {}

    def policy(self, run: RunConfig):
        if run.label not in self._by_label:
            self._by_label[run.label] = self._build(run)
        return self._by_label[run.label]

    def _build(self, run: RunConfig):
        from vla_prune.runspec import RunSpec
        from vla_prune.runtime.accel import BudgetedPolicy, LevelRunner, build_level_front
        from vla_prune.runtime.budget import BudgetConfig
        from vla_prune.runtime.levels import LevelSearch, QualityTable

        cfg = self.cfg
        policy = self._load_policy(
            run.policy or cfg.policy, cfg.unnorm_key, cfg.suite, device=cfg.device,
            dtype=cfg.dtype,
        )
        if (sampling := policy.head.sampling) is not None:  # the configuration's ensemble
            policy.configure(sampling=dataclasses.replace(sampling, ensemble=run.ensemble))
        engine = self._run_engine(run, cfg)
        spec = RunSpec(
            run.label, run.prune, cache=run.cache, skip_layers=run.skip_layers,
            compile=engine.compile, weights=engine.weights,
        )
        runner = LevelRunner(policy, spec)
        search = LevelSearch(min_keep_fraction=cfg.budget_min_keep, engines=())
        quality = None
        if cfg.budget_quality:
            n = policy.config.num_patches
            quality = QualityTable.load(cfg.budget_quality, n, run.prune.method)
        front = build_level_front(runner, search, quality, warmup=cfg.warmup)
        for line in front.summary_lines():
            log.info("%s: %s", run.label, line)
        return BudgetedPolicy(runner, front, BudgetConfig(budget_ms=cfg.budget_ms))

    def run_episode(
        self, run: RunConfig, env, seed: int, max_steps: int, video: bool = False
    ) -> dict[str, Any]:
        """sim.eval.runner.run_episode under the budget, plus the record's ``budget`` entry."""
        budgeted = self.policy(run)
        answering = _Answering(budgeted)
        ep = self._run_episode(env, answering, seed, max_steps, video=video, blind=run.blind)
        ep["budget"] = {
            "budget_ms": self.cfg.budget_ms,
            "deadline_misses": budgeted.counts["deadline_misses"],
            "policy_steps": budgeted.counts["steps"],
            "levels": dict(budgeted.levels_used),
            "level_changes": list(budgeted.changes),
            "infeasible": budgeted.infeasible,
        }
        return ep

"""The policy side of the node, without ROS: model, levels, latency controller, slowdown.

At construction (the node's configure) the acceleration levels are built from the policy and
the `accel` run spec, each candidate is timed on a few steps through `infer` (so an injected
slowdown counts, like a slower machine), and the controller gets the latency / quality front
(vla_prune.runtime.levels). A budget that even the fastest level's measured p90 exceeds is
reported as infeasible: an error in the log, ERROR on diagnostics.

The node calls `sync_policy` from its control thread while no step runs (so reconfiguring the
policy never races a step), `infer` in its worker thread, and `finished` when a step ends (in
time or late) to feed the controller and the statistics.
"""

from __future__ import annotations

import concurrent.futures as cf
import time
from typing import Any

import numpy as np

from ros_nodes.diagnostics import NodeStats, StepLog
from ros_nodes.params import PolicyNodeParams, accel_spec
from vla_prune.runtime.budget import AccelLevel, BudgetConfig, BudgetController, Decision

WARMUP_INSTRUCTION = "pick up the block"


def level_search(p: PolicyNodeParams):
    """The parameters' LevelSearch (ValueError naming the parameter if one is malformed)."""
    from vla_prune.runtime.levels import (
        LevelSearch,
        parse_engines,
        parse_ints,
        skip_sets_from_calibration,
    )

    return LevelSearch(
        min_keep_fraction=p.min_keep_fraction,
        min_keep_tokens=p.min_keep_tokens,
        engines=parse_engines(p.level_engines),
        cache_intervals=parse_ints(p.level_cache, "level_cache"),
        skip_sets=skip_sets_from_calibration(p.skip_file) if p.skip_file else (),
        timing_steps=p.level_timing_steps,
        min_gain=p.level_min_gain,
    )


class PolicyRuntime:
    def __init__(self, p: PolicyNodeParams, stats: NodeStats, logger: Any):
        import threading

        import torch

        import vla_prune
        from vla_prune.runtime.accel import build_level_front, runner_for
        from vla_prune.runtime.levels import QualityTable

        self.log = logger
        self.stats = stats
        self.p = p
        torch.set_num_threads(p.threads)
        policy = vla_prune.policy_from(p.policy, p.unnorm_key or None, seed=p.seed)
        if policy.unnorm_key is None:
            raise ValueError(
                f"this checkpoint has several dataset statistics {sorted(policy.norm_stats)}"
                ": set the unnorm_key parameter"
            )
        self.num_visual = policy.config.num_patches
        spec = accel_spec(p.accel)
        search = level_search(p)
        self.runner = runner_for(policy, spec, search)
        quality = None
        if p.quality_summary:
            quality = QualityTable.load(p.quality_summary, self.num_visual, spec.prune.method)
        self._lock = threading.Lock()
        t0 = time.perf_counter()
        self.front = build_level_front(
            self.runner, search, quality, step_fn=self.infer, warmup=p.warmup_steps,
            token_stages=self._token_stages(p),
        )
        for line in self.front.summary_lines():
            self.log.info(line)
        self.log.info(f"levels measured in {time.perf_counter() - t0:.1f} s")
        self.controller = BudgetController(
            self._budget_config(p), self.front.levels, level=None, costs=self.front.costs
        )
        self.stats.levels = len(self.front.front)
        self.stats.fastest_p90_ms = self.front.fastest.p90_ms
        self.step_log = StepLog(p.step_log_path) if p.step_log_path else None
        self._applied: AccelLevel | None = None
        self._running = self.controller.level  # the level the current / last step ran at
        self._pending_change: dict | None = None  # a change between steps, for the step log
        self._reset = True
        self._check_feasible()
        self.sync_policy()

    # -- configuration ------------------------------------------------------------------------

    @staticmethod
    def _token_stages(p: PolicyNodeParams) -> tuple[str, ...]:
        return ("prefill", "inject") if p.inject_delay_mode == "per_token" else ("prefill",)

    def _budget_config(self, p: PolicyNodeParams) -> BudgetConfig:
        return BudgetConfig(
            budget_ms=p.budget_ms,
            target_fraction=p.budget_target,
            relax_fraction=p.budget_relax,
            relax_after=p.relax_after_steps,
            max_relax_after=max(240, p.relax_after_steps),
            token_stages=self._token_stages(p),
        )

    def _check_feasible(self) -> None:
        """Infeasible budget -> an error naming both numbers; diagnostics show it as ERROR."""
        message = self.front.infeasible(self.controller.config.budget_ms)
        if message and message != self.stats.infeasible:
            action = ("acting on late results (frame_id policy/late)"
                      if self.p.on_infeasible == "late" else "answering with the safe action")
            self.log.error(f"{message}; {action} (on_infeasible: {self.p.on_infeasible})")
        elif not message and self.stats.infeasible:
            self.log.info(f"budget {self.controller.config.budget_ms:g} ms can be met again")
        self.stats.infeasible = message or ""

    @property
    def infeasible(self) -> bool:
        return bool(self.stats.infeasible)

    @property
    def act_late(self) -> bool:
        """A missed deadline is answered with the late result instead of the safe action."""
        return self.infeasible and self.p.on_infeasible == "late"

    def update(self, p: PolicyNodeParams) -> None:
        """Run-time parameter change (already validated)."""
        with self._lock:
            old, self.p = self.p, p
            config = self._budget_config(p)
            if config != self.controller.config:
                budget_changed = p.budget_ms != self.controller.config.budget_ms
                self.controller.config = config
                if budget_changed:
                    self._note(self.controller.set_budget(p.budget_ms))
            if (old.budget_ms, old.on_infeasible) != (p.budget_ms, p.on_infeasible):
                self._check_feasible()
            self._report_level()

    def _note(self, decision: Decision) -> None:
        """A level change outside a step (a new budget): logged, and put in the next step's
        log record."""
        if decision.changed:
            self._pending_change = self._change_record(decision)
            self.log.info(self._change_text(decision))

    def request_reset(self) -> None:
        """New episode: clear the policy's temporal history before the next step."""
        with self._lock:
            self._reset = True

    def sync_policy(self) -> None:
        """Apply a pending level change or reset; only while no step runs. A level change
        within an episode keeps VLA-Pruner's temporal history (configure(reset=False))."""
        with self._lock:
            level, index, reset = self.controller.current, self.controller.level, self._reset
            self._reset = False
        if level != self._applied:
            self.runner.apply(level, reset=reset)
            self._applied = level
        elif reset:
            self.runner.reset()
        self._running = index
        self._report_level()

    def _report_level(self) -> None:
        self.stats.level = self.controller.level
        self.stats.level_name = self.controller.current.name
        self.stats.budget_ms = self.controller.config.budget_ms

    # -- steps --------------------------------------------------------------------------------

    def infer(self, image: np.ndarray, instruction: str):
        """One policy step (worker thread), plus the injected slowdown if any."""
        result = self.runner.step(image, instruction)
        p = self.p
        if p.inject_delay_ms > 0:
            delay = p.inject_delay_ms * self._inject_fraction(result)
            time.sleep(delay / 1e3)
            result.timings_ms["inject"] = delay
            result.timings_ms["total"] += delay
        return result

    def _inject_fraction(self, result) -> float:
        mode = self.p.inject_delay_mode
        if mode == "per_token":  # like the LLM cost of a full-size VLA
            return result.kept_visual_tokens / self.num_visual
        if mode == "per_dit_block":  # like a big DiT head: the DiT cache skips blocks
            computed = float(result.extra.get("dit_blocks_computed", 1))
            skipped = float(result.extra.get("dit_blocks_skipped", 0))
            return computed / max(computed + skipped, 1.0)
        return 1.0

    def finished(
        self, future: cf.Future, t0: float, missed: bool, stamp_ns: int = 0,
        end: float | None = None,
    ) -> float:
        """Bookkeeping when a step ends: latency (ms from t0 to `end`, default now) -> controller
        and statistics."""
        latency = ((time.perf_counter() if end is None else end) - t0) * 1e3
        if future.cancelled() or future.exception() is not None:
            return latency
        result = future.result()
        with self._lock:
            ran, budget = self._running, self.controller.config.budget_ms
            decision = self.controller.observe(
                latency, result.timings_ms, kept=result.kept_visual_tokens, level=ran
            )
            self._report_level()
            change, self._pending_change = self._pending_change, None
        if decision.changed:
            change = self._change_record(decision)
            self.log.info(self._change_text(decision))
        policy_ms = result.timings_ms.get("total", latency)
        self.stats.kept_tokens = result.kept_visual_tokens
        self.stats.finished(latency, policy_ms, missed)
        if self.step_log is not None:
            record = {
                "stamp": stamp_ns, "latency_ms": round(latency, 3),
                "policy_ms": round(policy_ms, 3), "inject_ms": result.timings_ms.get("inject", 0.0),
                "kept": result.kept_visual_tokens, "level": ran,
                "level_name": self.controller.levels[ran].name, "budget_ms": budget,
                "missed": missed or (budget > 0 and latency > budget),
            }
            if change is not None:
                record["change"] = change
            self.step_log.write(record)
        return latency

    def _change_record(self, d: Decision) -> dict:
        levels = self.controller.levels
        return {"from": levels[d.previous].name, "to": levels[d.level].name,
                "reason": d.reason, "detail": d.detail}

    def _change_text(self, d: Decision) -> str:
        levels = self.controller.levels
        return (f"level {levels[d.previous].name} -> {levels[d.level].name} "
                f"({d.reason}: {d.detail})")

    def close(self) -> None:
        if self.step_log is not None:
            self.step_log.close()

    def classify_error(self, err: Exception) -> str:
        """A failed step -> the safe-action reason; bad inputs are counted as rejections."""
        from vla_prune import InputError

        if isinstance(err, InputError):
            self.stats.reject("policy_input", str(err))
            return "rejected_input"
        self.log.error(f"policy step failed: {type(err).__name__}: {err}")
        return "policy_error"


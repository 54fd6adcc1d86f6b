"""The policy side of the node, without ROS: model, latency controller, injected slowdown.

The node calls `sync_policy` from its control thread while no step runs (so reconfiguring the
policy never races a step), `infer` in its worker thread, and `finished` when a step ends (in
time or late) to feed the controller and the statistics.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import threading
import time
from typing import Any

import numpy as np

from ros_nodes.diagnostics import NodeStats, StepLog
from ros_nodes.params import PolicyNodeParams, accel_spec
from vla_prune.runtime.budget import AccelLevel, BudgetConfig, BudgetController, make_levels

WARMUP_INSTRUCTION = "pick up the block"


class PolicyRuntime:
    def __init__(self, p: PolicyNodeParams, stats: NodeStats, logger: Any):
        import torch

        import vla_prune

        self.log = logger
        self.stats = stats
        self.p = p
        torch.set_num_threads(p.threads)
        self.policy = vla_prune.policy_from(p.policy, p.unnorm_key or None, seed=p.seed)
        if self.policy.unnorm_key is None:
            raise ValueError(
                f"this checkpoint has several dataset statistics {sorted(self.policy.norm_stats)}"
                ": set the unnorm_key parameter"
            )
        self.num_visual = self.policy.config.num_patches
        self._lock = threading.Lock()
        self.controller = BudgetController(self._budget_config(p), self._levels(p))
        self.step_log = StepLog(p.step_log_path) if p.step_log_path else None
        self._applied: AccelLevel | None = None
        self._reset = True
        self.sync_policy()
        self._warm_up(p.warmup_steps)

    # -- configuration ------------------------------------------------------------------------

    def _levels(self, p: PolicyNodeParams) -> list[AccelLevel]:
        prune = accel_spec(p.accel).prune
        if prune.method == "none":
            return [AccelLevel(self.num_visual)]
        return make_levels(self.num_visual, prune.budget(self.num_visual), p.min_keep_tokens)

    def _budget_config(self, p: PolicyNodeParams) -> BudgetConfig:
        stages = ("prefill", "inject") if p.inject_delay_mode == "per_token" else ("prefill",)
        return BudgetConfig(
            budget_ms=p.budget_ms,
            target_fraction=p.budget_target,
            relax_fraction=p.budget_relax,
            relax_after=p.relax_after_steps,
            max_relax_after=max(240, p.relax_after_steps),
            token_stages=stages,
        )

    def update(self, p: PolicyNodeParams) -> None:
        """Run-time parameter change (already validated)."""
        with self._lock:
            old, self.p = self.p, p
            if self._budget_config(p) != self.controller.config:
                budget_changed = p.budget_ms != self.controller.config.budget_ms
                self.controller.config = self._budget_config(p)
                if budget_changed:
                    self.controller.set_budget(p.budget_ms)
            if (p.accel, p.min_keep_tokens) != (old.accel, old.min_keep_tokens):
                self.controller.set_levels(self._levels(p))
                self._applied = None  # the spec may change more than the keep count
            self._report_level()

    def request_reset(self) -> None:
        """New episode: clear the policy's temporal history before the next step."""
        with self._lock:
            self._reset = True

    def policy_settings(self, level: AccelLevel) -> dict[str, Any]:
        """configure() keywords for `level`: the accel spec with the level's keep count."""
        spec = accel_spec(self.p.accel)
        prune = spec.prune
        if prune.method != "none":
            prune = dataclasses.replace(prune, keep_ratio=None, keep_count=level.keep_count)
        kw: dict[str, Any] = {
            "prune": prune,
            "skip_layers": list(spec.skip_layers),
            "engine": spec.engine(),  # fp32 eager unless the spec says +compile / +bf16 / +int8
        }
        if hasattr(self.policy, "cache_config"):  # CogACT: the DiT cache is part of the spec
            from vla_prune.caching import CacheConfig

            interval = spec.cache or self.policy.cache_config.interval
            kw["cache"] = CacheConfig(interval=interval, enabled=spec.cache is not None)
        elif spec.cache is not None:
            raise ValueError(f"parameter accel={self.p.accel!r}: cache needs a CogACT policy")
        return kw

    def sync_policy(self) -> None:
        """Apply a pending level change or reset; only while no step runs."""
        with self._lock:
            level, reset = self.controller.current, self._reset
            self._reset = False
        if level != self._applied:
            self.policy.configure(**self.policy_settings(level), reset=reset)
            self._applied = level
        elif reset:
            self.policy.reset()
        self._report_level()

    def _report_level(self) -> None:
        self.stats.level = self.controller.level
        self.stats.level_name = self.controller.current.name
        self.stats.budget_ms = self.controller.config.budget_ms

    def _warm_up(self, steps: int) -> None:
        if steps <= 0:
            return
        size = self.policy.config.image_size
        image = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
        for _ in range(steps):
            self.policy.step(image, WARMUP_INSTRUCTION)
        self.policy.reset()

    # -- steps --------------------------------------------------------------------------------

    def infer(self, image: np.ndarray, instruction: str):
        """One policy step (worker thread), plus the injected slowdown if any."""
        result = self.policy.step(image, instruction)
        p = self.p
        if p.inject_delay_ms > 0:
            delay = p.inject_delay_ms
            if p.inject_delay_mode == "per_token":  # like the LLM cost of a full-size VLA
                delay *= result.kept_visual_tokens / self.num_visual
            time.sleep(delay / 1e3)
            result.timings_ms["inject"] = delay
            result.timings_ms["total"] += delay
        return result

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
            level, budget = self.controller.level, self.controller.config.budget_ms
            self.controller.observe(latency, result.timings_ms, kept=result.kept_visual_tokens)
            self._report_level()
        policy_ms = result.timings_ms.get("total", latency)
        self.stats.kept_tokens = result.kept_visual_tokens
        self.stats.finished(latency, policy_ms, missed)
        if self.step_log is not None:
            self.step_log.write({
                "stamp": stamp_ns, "latency_ms": round(latency, 3),
                "policy_ms": round(policy_ms, 3), "inject_ms": result.timings_ms.get("inject", 0.0),
                "kept": result.kept_visual_tokens, "level": level, "budget_ms": budget,
                "missed": missed or (budget > 0 and latency > budget),
            })
        return latency

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

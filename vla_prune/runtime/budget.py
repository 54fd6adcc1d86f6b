"""Latency-budget controller: pick an acceleration level so each control step fits its budget.

Pure Python (no ROS, no torch): the ROS policy node feeds it measured step latencies and applies
the level it chooses; unit tests drive it with synthetic traces.

Levels are ordered from no acceleration (index 0) to the fastest allowed (last index, never
below the quality floor). Rules, per observed step:

* escalate (go faster) on a step over the budget, or after `escalate_after` consecutive steps
  over the target (`target_fraction` x budget). A lone miss moves one level (it may be an
  outlier); from `escalate_after` over-target steps in a row the jump size comes from a latency
  model (fixed part + per-token part, estimated from the stage timings), so a large load step
  is answered within two steps instead of one level per step;
* relax (go one level slower) only after `relax_after` consecutive steps under
  `relax_fraction` x budget, and only if the model predicts the slower level still fits the
  target. A relax that is answered by an escalation within a few steps doubles the wait before
  the next relax (up to `max_relax_after`): no oscillation between two levels.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

log = logging.getLogger(__name__)

# Kept visual tokens of the default levels below the baseline (OpenVLA has 256 patches).
DEFAULT_KEEP_COUNTS = (192, 128, 96, 64, 48, 32)
# Stages whose cost grows with the number of kept visual tokens (the LLM after the pruning
# point). "inject" is the ROS node's synthetic per-token slowdown.
DEFAULT_TOKEN_STAGES = ("prefill",)


@dataclass(frozen=True)
class AccelLevel:
    """One acceleration configuration. More fields (DiT cache interval, layer skips) slot in
    here as the policy learns to apply them; the controller only orders and predicts levels."""

    keep_count: int  # kept visual tokens after the pruning point (= all tokens: no pruning)
    dit_cache_interval: int = 1  # reuse DiT features every N denoising steps (1 = off)
    skip_layers: tuple[int, ...] = ()  # LLM layers skipped (empty = none)

    @property
    def name(self) -> str:
        parts = [f"keep{self.keep_count}"]
        if self.dit_cache_interval > 1:
            parts.append(f"dit{self.dit_cache_interval}")
        if self.skip_layers:
            parts.append("skip" + "-".join(map(str, self.skip_layers)))
        return "+".join(parts)


def make_levels(
    num_visual: int,
    baseline_keep: int | None = None,
    min_keep: int = 32,
    keep_counts: Sequence[int] = DEFAULT_KEEP_COUNTS,
) -> list[AccelLevel]:
    """Levels from the baseline (all tokens unless given) down to the quality floor `min_keep`.

    Keep counts at or above the baseline are dropped; the floor itself is always the last level
    when it lies below the baseline.
    """
    if num_visual < 1:
        raise ValueError(f"num_visual must be >= 1, got {num_visual}")
    base = num_visual if baseline_keep is None else max(1, min(baseline_keep, num_visual))
    floor = max(1, min(min_keep, base))
    counts = sorted({c for c in keep_counts if floor <= c < base} | {floor}, reverse=True)
    return [AccelLevel(base)] + [AccelLevel(c) for c in counts if c < base]


@dataclass(frozen=True)
class BudgetConfig:
    budget_ms: float  # per-step latency budget; <= 0 disables the controller
    target_fraction: float = 0.85  # aim each step at this fraction of the budget
    relax_fraction: float = 0.6  # headroom below which a slower (better) level is tried
    escalate_after: int = 2  # consecutive over-target steps before going faster
    relax_after: int = 15  # consecutive steps under relax_fraction before going slower
    max_relax_after: int = 240  # cap of the doubling wait after failed relaxes
    ema_alpha: float = 0.3  # weight of the newest step in the latency model
    token_stages: tuple[str, ...] = DEFAULT_TOKEN_STAGES

    def __post_init__(self):
        if not 0.0 < self.relax_fraction < self.target_fraction <= 1.0:
            raise ValueError(
                "need 0 < relax_fraction < target_fraction <= 1, got "
                f"{self.relax_fraction} and {self.target_fraction}"
            )
        if self.escalate_after < 1 or self.relax_after < 1:
            raise ValueError("escalate_after and relax_after must be >= 1")
        if self.max_relax_after < self.relax_after:
            raise ValueError("max_relax_after must be >= relax_after")
        if not 0.0 < self.ema_alpha <= 1.0:
            raise ValueError(f"ema_alpha must be in (0, 1], got {self.ema_alpha}")

    @property
    def enabled(self) -> bool:
        return self.budget_ms > 0

    @property
    def target_ms(self) -> float:
        return self.target_fraction * self.budget_ms

    @property
    def relax_ms(self) -> float:
        return self.relax_fraction * self.budget_ms


@dataclass
class Decision:
    """What observe() did: the level after this step and why it changed (or not)."""

    level: int
    changed: bool
    reason: str  # "hold", "escalate", "relax", "disabled"
    over_budget: bool


@dataclass
class _Model:
    """EMA latency model: total ~= fixed + per_token * kept tokens."""

    fixed_ms: float | None = None
    per_token_ms: float | None = None

    def update(self, fixed: float, per_token: float, alpha: float) -> None:
        if self.fixed_ms is None or self.per_token_ms is None:
            self.fixed_ms, self.per_token_ms = fixed, per_token
        else:
            self.fixed_ms += alpha * (fixed - self.fixed_ms)
            self.per_token_ms += alpha * (per_token - self.per_token_ms)

    def predict(self, keep: int) -> float | None:
        if self.fixed_ms is None or self.per_token_ms is None:
            return None
        return self.fixed_ms + self.per_token_ms * keep


@dataclass
class BudgetController:
    """Chooses the acceleration level from measured step latencies (see module docstring)."""

    config: BudgetConfig
    levels: list[AccelLevel]
    level: int = 0
    history: list[Decision] = field(default_factory=list, repr=False)
    keep_history: bool = False  # keep every Decision (tests, plots); off in long-running nodes

    def __post_init__(self):
        if not self.levels:
            raise ValueError("BudgetController needs at least one level")
        keeps = [lv.keep_count for lv in self.levels]
        if keeps != sorted(keeps, reverse=True):
            raise ValueError(f"levels must go from most to fewest kept tokens, got {keeps}")
        self.level = min(max(self.level, 0), len(self.levels) - 1)
        self._model = _Model()
        self._over = 0
        self._under = 0
        self._relax_wait: dict[int, int] = {}  # level -> steps of headroom before relaxing into it
        self._since_relax: int | None = None  # steps since the last relax (None: none pending)

    # -- public -------------------------------------------------------------------------------

    @property
    def current(self) -> AccelLevel:
        return self.levels[self.level]

    def set_budget(self, budget_ms: float) -> None:
        """New budget at run time; counters restart, the latency model is kept."""
        self.config = replace(self.config, budget_ms=float(budget_ms))
        self._over = self._under = 0
        self._relax_wait.clear()

    def set_levels(self, levels: list[AccelLevel]) -> None:
        """New level list (e.g. another baseline or floor); keeps the nearest kept-token count."""
        keep = self.current.keep_count
        self.levels = list(levels)
        self.__post_init__()
        fits = [i for i, lv in enumerate(self.levels) if lv.keep_count <= keep]
        self.level = fits[0] if fits else len(self.levels) - 1

    def predict_ms(self, level: int) -> float | None:
        return self._model.predict(self.levels[level].keep_count)

    def observe(
        self,
        total_ms: float,
        stages_ms: Mapping[str, float] | None = None,
        kept: int | None = None,
    ) -> Decision:
        """Record one step; returns the level for the next step.

        `kept` is the number of visual tokens the step ran with (default: the current level's);
        a step that finished late may have run at an earlier level.
        """
        cfg = self.config
        self._learn(total_ms, stages_ms or {}, kept or self.current.keep_count)
        over_budget = cfg.enabled and total_ms > cfg.budget_ms
        if not cfg.enabled:
            return self._record(Decision(self.level, False, "disabled", False))
        if self._since_relax is not None:
            self._since_relax += 1
        if total_ms > cfg.target_ms:
            self._over, self._under = self._over + 1, 0
        elif total_ms < cfg.relax_ms:
            self._over, self._under = 0, self._under + 1
        else:
            self._over = self._under = 0

        last = len(self.levels) - 1
        if (over_budget or self._over >= cfg.escalate_after) and self.level < last:
            if self._since_relax is not None and self._since_relax <= cfg.escalate_after + 1:
                # The relax into this level did not hold: wait longer before the next try.
                wait = self._relax_wait.get(self.level, cfg.relax_after)
                self._relax_wait[self.level] = min(2 * wait, cfg.max_relax_after)
            self._since_relax = None
            # A lone miss may be an outlier (a page fault, another process): one level. From
            # the second over-target step in a row the load is real: jump as the model says.
            sustained = self._over >= cfg.escalate_after
            level = self._escalate_to(total_ms) if sustained else self.level + 1
            return self._change(level, "escalate", over_budget, keep_over=True)
        if self.level > 0 and self._under >= self._relax_wait.get(self.level - 1, cfg.relax_after):
            predicted = self.predict_ms(self.level - 1)
            if predicted is None or predicted <= cfg.target_ms:
                self._since_relax = 0
                return self._change(self.level - 1, "relax", over_budget)
            self._under = 0  # the model says the slower level would not fit: look again later
        if self._since_relax is not None and self._since_relax > 4 * cfg.escalate_after:
            self._since_relax = None  # the relax held: this level needs no extra wait
            self._relax_wait.pop(self.level, None)
        return self._record(Decision(self.level, False, "hold", over_budget))

    # -- internals ----------------------------------------------------------------------------

    def _learn(self, total_ms: float, stages: Mapping[str, float], kept: int) -> None:
        keep = max(kept, 1)
        scaled = sum(float(stages.get(s, 0.0)) for s in self.config.token_stages)
        scaled = min(max(scaled, 0.0), total_ms)
        self._model.update(total_ms - scaled, scaled / keep, self.config.ema_alpha)

    def _escalate_to(self, total_ms: float) -> int:
        """The slowest faster level predicted to fit the target; at least one level up."""
        cfg, last = self.config, len(self.levels) - 1
        # Predict from this step's latency (the EMA lags a load step): scale the model so it
        # reproduces the step just measured at the current level.
        now = self._model.predict(self.current.keep_count)
        scale = total_ms / now if now else 1.0
        for i in range(self.level + 1, last + 1):
            predicted = self._model.predict(self.levels[i].keep_count)
            if predicted is not None and predicted * scale <= cfg.target_ms:
                return i
        return last

    def _change(
        self, level: int, reason: str, over_budget: bool, keep_over: bool = False
    ) -> Decision:
        old = self.level
        self.level = level
        self._under = 0
        if not keep_over:  # escalations keep counting: still over at the new level = sustained
            self._over = 0
        log.debug(
            "budget %.1f ms: level %s -> %s (%s)",
            self.config.budget_ms,
            self.levels[old].name,
            self.current.name,
            reason,
        )
        return self._record(Decision(level, level != old, reason, over_budget))

    def _record(self, d: Decision) -> Decision:
        if self.keep_history:
            self.history.append(d)
        return d

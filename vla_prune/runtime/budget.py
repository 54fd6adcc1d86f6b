"""Latency-budget controller: pick an acceleration level so each control step fits its budget.

Pure Python (no ROS, no torch): the ROS policy node and the simulated-budget eval feed it
measured step latencies and apply the level it chooses; unit tests drive it with synthetic
traces. Levels come from `vla_prune.runtime.levels` (built from the policy, measured, the
Pareto front of latency against quality) or, without measurements, from `make_levels`.

Levels are ordered by expected quality, best first (index 0: the least accelerated); going to
a higher index is going faster (escalate), to a lower one better (relax). Each level has a
cost: a fixed part and a part that grows with the kept visual tokens (`LevelCost`). Measured
levels need not get faster with every index (a pruned level may cost more than the full one
on a small model until the LLM part grows): every move goes where the model predicts.
Measured levels carry their measured milliseconds; unmeasured ones the unit cost (1, kept
tokens). The latency model learns two load factors, ms per unit of each part, so the
prediction for level j is ``fixed_factor * cost_j.fixed + token_factor * cost_j.token``: a
slower machine, a neighbour on the CPU or a bigger LLM moves the factors, the measured profile
says how the levels relate.

Rules, per observed step:

* escalate (go faster) on a step over the budget, or after `escalate_after` consecutive steps
  over the target (`target_fraction` x budget). A lone miss moves to the next level predicted
  faster (it may be an outlier); from `escalate_after` over-target steps in a row the best
  level predicted to fit is taken, so a large load step is answered within two steps instead
  of one level per step. Never to a level predicted slower: at the fastest predicted level
  an infeasible budget holds there;
* relax (go one level slower) only after `relax_after` consecutive steps under
  `relax_fraction` x budget, and only if the model predicts the slower level still fits the
  target. A relax that is answered by an escalation within a few steps doubles the wait before
  the next relax (up to `max_relax_after`): no oscillation between two levels;
* a new budget (`set_budget`) starts at the best level predicted to fit it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

log = logging.getLogger(__name__)

# Kept visual tokens of the default levels, as fractions of the policy's visual tokens
# (256 tokens: 256, 192, 128, 96, 64, 48, 32; 64 tokens: 64, 48, 32, 24, 16, 12, 8).
DEFAULT_KEEP_FRACTIONS = (1.0, 0.75, 0.5, 0.375, 0.25, 0.1875, 0.125)
# Stages whose cost grows with the number of kept visual tokens (the LLM after the pruning
# point). "inject" is the ROS node's synthetic per-token slowdown.
DEFAULT_TOKEN_STAGES = ("prefill",)
# Weight formats from the most to the least precise (EngineConfig.weights).
WEIGHT_ORDER = ("fp32", "bf16", "int8")


@dataclass(frozen=True)
class AccelLevel:
    """One acceleration configuration: what `policy.configure` is given at this level."""

    keep_count: int  # kept visual tokens after the pruning point (= all tokens: no pruning)
    dit_cache_interval: int = 1  # CogACT: recompute DiT features every N denoising steps (1 = off)
    skip_layers: tuple[int, ...] = ()  # LLM layers skipped (empty = none)
    compile: bool = False  # the compiled static-shape decode (same math: quality-neutral)
    weights: str = "fp32"  # fp32 | bf16 | int8

    def __post_init__(self):
        if self.keep_count < 1 or self.dit_cache_interval < 1:
            raise ValueError(f"bad level {self}: keep_count and dit_cache_interval must be >= 1")
        if self.weights not in WEIGHT_ORDER:
            raise ValueError(f"bad level {self}: weights must be one of {WEIGHT_ORDER}")
        object.__setattr__(self, "skip_layers", tuple(sorted({int(i) for i in self.skip_layers})))

    @property
    def name(self) -> str:
        """Run-spec style parts (vla_prune/runspec.py), e.g. ``keep32+cache5+skip[1]+int8``."""
        parts = [f"keep{self.keep_count}"]
        if self.dit_cache_interval > 1:
            parts.append(f"cache{self.dit_cache_interval}")
        if self.skip_layers:
            parts.append("skip[" + ",".join(map(str, self.skip_layers)) + "]")
        if self.compile:
            parts.append("compile")
        if self.weights != "fp32":
            parts.append(self.weights)
        return "+".join(parts)

    def spec(self, method: str) -> str:
        """This level as a run spec (`vla-prune eval --configs`, the node's `accel`)."""
        keep = "dense" if method == "none" else f"{method}@{self.keep_count}"
        return "+".join([keep, *self.name.split("+")[1:]])

    def at_least_as_good(self, other: AccelLevel) -> bool:
        """Expected quality >= other's on every lever (keeps at least as many tokens, caches
        no more, skips a subset of its layers, weights at least as precise). compile is the
        same math, so it does not count."""
        return (
            self.keep_count >= other.keep_count
            and self.dit_cache_interval <= other.dit_cache_interval
            and set(self.skip_layers) <= set(other.skip_layers)
            and WEIGHT_ORDER.index(self.weights) <= WEIGHT_ORDER.index(other.weights)
        )


@dataclass(frozen=True)
class LevelCost:
    """A level's latency in two parts: fixed and token-bound (see the module docstring)."""

    fixed: float
    token: float

    @staticmethod
    def unit(level: AccelLevel) -> LevelCost:
        """Unmeasured: one unit of fixed cost, one token unit per kept visual token."""
        return LevelCost(1.0, float(level.keep_count))

    @property
    def total(self) -> float:
        return self.fixed + self.token


def keep_counts(
    num_visual: int,
    baseline_keep: int | None = None,
    min_keep: int = 1,
    fractions: Sequence[float] = DEFAULT_KEEP_FRACTIONS,
) -> list[int]:
    """Kept-token counts from the baseline (all tokens unless given) down to the floor
    `min_keep`: the baseline, every fraction of `num_visual` strictly between, and the floor
    itself (when it lies below the baseline)."""
    if num_visual < 1:
        raise ValueError(f"num_visual must be >= 1, got {num_visual}")
    base = num_visual if baseline_keep is None else max(1, min(baseline_keep, num_visual))
    floor = max(1, min(min_keep, base))
    counts = {max(1, round(f * num_visual)) for f in fractions}
    below = sorted({c for c in counts if floor <= c < base} | {floor}, reverse=True)
    return [base] + [c for c in below if c < base]


def make_levels(
    num_visual: int,
    baseline_keep: int | None = None,
    min_keep: int = 32,
    fractions: Sequence[float] = DEFAULT_KEEP_FRACTIONS,
) -> list[AccelLevel]:
    """Keep-count-only levels from the baseline down to the floor (unmeasured)."""
    return [AccelLevel(c) for c in keep_counts(num_visual, baseline_keep, min_keep, fractions)]


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
    previous: int = -1  # the level before this step's decision
    detail: str = ""  # why, in numbers (step logs): "130.2 ms > budget 100 ms", ...


@dataclass
class _Model:
    """EMA load factors: latency ~= fixed_factor * cost.fixed + token_factor * cost.token."""

    fixed: float | None = None
    token: float | None = None

    def update(self, fixed: float, token: float, alpha: float) -> None:
        if self.fixed is None or self.token is None:
            self.fixed, self.token = fixed, token
        else:
            self.fixed += alpha * (fixed - self.fixed)
            self.token += alpha * (token - self.token)

    def predict(self, cost: LevelCost) -> float | None:
        if self.fixed is None or self.token is None:
            return None
        return self.fixed * cost.fixed + self.token * cost.token


@dataclass
class BudgetController:
    """Chooses the acceleration level from measured step latencies (see module docstring).

    `costs` (one per level) are the measured latency parts of the levels; None = unmeasured
    (unit costs, the model is learned from the first step). Measured levels start with load
    factors of 1 (the machine as measured), so the first level can be chosen before any step:
    with `level=None` it is the best level predicted to fit the target."""

    config: BudgetConfig
    levels: list[AccelLevel]
    level: int | None = 0
    costs: list[LevelCost] | None = None
    history: list[Decision] = field(default_factory=list, repr=False)
    keep_history: bool = False  # keep every Decision (tests, plots); off in long-running nodes

    def __post_init__(self):
        self._setup()
        self._model = _Model(1.0, 1.0) if self._measured else _Model()
        self._reset_counters()
        if self.level is None:
            self.level = self.fitting_level()
        self.level = min(max(self.level, 0), len(self.levels) - 1)

    def _setup(self) -> None:
        if not self.levels:
            raise ValueError("BudgetController needs at least one level")
        self.levels = list(self.levels)
        self._measured = self.costs is not None
        if self.costs is None:
            keeps = [lv.keep_count for lv in self.levels]
            if keeps != sorted(keeps, reverse=True):
                raise ValueError(f"levels must go from most to fewest kept tokens, got {keeps}")
            self.costs = [LevelCost.unit(lv) for lv in self.levels]
        else:
            self.costs = list(self.costs)
            if len(self.costs) != len(self.levels):
                raise ValueError(f"{len(self.levels)} levels but {len(self.costs)} costs")
            if any(c.fixed < 0 or c.token < 0 for c in self.costs):
                raise ValueError(f"level costs must be >= 0, got {self.costs}")

    def _reset_counters(self) -> None:
        self._over = 0
        self._under = 0
        self._relax_wait: dict[int, int] = {}  # level -> steps of headroom before relaxing into it
        self._since_relax: int | None = None  # steps since the last relax (None: none pending)

    # -- public -------------------------------------------------------------------------------

    @property
    def current(self) -> AccelLevel:
        return self.levels[self.level]

    def predict_ms(self, level: int) -> float | None:
        return self._model.predict(self.costs[level])

    def fitting_level(self) -> int:
        """The best level predicted to fit the target, else the fastest predicted (the current
        one while the model knows nothing)."""
        if not self.config.enabled:
            return 0
        predicted = [self.predict_ms(i) for i in range(len(self.levels))]
        if any(p is None for p in predicted):
            return self.level or 0
        fits = [i for i, p in enumerate(predicted) if p <= self.config.target_ms]
        # Nothing fits: the fastest predicted (on a tie the more accelerated one).
        return fits[0] if fits else min(range(len(predicted)), key=lambda i: (predicted[i], -i))

    def set_budget(self, budget_ms: float) -> Decision:
        """New budget at run time: counters restart, the latency model is kept, and the level
        becomes the best one predicted to fit (when the model knows the levels)."""
        self.config = replace(self.config, budget_ms=float(budget_ms))
        self._reset_counters()
        old = self.level
        self.level = self.fitting_level()
        why = f"new budget {budget_ms:g} ms"
        return self._record(Decision(self.level, self.level != old, "budget", False, old, why))

    def set_levels(self, levels: list[AccelLevel], costs: list[LevelCost] | None = None) -> None:
        """New level list; keeps the current level if it is in it, else the nearest kept-token
        count at or below the current one."""
        now = self.current
        self.levels, self.costs = list(levels), costs
        self._setup()
        self._model = _Model(1.0, 1.0) if self._measured else _Model()
        self._reset_counters()
        if now in self.levels:
            self.level = self.levels.index(now)
            return
        fits = [i for i, lv in enumerate(self.levels) if lv.keep_count <= now.keep_count]
        self.level = fits[0] if fits else len(self.levels) - 1

    def observe(
        self,
        total_ms: float,
        stages_ms: Mapping[str, float] | None = None,
        kept: int | None = None,
        level: int | None = None,
    ) -> Decision:
        """Record one step; returns the level for the next step.

        `level` is the level the step ran at (default: the current one; a step that finished
        late may have run at an earlier level); `kept` the visual tokens it actually kept
        (default: that level's count; VLA-Pruner keeps all of them in its first steps).
        """
        cfg = self.config
        ran = self.level if level is None else min(max(level, 0), len(self.levels) - 1)
        self._learn(total_ms, stages_ms or {}, ran, kept)
        over_budget = cfg.enabled and total_ms > cfg.budget_ms
        old = self.level
        if not cfg.enabled:
            return self._record(Decision(self.level, False, "disabled", False, old))
        if self._since_relax is not None:
            self._since_relax += 1
        if total_ms > cfg.target_ms:
            self._over, self._under = self._over + 1, 0
        elif total_ms < cfg.relax_ms:
            self._over, self._under = 0, self._under + 1
        else:
            self._over = self._under = 0

        last = len(self.levels) - 1
        escalate = over_budget or self._over >= cfg.escalate_after
        if escalate and self.level < last and self._faster():
            if self._since_relax is not None and self._since_relax <= cfg.escalate_after + 1:
                # The relax into this level did not hold: wait longer before the next try.
                wait = self._relax_wait.get(self.level, cfg.relax_after)
                self._relax_wait[self.level] = min(2 * wait, cfg.max_relax_after)
            self._since_relax = None
            # A lone miss may be an outlier (a page fault, another process): the next faster
            # level. From the second over-target step in a row the load is real: jump as the
            # model says.
            sustained = self._over >= cfg.escalate_after
            to = self._escalate_to(total_ms) if sustained else self._next_faster()
            why = (
                f"{total_ms:.1f} ms > budget {cfg.budget_ms:g} ms" if over_budget
                else f"{self._over} steps over target {cfg.target_ms:.1f} ms"
            )
            return self._change(to, "escalate", over_budget, why, keep_over=True)
        if self.level > 0 and self._under >= self._relax_wait.get(self.level - 1, cfg.relax_after):
            predicted = self.predict_ms(self.level - 1)
            if predicted is None or predicted <= cfg.target_ms:
                self._since_relax = 0
                why = f"{self._under} steps under {cfg.relax_ms:.1f} ms"
                if predicted is not None:
                    why += f", predicted {predicted:.1f} ms"
                return self._change(self.level - 1, "relax", over_budget, why)
            self._under = 0  # the model says the slower level would not fit: look again later
        if self._since_relax is not None and self._since_relax > 4 * cfg.escalate_after:
            self._since_relax = None  # the relax held: this level needs no extra wait
            self._relax_wait.pop(self.level, None)
        return self._record(Decision(self.level, False, "hold", over_budget, old))

    # -- internals ----------------------------------------------------------------------------

    def _learn(
        self, total_ms: float, stages: Mapping[str, float], level: int, kept: int | None
    ) -> None:
        cost = self.costs[level]
        keep = self.levels[level].keep_count
        # A step that kept more tokens than its level (a pruner's warm-up) cost more tokens.
        token_cost = cost.token * (max(kept, 1) / keep if kept else 1.0)
        scaled = sum(float(stages.get(s, 0.0)) for s in self.config.token_stages)
        scaled = min(max(scaled, 0.0), total_ms)
        self._model.update(
            (total_ms - scaled) / max(cost.fixed, 1e-6),
            scaled / max(token_cost, 1e-6),
            self.config.ema_alpha,
        )

    def _faster(self) -> list[tuple[int, float | None]]:
        """Later levels that may be faster, with their predictions: measured levels only if
        the model predicts them faster than this one; unmeasured ones, whose order is the
        only latency information, all of them."""
        now = self.predict_ms(self.level)
        later = [(i, self.predict_ms(i)) for i in range(self.level + 1, len(self.levels))]
        if not self._measured or now is None:
            return later
        return [(i, p) for i, p in later if p is not None and p < now]

    def _next_faster(self) -> int:
        """The next level predicted faster than this one (this one if there is none)."""
        faster = self._faster()
        return faster[0][0] if faster else self.level

    def _escalate_to(self, total_ms: float) -> int:
        """The best faster level predicted to fit the target, else the fastest predicted."""
        cfg = self.config
        # Predict from this step's latency (the EMA lags a load step): scale the model so it
        # reproduces the step just measured at the current level.
        now = self.predict_ms(self.level)
        scale = total_ms / now if now else 1.0
        faster = self._faster()
        for i, predicted in faster:
            if predicted is not None and predicted * scale <= cfg.target_ms:
                return i
        known = [(p, -i) for i, p in faster if p is not None]
        if known:
            return -min(known)[1]
        return faster[-1][0] if faster else self.level

    def _change(
        self, level: int, reason: str, over_budget: bool, detail: str, keep_over: bool = False
    ) -> Decision:
        old = self.level
        self.level = level
        self._under = 0
        if not keep_over:  # escalations keep counting: still over at the new level = sustained
            self._over = 0
        log.debug(
            "budget %.1f ms: level %s -> %s (%s: %s)",
            self.config.budget_ms, self.levels[old].name, self.current.name, reason, detail,
        )
        return self._record(Decision(level, level != old, reason, over_budget, old, detail))

    def _record(self, d: Decision) -> Decision:
        if self.keep_history:
            self.history.append(d)
        return d

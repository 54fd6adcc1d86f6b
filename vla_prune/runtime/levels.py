"""Acceleration levels built from a policy, measured, and kept on the latency/quality front.

Pure Python (no torch): `vla_prune.runtime.accel` applies levels to a real policy and times
them; this module decides which levels to try and which to keep.

1. **Candidates** (`LevelSearch.candidates`): every combination of the levers that exist, from
   the baseline (the run spec's own settings: the least accelerated level) towards faster:
   kept visual tokens (fractions of the policy's visual tokens down to a floor given as a
   fraction and/or a count), engine settings (compiled decode; bf16 / int8 weights, only
   downwards in precision), CogACT's DiT cache interval, and calibrated LLM layer skips.
2. **Measured** (`MeasuredLevel`): p50 / p90 of a few timed steps per candidate, and the
   token-bound part of the median step (the controller's cost model).
3. **Quality** (`QualityTable`): the success rate of the matching configuration in an eval
   summary (`vla-prune eval` output: summary.json, or the episodes.jsonl beside it, which also
   names the DiT cache / skips / weights of each configuration). Without a summary levels are
   compared by their levers alone (`AccelLevel.at_least_as_good`) and ordered by latency.
4. **Front** (`pareto_front`): drop every level that another level at least as good beats on
   cost (both its fixed and its token-bound part, up to `min_gain`); the rest, best expected
   quality first, is what the controller walks.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .budget import DEFAULT_KEEP_FRACTIONS, WEIGHT_ORDER, AccelLevel, LevelCost, keep_counts

log = logging.getLogger(__name__)

DEFAULT_CACHE_INTERVALS = (2, 3, 5)  # CogACT, 10 DDIM steps: 5, 4 and 2 full DiT steps
# Quality nudges for estimates that were not measured: they rank just below the measured
# configuration they are derived from, so a measured level wins a tie.
ASSUMED_PENALTY = 1e-3
# Success rates closer than this are equally good when levels compete (the nudges above only
# order such levels, they never keep a slower one on the front).
QUALITY_TIE = 5e-3


@dataclass(frozen=True)
class Engine:
    """EngineConfig's fields as a level lever."""

    compile: bool = False
    weights: str = "fp32"

    @staticmethod
    def parse(text: str) -> Engine:
        """Run-spec engine parts: ``fp32``, ``compile``, ``bf16+compile``, ``int8``, ..."""
        parts = [p.strip() for p in text.split("+") if p.strip()]
        weights = [p for p in parts if p in WEIGHT_ORDER]
        unknown = [p for p in parts if p not in WEIGHT_ORDER and p != "compile"]
        if unknown or len(weights) > 1 or not parts:
            raise ValueError(
                f"bad engine {text!r}: expected [fp32|bf16|int8][+compile], e.g. int8+compile"
            )
        return Engine("compile" in parts, weights[0] if weights else "fp32")


def parse_engines(text: str) -> tuple[Engine, ...] | None:
    """A comma-separated engine list; "auto" -> None (every engine at or below the baseline's
    precision, compiled and not); "" -> () (the baseline's engine only)."""
    text = text.strip()
    if text == "auto":
        return None
    return tuple(Engine.parse(t) for t in text.split(",") if t.strip())


def parse_ints(text: str, what: str) -> tuple[int, ...] | None:
    """ "2,3,5" -> (2, 3, 5); "auto" -> None; "" -> ()."""
    text = text.strip()
    if text == "auto":
        return None
    try:
        values = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise ValueError(f"bad {what} {text!r}: expected integers like 2,3,5, or auto") from None
    if any(v < 1 for v in values):
        raise ValueError(f"bad {what} {text!r}: every value must be >= 1")
    return values


@dataclass(frozen=True)
class LevelSearch:
    """Which candidate levels to build (see the module docstring).

    engines: None = every (compile, weights) at or below the baseline's precision.
    cache_intervals: CogACT's DiT cache intervals to try beside the baseline's own; None =
        DEFAULT_CACHE_INTERVALS. Ignored for policies without a DiT.
    skip_sets: layer sets to skip beside the baseline's (each is added to it), e.g. the
        prefixes of a calibrated skip list (`skip_sets_from_calibration`).
    """

    keep_fractions: tuple[float, ...] = DEFAULT_KEEP_FRACTIONS
    min_keep_fraction: float = 0.25  # quality floor as a fraction of the visual tokens ...
    min_keep_tokens: int = 1  # ... and as a count: the floor is the larger of the two
    engines: tuple[Engine, ...] | None = None
    cache_intervals: tuple[int, ...] | None = None
    skip_sets: tuple[tuple[int, ...], ...] = ()
    timing_steps: int = 5  # timed steps per candidate (after untimed warm-up steps)
    min_gain: float = 0.03  # a front level saves this fraction of a cost part (pareto_front)

    def __post_init__(self):
        if not 0.0 <= self.min_keep_fraction <= 1.0:
            raise ValueError(f"min_keep_fraction must be in [0, 1], got {self.min_keep_fraction}")
        if self.min_keep_tokens < 1 or self.timing_steps < 1:
            raise ValueError("min_keep_tokens and timing_steps must be >= 1")
        if not 0.0 <= self.min_gain < 1.0:
            raise ValueError(f"min_gain must be in [0, 1), got {self.min_gain}")

    def floor(self, num_visual: int) -> int:
        return max(self.min_keep_tokens, math.ceil(self.min_keep_fraction * num_visual))

    def candidates(
        self, baseline: AccelLevel, num_visual: int, prunes: bool = True, has_dit: bool = False
    ) -> list[AccelLevel]:
        """Every combination of the levers, baseline first. `prunes`: the method can keep
        fewer tokens (not "none"); `has_dit`: the policy has a DiT head to cache."""
        keeps = (
            keep_counts(num_visual, baseline.keep_count, self.floor(num_visual),
                        self.keep_fractions)
            if prunes else [baseline.keep_count]
        )
        caches = [baseline.dit_cache_interval]
        if has_dit:
            extra = self.cache_intervals
            if extra is None:
                extra = DEFAULT_CACHE_INTERVALS
            caches += sorted(c for c in set(extra) if c > baseline.dit_cache_interval)
        skips = [baseline.skip_layers]
        for s in self.skip_sets:
            merged = tuple(sorted(set(baseline.skip_layers) | set(s)))
            if merged not in skips:
                skips.append(merged)
        engines = self.engines_for(baseline)
        out = []
        for e in engines:
            for k in keeps:
                for c in caches:
                    for s in skips:
                        level = AccelLevel(k, c, s, e.compile, e.weights)
                        if level not in out:
                            out.append(level)
        out.remove(baseline)
        return [baseline, *out]

    def engines_for(self, baseline: AccelLevel) -> list[Engine]:
        """The baseline's engine first, then the others to try."""
        base = Engine(baseline.compile, baseline.weights)
        rank = WEIGHT_ORDER.index(baseline.weights)
        if self.engines is None:
            wanted = [Engine(c, w) for w in WEIGHT_ORDER[rank:] for c in (False, True)]
        else:
            wanted = list(self.engines)
        # Weights only go down in precision from the baseline's (a conversion has no way back).
        usable = [e for e in wanted if WEIGHT_ORDER.index(e.weights) >= rank]
        dropped = [e for e in wanted if e not in usable]
        if dropped:
            log.warning("engines %s are above the baseline's %s weights: not tried",
                        dropped, baseline.weights)
        return [base, *(e for e in dict.fromkeys(usable) if e != base)]


def skip_sets_from_calibration(path: str | Path) -> tuple[tuple[int, ...], ...]:
    """Nested skip sets from a `vla-prune calibrate` file: its skip_layers ordered by block
    influence (least influential first), as prefixes: (a,), (a, b), ..."""
    try:
        data = json.loads(Path(path).read_text())
        skips = [int(i) for i in data["skip_layers"]]
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"cannot read a skip list from {path}: {e!r}") from e
    influence = data.get("influence")
    if isinstance(influence, list) and all(0 <= i < len(influence) for i in skips):
        skips.sort(key=lambda i: influence[i])
    return tuple(tuple(sorted(skips[: n + 1])) for n in range(len(skips)))


# -- measured levels and quality ----------------------------------------------------------------


@dataclass(frozen=True)
class MeasuredLevel:
    """A candidate level after timing (and, when known, its expected quality)."""

    level: AccelLevel
    p50_ms: float
    p90_ms: float
    token_ms: float  # token-bound stages of the median step (the controller's cost split)
    steps: int = 0  # timed steps
    quality: float | None = None  # expected success rate (None: no summary)
    quality_source: str = "lever order"  # measured | interpolated | ... (see QualityTable)

    @property
    def cost(self) -> LevelCost:
        token = min(max(self.token_ms, 0.0), self.p50_ms)
        return LevelCost(self.p50_ms - token, token)

    def describe(self) -> str:
        q = "" if self.quality is None else f", quality {self.quality:.2f} ({self.quality_source})"
        return f"{self.level.name}: p50 {self.p50_ms:.1f} ms, p90 {self.p90_ms:.1f} ms{q}"


@dataclass(frozen=True)
class QualityPoint:
    """One evaluated configuration of a summary, in level terms."""

    label: str
    method: str
    keep: int
    cache: int  # 1 = off
    skips: tuple[int, ...]
    weights: str
    successes: int
    episodes: int

    @property
    def rate(self) -> float:
        return self.successes / self.episodes if self.episodes else 0.0


@dataclass
class QualityTable:
    """Expected quality (success rate) per level, from an eval run.

    `estimate` matches the level's DiT cache, skipped layers and weights exactly and
    interpolates linearly over kept tokens between the configurations measured with them
    (clamped outside). compile is the same math and never matters. Without a configuration at
    the level's weights, the fp32 one is used, nudged down (ASSUMED_PENALTY: a measured level
    wins a tie). A level whose cache / skip combination was never evaluated gets the lowest
    quality in the table, nudged down: an unmeasured lever is a last resort, not a free lunch.
    """

    points: list[QualityPoint]
    source: str = ""
    notes: list[str] = field(default_factory=list)

    @staticmethod
    def load(path: str | Path, num_visual: int, method: str) -> QualityTable:
        """From a summary.json, an episodes.jsonl or a folder holding them. The episodes (when
        present) are read rather than the summary: only they name cache / skips / weights."""
        path = Path(path)
        if not path.exists():
            raise ValueError(f"no eval summary at {path} (expected summary.json / episodes.jsonl)")
        folder = path if path.is_dir() else path.parent
        episodes = folder / "episodes.jsonl"
        if path.name == "episodes.jsonl" or episodes.is_file():
            rows = _rows_from_episodes(episodes)
            source = str(episodes)
        elif path.is_file() or (folder / "summary.json").is_file():
            summary = path if path.is_file() else folder / "summary.json"
            rows = _rows_from_summary(summary)
            source = str(summary)
        else:
            raise ValueError(f"no eval summary at {path} (expected summary.json / episodes.jsonl)")
        return QualityTable.from_rows(rows, num_visual, method, source)

    @staticmethod
    def from_rows(
        rows: Iterable[dict[str, Any]], num_visual: int, method: str, source: str = ""
    ) -> QualityTable:
        """Rows: {label, policy, prune, cache, skip_layers, weights, blind, successes,
        episodes}. Keeps the policy most rows were run with (a sweep's blind control is
        another checkpoint), the level's method, and "none" (= all tokens)."""
        rows = [r for r in rows if not r.get("blind")]
        notes = []
        policies = Counter(str(r.get("policy")) for r in rows)
        if len(policies) > 1:
            main = policies.most_common(1)[0][0]
            others = sorted({r["label"] for r in rows if str(r.get("policy")) != main})
            notes.append(f"configurations of other checkpoints left out: {others}")
            rows = [r for r in rows if str(r.get("policy")) == main]
        pooled: dict[tuple, list] = {}
        for r in rows:
            prune = r.get("prune") or {}
            m = prune.get("method", "none")
            keep = _keep(prune, num_visual)
            if m not in (method, "none") and keep < num_visual:
                continue
            key = (keep, int(r.get("cache") or 1), tuple(sorted(r.get("skip_layers") or ())),
                   r.get("weights") or "fp32")
            acc = pooled.setdefault(key, [r["label"], m, 0, 0])
            acc[2] += int(r["successes"])
            acc[3] += int(r["episodes"])
        points = [
            QualityPoint(label, m, k, c, s, w, succ, n)
            for (k, c, s, w), (label, m, succ, n) in pooled.items()
        ]
        if not points:
            raise ValueError(f"{source}: no configuration of method {method!r} (or dense)")
        return QualityTable(points, source, notes)

    def estimate(self, level: AccelLevel) -> tuple[float, str]:
        """(expected success rate, how it was obtained)."""
        lever = (level.dit_cache_interval, level.skip_layers)
        same = [p for p in self.points if (p.cache, p.skips) == lever]
        exact = [p for p in same if p.weights == level.weights]
        if exact:
            return _interpolate(exact, level.keep_count)
        fp32 = [p for p in same if p.weights == "fp32"]
        if fp32:
            q, how = _interpolate(fp32, level.keep_count)
            return q - ASSUMED_PENALTY, f"{how}, fp32 weights assumed"
        return min(p.rate for p in self.points) - 2 * ASSUMED_PENALTY, "not evaluated: last resort"

    def describe(self) -> str:
        pts = sorted(self.points, key=lambda p: (p.cache, p.skips, p.weights, -p.keep))
        return "; ".join(
            f"{p.label} (keep {p.keep}, cache {p.cache}, skip {list(p.skips)}, {p.weights}) "
            f"{p.successes}/{p.episodes}" for p in pts
        )


def _keep(prune: dict[str, Any], num_visual: int) -> int:
    if prune.get("method", "none") == "none":
        return num_visual
    if prune.get("keep_count") is not None:
        return min(int(prune["keep_count"]), num_visual)
    if prune.get("keep_ratio") is not None:
        return max(1, min(num_visual, round(float(prune["keep_ratio"]) * num_visual)))
    return num_visual


def _interpolate(points: Sequence[QualityPoint], keep: int) -> tuple[float, str]:
    pts = sorted(points, key=lambda p: p.keep)
    for p in pts:
        if p.keep == keep:
            return p.rate, f"measured: {p.label} {p.successes}/{p.episodes}"
    if keep < pts[0].keep:
        return pts[0].rate - ASSUMED_PENALTY, f"below {pts[0].label}: clamped"
    if keep > pts[-1].keep:
        return pts[-1].rate, f"above {pts[-1].label}: clamped"
    lo = max((p for p in pts if p.keep < keep), key=lambda p: p.keep)
    hi = min((p for p in pts if p.keep > keep), key=lambda p: p.keep)
    t = (keep - lo.keep) / (hi.keep - lo.keep)
    return lo.rate + t * (hi.rate - lo.rate), f"interpolated: {lo.label} .. {hi.label}"


def _rows_from_episodes(path: Path) -> list[dict[str, Any]]:
    """Per-configuration rows of an episodes.jsonl (torn last line tolerated)."""
    runs: dict[str, dict[str, Any]] = {}
    text = path.read_text()
    lines = text.splitlines()
    if lines and not text.endswith("\n"):
        lines = lines[:-1]  # a crash mid-write: the eval loop drops it too
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            label = r["label"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{lineno}: corrupt episode record ({e})") from e
        row = runs.setdefault(label, {
            "label": label, "policy": r.get("policy"), "prune": r.get("prune") or {},
            "cache": r.get("cache"), "skip_layers": r.get("skip_layers") or [],
            "weights": r.get("weights"), "blind": bool(r.get("blind")) or label == "blind",
            "successes": 0, "episodes": 0,
        })
        row["successes"] += bool(r.get("success"))
        row["episodes"] += 1
    return list(runs.values())


def _rows_from_summary(path: Path) -> list[dict[str, Any]]:
    """Rows of a summary.json; cache / skips / weights from the label when it is a run spec
    (a summary does not store them; the episodes.jsonl beside it does)."""
    from ..runspec import parse_run_spec

    try:
        data = json.loads(path.read_text())
        runs = data["runs"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"cannot read the eval summary {path}: {e!r}") from e
    rows = []
    for r in runs:
        try:
            spec = parse_run_spec(r["label"])
            cache, skips, weights = spec.cache, spec.skip_layers, spec.weights
        except ValueError:
            cache, skips, weights = None, (), None
        rows.append({
            "label": r["label"], "policy": r.get("policy"), "prune": r.get("prune") or {},
            "cache": cache, "skip_layers": skips, "weights": weights,
            "blind": r["label"] == "blind", "successes": r["successes"],
            "episodes": r["episodes"],
        })
    return rows


# -- the front ----------------------------------------------------------------------------------


def with_quality(measured: Sequence[MeasuredLevel], table: QualityTable) -> list[MeasuredLevel]:
    return [
        MeasuredLevel(m.level, m.p50_ms, m.p90_ms, m.token_ms, m.steps, *table.estimate(m.level))
        for m in measured
    ]


def smooth_token_costs(measured: Sequence[MeasuredLevel]) -> list[MeasuredLevel]:
    """The token-bound part of each level as a rate x kept tokens, one rate per combination of
    the other levers (least squares through the origin over its keep counts). On a small model
    the measured prefill barely grows with the tokens and its noise can order the keep counts
    either way; the controller predicts a token-heavy load (a bigger LLM) from this part, which
    must then shrink with every token pruned."""
    groups: dict[tuple, list[MeasuredLevel]] = {}
    for m in measured:
        lv = m.level
        groups.setdefault((lv.dit_cache_interval, lv.skip_layers, lv.compile, lv.weights),
                          []).append(m)
    rates = {}
    for key, ms in groups.items():
        den = sum(m.level.keep_count ** 2 for m in ms)
        rates[key] = max(sum(m.token_ms * m.level.keep_count for m in ms) / den, 0.0)
    out = []
    for m in measured:
        lv = m.level
        rate = rates[(lv.dit_cache_interval, lv.skip_layers, lv.compile, lv.weights)]
        token = min(rate * lv.keep_count, m.p50_ms)
        out.append(MeasuredLevel(lv, m.p50_ms, m.p90_ms, token, m.steps, m.quality,
                                 m.quality_source))
    return out


def pareto_front(measured: Sequence[MeasuredLevel], min_gain: float = 0.0) -> list[MeasuredLevel]:
    """The levels worth walking, best expected quality first.

    A level is left out when another level at least as good is also at least as cheap in
    both parts of its measured cost, the fixed and the token-bound one (`MeasuredLevel.cost`),
    up to `min_gain`: a level must save that fraction in one part to earn its place. Both parts
    count, not just today's total, because the controller predicts each level from them: a
    pruned level that is no faster at configure (its scoring costs what the tokens save on a
    small model) is the one that helps when the LLM part grows (a bigger model, a busy GPU).
    Of two levels equally good and alike in cost the faster stays.

    "At least as good": with quality numbers (an eval summary) the higher success rate;
    without (quality None), the lever order `AccelLevel.at_least_as_good`. Order: by quality,
    ties faster first; without numbers, a level always comes after the levels better than it
    on every lever, and among levels that do not compare the slower comes first (the one less
    accelerated, presumably better).
    """
    if not measured:
        return []
    items = list(measured)
    use_q = all(m.quality is not None for m in items)

    def good(a: MeasuredLevel, b: MeasuredLevel) -> bool:
        if use_q:
            return a.quality >= b.quality - QUALITY_TIE
        return a.level.at_least_as_good(b.level)

    def better(a: MeasuredLevel, b: MeasuredLevel) -> bool:
        return good(a, b) and not good(b, a)

    def redundant(b: MeasuredLevel, a: MeasuredLevel) -> bool:
        """b buys (almost) nothing over a."""
        ca, cb = a.cost, b.cost
        cheap = (
            cb.fixed >= ca.fixed * (1.0 - min_gain) and cb.token >= ca.token * (1.0 - min_gain)
        )
        if not (good(a, b) and cheap):
            return False
        if better(a, b):
            return True
        # Equally good: the faster stays (the earlier one on an exact tie).
        return ca.total < cb.total or (ca.total == cb.total and items.index(a) < items.index(b))

    front = [b for b in items if not any(redundant(b, a) for a in items if a is not b)]
    if use_q:
        return sorted(front, key=lambda m: (-m.quality, m.p50_ms))
    ordered: list[MeasuredLevel] = []
    left = sorted(front, key=lambda m: -m.p50_ms)
    while left:  # a linear extension of the lever order, slower first among incomparables
        ready = next(m for m in left if not any(better(o, m) for o in left if o is not m))
        ordered.append(ready)
        left.remove(ready)
    return ordered


@dataclass
class LevelFront:
    """Measured candidates and the front the controller walks (best expected quality first)."""

    candidates: list[MeasuredLevel]
    front: list[MeasuredLevel]
    method: str  # the pruning method of every level
    quality_note: str  # where the quality order comes from, for the logs
    failed: dict[str, str] = field(default_factory=dict)  # level name -> why it was dropped

    @property
    def levels(self) -> list[AccelLevel]:
        return [m.level for m in self.front]

    @property
    def costs(self) -> list[LevelCost]:
        return [m.cost for m in self.front]

    @property
    def fastest(self) -> MeasuredLevel:
        """The front level with the lowest measured p90."""
        return min(self.front, key=lambda m: m.p90_ms)

    def infeasible(self, budget_ms: float) -> str | None:
        """None if some level's measured p90 fits `budget_ms`, else the error message."""
        if budget_ms <= 0:
            return None
        best = self.fastest
        if best.p90_ms <= budget_ms:
            return None
        return (
            f"budget {budget_ms:g} ms is infeasible: the fastest level {best.level.name} "
            f"measured p90 {best.p90_ms:.1f} ms (p50 {best.p50_ms:.1f} ms) > {budget_ms:g} ms"
        )

    def summary_lines(self) -> list[str]:
        lines = [f"{len(self.front)} of {len(self.candidates)} measured levels on the front "
                 f"({self.quality_note}):"]
        lines += [f"  {i}: {m.describe()}" for i, m in enumerate(self.front)]
        off = [m for m in self.candidates if m not in self.front]
        lines += [f"  off the front: {m.describe()}" for m in sorted(off, key=lambda m: m.p50_ms)]
        lines += [f"  dropped {name}: {why}" for name, why in self.failed.items()]
        return lines


def build_front(
    measured: Sequence[MeasuredLevel],
    method: str,
    quality: QualityTable | None = None,
    min_gain: float = 0.0,
    failed: dict[str, str] | None = None,
) -> LevelFront:
    if quality is not None:
        measured = with_quality(measured, quality)
        note = f"quality from {quality.source}"
        if quality.notes:
            note += " (" + "; ".join(quality.notes) + ")"
    else:
        note = ("no eval summary: levels ranked by their levers alone (more tokens, less "
                "caching, fewer skips, more precise weights first; the slower first where they "
                "do not compare); give one (quality_summary) to rank them by measured success")
    measured = smooth_token_costs(measured)
    front = pareto_front(measured, min_gain)
    return LevelFront(list(measured), front, method, note, dict(failed or {}))

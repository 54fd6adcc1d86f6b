"""Success rates with Wilson intervals, pooled per-step latency, kept tokens."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion.

    centre = (p + z²/2n) / (1 + z²/n),  half = z / (1 + z²/n) * sqrt(p(1-p)/n + z²/4n²).
    Unlike the normal approximation it stays inside [0, 1] and is not degenerate at 0/n or n/n.
    n = 0 gives the uninformative (0, 1).
    """
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got {successes}/{n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    z2 = z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # At 0/n and n/n the bound is exactly 0 resp. 1; rounding would leave it a hair off.
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return lo, hi


def latency(values: Sequence[float]) -> dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    if not len(v):
        return {"median": math.nan, "p99": math.nan, "mean": math.nan}
    return {
        "median": float(np.median(v)),
        "p99": float(np.percentile(v, 99)),
        "mean": float(v.mean()),
    }


def rate(successes: int, n: int) -> dict[str, Any]:
    lo, hi = wilson_interval(successes, n)
    return {
        "episodes": n,
        "successes": successes,
        "success_rate": successes / n if n else math.nan,
        "ci95": [lo, hi],
    }


def _ordered(values: Iterable[Any]) -> list[Any]:
    return list(dict.fromkeys(values))


def summarize_episodes(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per-configuration (and per-task) success with Wilson 95% CIs, pooled latency, tokens."""
    tasks = _ordered(r["task"] for r in records)
    labels = _ordered(r["label"] for r in records)
    runs = []
    for label in labels:
        mine = [r for r in records if r["label"] == label]
        calls = sum(r["policy_steps"] for r in mine)
        kept = sum(r["kept_visual_tokens"] * r["policy_steps"] for r in mine)
        reused = [r for r in mine if r.get("reused_fraction") is not None]  # VLA-Cache runs
        reused_calls = sum(r["policy_steps"] for r in reused)
        stages = _ordered(stage for r in mine for stage in r["step_ms"])  # the policy's order
        per_task = {}
        for task in tasks:
            t = [r for r in mine if r["task"] == task]
            if t:
                per_task[task] = rate(sum(bool(r["success"]) for r in t), len(t))
        runs.append(
            {
                "label": label,
                "policy": mine[0]["policy"],
                "prune": mine[0]["prune"],
                **rate(sum(bool(r["success"]) for r in mine), len(mine)),
                "tasks": per_task,
                "kept_visual_tokens": kept / calls if calls else math.nan,
                "reused_fraction": (
                    sum(r["reused_fraction"] * r["policy_steps"] for r in reused) / reused_calls
                    if reused_calls
                    else None
                ),
                "policy_steps": calls,
                "env_steps": sum(r["steps"] for r in mine),
                "latency_ms": {
                    stage: latency([x for r in mine for x in r["step_ms"].get(stage, [])])
                    for stage in stages
                },
            }
        )
    return {"tasks": tasks, "runs": runs, **pairing(records)}


def pairing(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Whether every configuration saw the same (task, seed) episodes with the same first
    observation — the premise of comparing configurations episode by episode."""
    by_label: dict[str, set] = {}
    first_obs: dict[tuple[str, int], set] = {}
    for r in records:
        by_label.setdefault(r["label"], set()).add((r["task"], r["seed"]))
        first_obs.setdefault((r["task"], r["seed"]), set()).add(r.get("obs_hash"))
    episode_sets = list(by_label.values())
    same_episodes = all(s == episode_sets[0] for s in episode_sets)
    mismatched = sorted(k for k, v in first_obs.items() if len(v) > 1)
    return {
        "paired": bool(same_episodes and not mismatched),
        "obs_mismatch": [list(k) for k in mismatched],
    }

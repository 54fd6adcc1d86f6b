"""Scoring + selection overhead of each pruning method, as a fraction of the dense step.

The "prune" stage of a step is everything a method adds: the attention probe at layer K-1
(semantic/text scores), the probes of the action queries during decode, the temporal smoothing
and the selection itself. Keep ratio 1.0 would skip selection, so methods run at their real
budget and the overhead is compared with the median total of a dense step measured in the same
run (configurations interleaved step by step, one CPU thread).

    python bench/pruning_overhead.py --policy tiny-openvla small-openvla --steps 30
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

import vla_prune
from vla_prune import PruneConfig
from vla_prune.profiling import machine_info

METHODS = ["vla-pruner", "fastv", "sparsevlm", "divprune", "random", "uniform"]


def measure(name: str, steps: int, keep: float, episode: int) -> list[dict]:
    configs = {"dense": PruneConfig()} | {
        m: PruneConfig(method=m, keep_ratio=keep) for m in METHODS
    }
    policies = {}
    for label, cfg in configs.items():  # one policy per config: each keeps its own history
        policies[label] = vla_prune.build_policy(name, seed=0).configure(prune=cfg)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(episode)]
    timings: dict[str, list[dict]] = {label: [] for label in configs}
    warm = 3 + 2  # vla-pruner prunes from step 4 of an episode; skip those and 2 warm-up steps
    for t in range(warm + steps):
        for label, policy in policies.items():
            if t % episode == 0:
                policy.reset()
            r = policy.step(images[t % episode], "put the green cylinder on the purple plate")
            if t >= warm and r.kept_visual_tokens < 256 or (label == "dense" and t >= warm):
                timings[label].append(r.timings_ms)
    dense_total = statistics.median(t["total"] for t in timings["dense"])
    rows = []
    for label in configs:
        if label == "dense" or not timings[label]:
            continue
        prune = statistics.median(t["prune"] for t in timings[label])
        total = statistics.median(t["total"] for t in timings[label])
        rows.append(
            dict(
                policy=name,
                method=label,
                keep=keep,
                steps=len(timings[label]),
                prune_ms=prune,
                dense_total_ms=dense_total,
                step_total_ms=total,
                overhead=prune / dense_total,
            )
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--policy", nargs="+", default=["tiny-openvla", "small-openvla"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--keep", type=float, default=0.25)
    ap.add_argument("--episode", type=int, default=20, help="steps between policy.reset()")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.policy:
        rows += measure(name, args.steps, args.keep, args.episode)
    print(f"{'policy':<15}{'method':<12}{'prune ms':>10}{'dense step ms':>15}{'overhead':>10}")
    for r in rows:
        print(
            f"{r['policy']:<15}{r['method']:<12}{r['prune_ms']:>10.2f}"
            f"{r['dense_total_ms']:>15.1f}{r['overhead']:>10.2%}"
        )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(
            json.dumps(
                {
                    "command": "python " + " ".join(sys.argv),
                    "machine": machine_info(),
                    "rows": rows,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()

"""Scoring + selection overhead of each pruning method: the "prune" stage of a control step.

The "prune" stage of StepResult.timings_ms is everything a method adds to a step: the pruning
hook at layer K (the attention probe of the semantic/text queries at layer K-1, the temporal
smoothing of the action history, the selection itself and its report) plus the attention
probes of the action-decode queries during decode (policy.py moves both out of the prefill and
decode stages into "prune"). Methods run at their real budget (keep ratio 1.0 would skip the
selection); only steps that actually pruned count (VLA-Pruner keeps everything during its
warm-up steps). Every configuration has its own policy (its own temporal history); the
configurations run interleaved step by step in one process, on one CPU thread by default.

Printed per policy and method: the prune stage's median (and p90) ms, the median of its share
of the step it ran in, and the median step total next to the dense step's.

    python bench/pruning_overhead.py --policy embedded-openvla small-openvla tiny-openvla \\
        --steps 40 --out bench/results/cpu-pruning-overhead.json
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

METHODS = ["vla-pruner", "fastv", "sparsevlm", "divprune", "efficientvla", "random", "uniform"]
INSTRUCTION = "put the green cylinder on the purple plate"


def _p90(xs: list[float]) -> float:
    return float(np.percentile(xs, 90))


def measure(name: str, steps: int, keep: float, episode: int, warm: int) -> list[dict]:
    """Median prune-stage time and share of the step for every method on policy `name`."""
    configs = {"dense": PruneConfig()} | {
        m: PruneConfig(method=m, keep_ratio=keep) for m in METHODS
    }
    policies = {
        label: vla_prune.build_policy(name, seed=0).configure(prune=cfg)
        for label, cfg in configs.items()  # one policy per config: each keeps its own history
    }
    dense = policies["dense"]
    n, size = dense.config.num_patches, dense.config.image_size
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(episode)]
    timings: dict[str, list[dict[str, float]]] = {label: [] for label in configs}
    kept: dict[str, int] = {}
    t = 0
    while min(len(v) for v in timings.values()) < steps:
        if t > warm + 4 * (steps + episode):  # a method that never prunes at this keep ratio
            counts = {k: len(v) for k, v in timings.items()}
            raise RuntimeError(f"{name}: too few pruned steps per method: {counts}")
        for label, policy in policies.items():
            if t % episode == 0:
                policy.reset()
            r = policy.step(images[t % episode], INSTRUCTION)
            pruned = r.kept_visual_tokens < n
            if t >= warm and (pruned or label == "dense") and len(timings[label]) < steps:
                timings[label].append(r.timings_ms)
                kept[label] = r.kept_visual_tokens
        t += 1
    dense_total = statistics.median(x["total"] for x in timings["dense"])
    rows = []
    for label in configs:
        if label == "dense":
            continue
        ts = timings[label]
        prune = [x["prune"] for x in ts]
        rows.append(
            dict(
                policy=name,
                method=label,
                keep=keep,
                visual_tokens=n,
                kept=kept[label],
                steps=len(ts),
                prune_ms=statistics.median(prune),
                prune_p90_ms=_p90(prune),
                share_of_step=statistics.median(x["prune"] / x["total"] for x in ts),
                step_total_ms=statistics.median(x["total"] for x in ts),
                dense_total_ms=dense_total,
                overhead_vs_dense=statistics.median(prune) / dense_total,
            )
        )
    return rows


def table(rows: list[dict], markdown: bool) -> str:
    head = ["policy", "tokens", "method", "kept", "prune ms", "p90 ms", "share of step",
            "step ms", "dense step ms"]  # fmt: skip
    cells = [
        [
            r["policy"],
            str(r["visual_tokens"]),
            r["method"],
            str(r["kept"]),
            f"{r['prune_ms']:.3f}",
            f"{r['prune_p90_ms']:.3f}",
            f"{r['share_of_step']:.2%}",
            f"{r['step_total_ms']:.1f}",
            f"{r['dense_total_ms']:.1f}",
        ]
        for r in rows
    ]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells])
    widths = [max(len(h), *(len(c[i]) for c in cells)) + 2 for i, h in enumerate(head)]
    fmt = [str.ljust] * 3 + [str.rjust] * (len(head) - 3)
    return "\n".join(
        "".join(f(x, w) for f, x, w in zip(fmt, line, widths)) for line in [head, *cells]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--policy", nargs="+", default=["embedded-openvla", "tiny-openvla",
                                                    "small-openvla"])  # fmt: skip
    ap.add_argument("--steps", type=int, default=30, help="timed (pruned) steps per method")
    ap.add_argument("--keep", type=float, default=0.25)
    ap.add_argument("--episode", type=int, default=20, help="steps between policy.reset()")
    ap.add_argument("--warm", type=int, default=2, help="untimed steps at the start")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="STEM.json: writes STEM.json and STEM.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.policy:
        rows += measure(name, args.steps, args.keep, args.episode, args.warm)
    print(table(rows, markdown=False))
    if args.out:
        out = Path(args.out).with_suffix(".json")
        out.parent.mkdir(parents=True, exist_ok=True)
        command = "python " + " ".join(sys.argv)
        machine = machine_info()
        out.write_text(json.dumps({"command": command, "machine": machine, "rows": rows}, indent=2))
        where = ", ".join(f"{k} {v}" for k, v in machine.items())
        md = (
            f"### Prune stage (scoring + selection) per method, keep {args.keep:g}, "
            f"cpu-{args.threads}t (float32), medians over {args.steps} pruned steps\n\n"
            + table(rows, markdown=True)
            + "\n\nprune ms: StepResult.timings_ms['prune'] = the pruning hook at layer K "
            "(semantic/text attention probe at K-1, action-history smoothing, selection, "
            "report) + the action-decode attention probes. share of step: prune / total of the "
            "same step.\n\n"
            f"Machine: {where}\n\nCommand: `{command}`\n"
        )
        out.with_suffix(".md").write_text(md)
        print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()

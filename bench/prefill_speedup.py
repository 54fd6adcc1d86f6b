"""Dense vs pruned prefill on one CPU thread, interleaved in one run.

Prints the measured prefill speedup next to the speedup expected from the work per layer:
(a) the ratio of token rows summed over layers, (b) the ratio of analytic FLOPs. The kept set is
fixed (an even grid) so only the engine's cost is measured, not a selection method's.

    python bench/prefill_speedup.py --policy small-openvla --keep 0.25 --reps 15
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

import vla_prune
from vla_prune import PruneConfig
from vla_prune.engine.flops import step_flops
from vla_prune.profiling import machine_info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--policy", default="small-openvla")
    ap.add_argument("--keep", type=float, nargs="+", default=[0.25])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="JSON results file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    policy = vla_prune.build_policy(args.policy)
    cfg = policy.config
    image = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    inputs = policy.prepare(image, "pick up the red block and put it in the bowl")
    with torch.inference_mode():
        embeds = policy.model.embed_inputs(inputs["pixel_values"], inputs["input_ids"])
    n_text = inputs["input_ids"].shape[1]
    t = embeds.shape[1]
    pad = torch.zeros(1, dtype=torch.long)
    k_layer, _, _ = PruneConfig().resolve_layers(cfg.num_layers)
    engine = policy.engine

    def run(kept: torch.Tensor | None) -> float:
        hook = None if kept is None else (lambda ctx: kept[None])
        t0 = time.perf_counter()
        engine.prefill(embeds, pad, cfg.action_dim, prune_layer=k_layer, prune_hook=hook)
        return (time.perf_counter() - t0) * 1e3

    configs = {"dense": None}
    for keep in args.keep:
        n = max(1, round(keep * cfg.num_patches))
        configs[f"keep {keep:g}"] = torch.linspace(0, cfg.num_patches - 1, n).round().long()
    for kept in configs.values():  # warm-up
        run(kept)
        run(kept)
    times: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.reps):  # interleaved, so drift and other load hit every config alike
        for name, kept in configs.items():
            times[name].append(run(kept))

    dense_ms = statistics.median(times["dense"])
    dense_flops = step_flops(cfg, n_text).stages["prefill"]
    rows_dense = cfg.num_layers * t
    print(
        f"{args.policy}: {cfg.num_layers} layers x {cfg.llm_dim}, {t} prefill tokens, "
        f"pruning at layer {k_layer}, {args.threads} thread(s), {args.reps} reps (median)"
    )
    print(
        f"{'config':<12}{'kept':>6}{'prefill ms':>12}{'measured':>10}{'rows':>8}"
        f"{'FLOPs':>8}{'meas/FLOPs':>12}"
    )
    results = []
    for name, kept in configs.items():
        n_kept = cfg.num_patches if kept is None else len(kept)
        ms = statistics.median(times[name])
        t_kept = t - cfg.num_patches + n_kept
        rows = k_layer * t + (cfg.num_layers - k_layer) * t_kept
        flops = step_flops(cfg, n_text, n_kept, k_layer).stages["prefill"]
        measured, exp_rows, exp_flops = dense_ms / ms, rows_dense / rows, dense_flops / flops
        print(
            f"{name:<12}{n_kept:>6}{ms:>12.2f}{measured:>9.2f}x{exp_rows:>7.2f}x"
            f"{exp_flops:>7.2f}x{measured / exp_flops:>11.0%}"
        )
        results.append(
            dict(
                config=name,
                kept=n_kept,
                prefill_ms=ms,
                measured_speedup=measured,
                expected_rows=exp_rows,
                expected_flops=exp_flops,
            )
        )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(
            json.dumps(
                {
                    "policy": args.policy,
                    "machine": machine_info(),
                    "results": results,
                    "command": "python " + " ".join(sys.argv),
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()

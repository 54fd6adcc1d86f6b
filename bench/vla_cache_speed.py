"""VLA-Cache and VLA-Pruner x VLA-Cache against dense, in the same engine setting, on a frame
sequence where the gripper moves over a static scene (as between control steps), interleaved
step by step in one process (1 thread).

Prints per-stage medians, the total's ratio against dense of the same engine setting, the mean
fraction of visual rows reused and the prefill FLOPs saved. Reuse needs consecutive frames of
one scene: random frames (vla-prune bench) reuse nothing and time only VLA-Cache's overhead.

    python bench/vla_cache_speed.py --policy small-openvla --steps 20
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

import vla_prune
from vla_prune.benchmark import make_configs
from vla_prune.profiling import machine_info

SETTINGS = ("", "+compile+int8")
METHODS = (
    "dense",
    "vla-cache",
    "vla-cache[schedule_every=8]",  # the entropy schedule every 8th step instead of every step
    "vla-pruner@0.25",
    "vla-pruner+vla-cache@0.25",
    "vla-pruner+vla-cache[schedule_every=8]@0.25",
)
STAGES = ("vision", "prefill", "prune", "decode", "action_head", "total")
INSTRUCTION = "push the red cube onto the blue pad"


def moving_gripper(size: int, n: int, seed: int) -> list[np.ndarray]:
    """n consecutive frames of the embedded suite's push scene, the gripper moved by small
    random steps (random frames if the sim extra is missing)."""
    rng = np.random.default_rng(seed)
    try:
        from sim.envs import make_env
    except ImportError:
        return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]
    env = make_env("embedded", "push", image_size=size)
    try:
        obs, _ = env.reset(seed=5000 + seed)
        out = [obs["image"]]
        while len(out) < n:
            action = np.zeros(7)
            action[:3] = rng.uniform(-0.5, 0.5, 3) * env.config.max_delta
            obs, *_ = env.step(action)
            out.append(obs["image"])
        return out
    finally:
        env.close()


def run(policy_name: str, steps: int, seed: int) -> dict:
    policy = vla_prune.policy_from(policy_name)
    labels = [f"{m}{s}" for s in SETTINGS for m in METHODS]
    configs = make_configs(policy, tuple(labels))
    warm = max(c.warmup for c in configs)
    images = moving_gripper(policy.config.image_size, warm + steps, seed)
    for c in configs:  # compile (first calls) apart from the timed episode
        for _ in range(c.warmup):
            c.runner.step(images[0], INSTRUCTION)
        c.runner.reset()
    results: dict[str, list] = {c.label: [] for c in configs}
    for t in range(warm + steps):  # one episode per configuration, interleaved by step
        for c in configs:
            r = c.runner.step(images[t], INSTRUCTION)
            if t >= warm:
                results[c.label].append(r)
    rows = []
    for c in configs:
        got = results[c.label]
        med = {s: float(np.median([r.timings_ms.get(s, 0.0) for r in got])) for s in STAGES}
        setting = c.label[len(c.label.split("+compile")[0]) :] if "+compile" in c.label else ""
        base = results["dense" + setting]
        dense_total = float(np.median([r.timings_ms["total"] for r in base]))
        rows.append(
            {
                "config": c.label,
                "median_ms": med,
                "total_vs_dense": med["total"] / dense_total,
                "reused_fraction": float(
                    np.mean([r.extra.get("reused_fraction", 0.0) for r in got])
                ),
                "prefill_flops_saved": float(
                    np.mean([r.extra.get("reuse_flops_saved", 0) for r in got])
                ),
                "kept_visual_tokens": float(np.mean([r.kept_visual_tokens for r in got])),
            }
        )
    return {"policy": policy_name, "steps": steps, "rows": rows}


def table(result: dict) -> str:
    head = ["config", *[f"{s} ms" for s in STAGES], "total / dense", "reused", "GFLOPs saved"]
    lines = [
        f"### {result['policy']} ({result['steps']} interleaved steps, medians)",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in result["rows"]:
        cells = [r["config"], *[f"{r['median_ms'][s]:.2f}" for s in STAGES]]
        cells += [
            f"{r['total_vs_dense']:.3f}",
            f"{100 * r['reused_fraction']:.1f}%",
            f"{r['prefill_flops_saved'] / 1e9:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", nargs="+", default=["small-openvla"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results/cpu-vla-cache-speed")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    results = [run(p, args.steps, args.seed) for p in args.policy]
    command = "python bench/vla_cache_speed.py " + " ".join(sys.argv[1:])
    text = "\n\n".join(table(r) for r in results) + f"\n\nCommand: `{command}`\n"
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(
        json.dumps(
            {"command": command, "machine": machine_info("cpu"), "results": results}, indent=2
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

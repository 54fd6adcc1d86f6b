"""Engine settings side by side: eager fp32 / compiled fp32 / compiled bf16 / compiled int8,
each dense and VLA-Pruner at 25%, interleaved step by step in one process (1 thread).

Prints per-stage medians, ratios against eager fp32 dense, compile times, and how often each
setting's action tokens agree with eager fp32's on the same frames (bf16 / int8 change the
numbers: that agreement is the trade, measured here rather than asserted in a test).

    python bench/engine_speed.py --policy embedded-openvla small-openvla --steps 20
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import vla_prune
from vla_prune.benchmark import make_configs
from vla_prune.profiling import machine_info

SETTINGS = ("", "+compile", "+compile+bf16", "+compile+int8")
METHODS = ("dense", "vla-pruner@0.25")
STAGES = ("vision", "projector", "prefill", "prune", "decode", "total")
INSTRUCTION = "push the red cube onto the blue pad"


def frames(policy, n: int, seed: int) -> list[np.ndarray]:
    """Frames of the embedded suite when the policy was trained on it, else random ones."""
    size = policy.config.image_size
    try:
        from sim.envs import make_env

        env = make_env("embedded", "push", image_size=size)
        try:
            out = []
            for ep in range(n):
                obs, _ = env.reset(seed=5000 + seed + ep)
                out.append(obs["image"])
            return out
        finally:
            env.close()
    except Exception:  # no sim extra, or a policy at another resolution
        rng = np.random.default_rng(seed)
        return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def run(policy_name: str, steps: int, seed: int, settings=SETTINGS) -> dict:
    policy = vla_prune.policy_from(policy_name)
    settings = ("", *(s for s in settings if s))  # eager fp32 first: the ratios' baseline
    labels = [f"{m}{s}" for s in settings for m in METHODS]
    configs = make_configs(policy, tuple(labels))
    images = frames(policy, 8, seed)
    compile_s = {}
    for c in configs:  # first call compiles; time it apart from the steps
        t0 = time.perf_counter()
        for _ in range(c.warmup):
            c.runner.step(images[0], INSTRUCTION)
        compile_s[c.label] = time.perf_counter() - t0
        c.runner.reset()
    timings: dict[str, list[dict]] = {c.label: [] for c in configs}
    tokens: dict[str, list[np.ndarray]] = {c.label: [] for c in configs}
    warm = max(c.warmup for c in configs)
    for t in range(warm + steps):
        for c in configs:
            r = c.runner.step(images[t % len(images)], INSTRUCTION)
            if t >= warm:
                timings[c.label].append(r.timings_ms)
                tokens[c.label].append(r.action_tokens)
    base = float(np.median([x["total"] for x in timings["dense"]]))
    rows = []
    for c in configs:
        med = {s: float(np.median([x.get(s, 0.0) for x in timings[c.label]])) for s in STAGES}
        method = c.label.split("+")[0]
        ref = tokens[method]  # the same method in eager fp32: same frames, same history
        agree = np.mean([np.mean(a == b) for a, b in zip(tokens[c.label], ref)])
        rows.append(
            {
                "config": c.label,
                "median_ms": med,
                "speedup_vs_eager_dense": base / med["total"],
                "token_agreement_vs_eager_fp32": float(agree),
                "warmup_s": compile_s[c.label],
            }
        )
    return {"policy": policy_name, "steps": steps, "rows": rows}


def table(result: dict) -> str:
    head = ["config", *[f"{s} ms" for s in STAGES], "vs eager dense", "tokens = fp32", "warm-up s"]
    lines = [
        f"### {result['policy']} ({result['steps']} interleaved steps, medians)",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in result["rows"]:
        cells = [r["config"], *[f"{r['median_ms'][s]:.2f}" for s in STAGES]]
        cells += [
            f"{r['speedup_vs_eager_dense']:.2f}x",
            f"{100 * r['token_agreement_vs_eager_fp32']:.0f}%",
            f"{r['warmup_s']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", nargs="+", default=["embedded-openvla", "small-openvla"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results/cpu-engine-speed")
    ap.add_argument(
        "--settings", nargs="+", default=list(SETTINGS), metavar="S",
        help="engine settings besides eager fp32, e.g. +compile+int8 (default: all four)",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    results = [run(p, args.steps, args.seed, tuple(args.settings)) for p in args.policy]
    command = "python bench/engine_speed.py " + " ".join(sys.argv[1:])
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

"""`vla-prune bench`: the reference pipeline vs our engine, dense and pruned, side by side.

All configurations share one model (one set of weights) and run interleaved step by step in one
process, so drift and background load hit them alike; each has its own Policy, i.e. its own
temporal history. Results: a markdown table and JSON naming the device, with the command.
"""

from __future__ import annotations

import json
import logging
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import PruneConfig
from .policy import Policy
from .profiling import machine_info
from .reference import ReferencePipeline

log = logging.getLogger(__name__)

DEFAULT_CONFIGS = (
    "reference", "reference+attn", "dense",
    "vla-pruner@0.5", "vla-pruner@0.25", "vla-pruner@0.125",
    "fastv@0.5", "fastv@0.25", "fastv@0.125",
)


@dataclass
class BenchConfig:
    label: str
    runner: object  # Policy or ReferencePipeline
    warmup: int  # steps before timing (vla-pruner prunes after its temporal warm-up)


def make_configs(policy: Policy, labels: tuple[str, ...]) -> list[BenchConfig]:
    out = []
    for label in labels:
        if label == "reference":
            out.append(BenchConfig(label, ReferencePipeline(policy, "eager"), 2))
        elif label == "reference+attn":  # upstream pruning hooks: output_attentions everywhere
            out.append(BenchConfig(label, ReferencePipeline(policy, "eager", True), 2))
        else:
            p = Policy(policy.model, policy.tokenizer, policy.norm_stats, policy.unnorm_key)
            prune = PruneConfig()
            if label != "dense":
                method, _, keep = label.partition("@")
                prune = PruneConfig(method=method, keep_ratio=float(keep))
            p.configure(prune=prune)
            out.append(BenchConfig(label, p, 2 + prune.warmup_steps))
    return out


def run_bench(policy: Policy, labels=DEFAULT_CONFIGS, steps: int = 10, seed: int = 0) -> list[dict]:
    configs = make_configs(policy, tuple(labels))
    size = policy.config.image_size
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(4)]
    instruction = "put the green cylinder on the purple plate"
    timings: dict[str, list[dict]] = {c.label: [] for c in configs}
    kept: dict[str, list[int]] = {c.label: [] for c in configs}
    for t in range(max(c.warmup for c in configs) + steps):
        for c in configs:
            r = c.runner.step(images[t % len(images)], instruction)
            if t >= c.warmup and len(timings[c.label]) < steps:
                timings[c.label].append(r.timings_ms)
                kept[c.label].append(r.kept_visual_tokens)
    ref = statistics.median(t["total"] for t in timings[configs[0].label])
    dense = statistics.median(t["total"] for t in timings.get("dense", timings[configs[0].label]))
    rows = []
    for c in configs:
        ts = timings[c.label]
        stages = {s: statistics.median(t[s] for t in ts) for s in ts[0]}
        total = stages["total"]
        rows.append({
            "config": c.label, "kept": int(np.median(kept[c.label])), "steps": len(ts),
            "median_ms": stages, "p90_total_ms": float(np.percentile([t["total"] for t in ts], 90)),
            "speedup_vs_reference": ref / total, "speedup_vs_dense": dense / total,
        })
    return rows


def format_markdown(rows: list[dict], title: str) -> str:
    stages = ["vision", "projector", "prefill", "generate", "prune", "decode", "action_head"]
    stages = [s for s in stages if any(s in r["median_ms"] for r in rows)]
    head = ["config", "kept", *[f"{s} ms" for s in stages], "total ms", "p90 ms",
            f"vs {rows[0]['config']}", "vs dense"]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["config"], str(r["kept"])]
        cells += [f"{r['median_ms'][s]:.1f}" if s in r["median_ms"] else "" for s in stages]
        cells += [f"{r['median_ms']['total']:.1f}", f"{r['p90_total_ms']:.1f}",
                  f"{r['speedup_vs_reference']:.2f}x", f"{r['speedup_vs_dense']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def device_slug(device: str) -> str:
    if torch.device(device).type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu-{torch.get_num_threads()}t"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def write_results(rows: list[dict], out_dir: str | Path, policy: str, device: str,
                  dtype: str, command: str) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{device_slug(device)}-{policy}-{dtype}"
    title = f"{policy} on {device_slug(device)} ({dtype}), medians over the timed steps"
    md = format_markdown(rows, title) + f"\n\nCommand: `{command}`\n"
    stem.with_suffix(".md").write_text(md)
    stem.with_suffix(".json").write_text(json.dumps(
        {"policy": policy, "device": device_slug(device), "dtype": dtype, "command": command,
         "machine": machine_info(device), "rows": rows}, indent=2))
    return stem

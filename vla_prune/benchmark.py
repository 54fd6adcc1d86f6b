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

from .config import EngineConfig
from .policy import Policy
from .profiling import machine_info
from .reference import ReferencePipeline

log = logging.getLogger(__name__)

COGACT_CONFIGS = (
    "reference",
    "dense",
    "cache5",
    "cache5+vla-pruner@0.25",
    "cache5+vla-pruner@0.25+skip2",
)
DEFAULT_CONFIGS = (
    "reference",
    "reference+attn",
    "dense",
    "vla-pruner@0.5",
    "vla-pruner@0.25",
    "vla-pruner@0.125",
    "fastv@0.5",
    "fastv@0.25",
    "fastv@0.125",
)


@dataclass
class BenchConfig:
    label: str
    runner: object  # Policy or ReferencePipeline
    warmup: int  # steps before timing (vla-pruner prunes after its temporal warm-up)


def _fresh(policy: Policy, models: dict | None = None, weights: str | None = None) -> Policy:
    """Another Policy on the same model: its own history, noise streams and KV cache. With
    another weight format, on a converted copy of the model (shared by every configuration of
    that format: converting is one-way, so the original must stay as it is)."""
    model = policy.model
    if weights is not None and weights != policy.engine_config.weights:
        if weights not in models:
            import copy

            from .engine.weights import convert_weights

            models[weights] = copy.deepcopy(policy.model)
            convert_weights(models[weights], weights)
        model = models[weights]
    return type(policy)(model, policy.tokenizer, policy.norm_stats, policy.unnorm_key)


def make_configs(
    policy: Policy, labels: tuple[str, ...], images=(), engine: EngineConfig | None = None
) -> list[BenchConfig]:
    """Labels: reference | reference+attn | any spec of the run-spec grammar
    (vla_prune.runspec), e.g. vla-pruner@0.25, fastv@64, cache5+vla-pruner@0.25+skip2;
    skipN picks the N least influential LLM layers, calibrated on the bench images; `engine` is
    the EngineConfig of configurations that name none (+compile, +bf16, +int8)."""
    from .runspec import bad_spec, parse_run_spec

    out, models = [], {}
    for label in labels:
        if label in ("reference", "reference+attn"):  # +attn: output_attentions, as upstream
            ref = ReferencePipeline(_fresh(policy), "eager", label.endswith("+attn"))
            out.append(BenchConfig(label, ref, 2))
            continue
        spec = parse_run_spec(label)
        if spec.blind or spec.ensemble:
            raise bad_spec(label, "bench times the step itself: blind/ensemble do not apply")
        eng = spec.engine(engine or policy.engine_config)
        p, kw = _fresh(policy, models, eng.weights), {"engine": eng}
        if spec.cache is not None:
            from .caching import CacheConfig

            kw["cache"] = CacheConfig(interval=spec.cache, enabled=True)
        if spec.skip_layers:
            kw["skip_layers"] = list(spec.skip_layers)
        elif spec.skip_count is not None:
            from .caching.layer_skip import choose_skips, record_influence

            steps = [(im, "put the green cylinder on the purple plate") for im in images]
            _, sem, act = spec.prune.resolve_layers(p.config.num_layers)
            kw["skip_layers"] = choose_skips(
                record_influence(p, steps), spec.skip_count, protect=(sem, act)
            )
        p.configure(prune=spec.prune, **kw)
        out.append(BenchConfig(spec.label, p, 2 + spec.prune.warmup_steps))
    return out


def run_bench(
    policy: Policy,
    labels=DEFAULT_CONFIGS,
    steps: int = 10,
    seed: int = 0,
    engine: EngineConfig | None = None,
) -> list[dict]:
    size = policy.config.image_size
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(4)]
    configs = make_configs(policy, tuple(labels), images, engine)
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
        rows.append(
            {
                "config": c.label,
                "kept": int(np.median(kept[c.label])),
                "steps": len(ts),
                "skip_layers": sorted(
                    getattr(getattr(c.runner, "engine", None), "skip_layers", [])
                ),
                "median_ms": stages,
                "p90_total_ms": float(np.percentile([t["total"] for t in ts], 90)),
                "speedup_vs_reference": ref / total,
                "speedup_vs_dense": dense / total,
            }
        )
    return rows


def format_markdown(rows: list[dict], title: str) -> str:
    stages = ["vision", "projector", "prefill", "generate", "prune", "decode", "action_head"]
    stages = [s for s in stages if any(s in r["median_ms"] for r in rows)]
    head = [
        "config",
        "kept",
        *[f"{s} ms" for s in stages],
        "total ms",
        "p90 ms",
        f"vs {rows[0]['config']}",
        "vs dense",
    ]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["config"], str(r["kept"])]
        cells += [f"{r['median_ms'][s]:.1f}" if s in r["median_ms"] else "" for s in stages]
        cells += [
            f"{r['median_ms']['total']:.1f}",
            f"{r['p90_total_ms']:.1f}",
            f"{r['speedup_vs_reference']:.2f}x",
            f"{r['speedup_vs_dense']:.2f}x",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_stages(rows: list[dict], path: str | Path, title: str) -> Path:
    """Stacked per-stage median latency, one bar per configuration (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [
        s
        for s in (
            "preprocess",
            "vision",
            "projector",
            "prefill",
            "generate",
            "prune",
            "decode",
            "action_head",
            "post",
        )
        if any(s in r["median_ms"] for r in rows)
    ]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows)), 4))
    bottom = np.zeros(len(rows))
    for stage in stages:
        values = np.array([r["median_ms"].get(stage, 0.0) for r in rows])
        ax.bar(range(len(rows)), values, bottom=bottom, label=stage)
        bottom += values
    ax.set_xticks(
        range(len(rows)),
        [f"{r['config']}\n({r['kept']} tok)" for r in rows],
        rotation=45,
        ha="right",
        fontsize=8,
    )
    ax.set_ylabel("median ms per step")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def device_slug(device: str) -> str:
    if torch.device(device).type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu-{torch.get_num_threads()}t"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def write_results(
    rows: list[dict], out_dir: str | Path, policy: str, device: str, dtype: str, command: str
) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{device_slug(device)}-{policy}-{dtype}"
    title = f"{policy} on {device_slug(device)} ({dtype}), medians over the timed steps"
    md = format_markdown(rows, title) + f"\n\nCommand: `{command}`\n"
    stem.with_suffix(".md").write_text(md)
    plot_stages(rows, stem.with_suffix(".png"), title)
    stem.with_suffix(".json").write_text(
        json.dumps(
            {
                "policy": policy,
                "device": device_slug(device),
                "dtype": dtype,
                "command": command,
                "machine": machine_info(device),
                "rows": rows,
            },
            indent=2,
        )
    )
    return stem

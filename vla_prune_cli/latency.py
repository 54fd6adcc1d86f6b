"""Latency commands: info (counts), profile (stages + roofline), bench, calibrate."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

from .common import (
    DTYPES,
    engine_from,
    load_policy_arg,
    prune_config_from,
    require_sim,
    run_spec_from,
    write_json,
)


def cmd_info(args) -> int:
    if getattr(args, "target", None):
        return _info_target(args)
    if args.keep is None:  # info's --keep has no default so that --target can tell it was given
        args.keep = "0.25"
    policy = load_policy_arg(args.policy, "meta", "float32", args.seed)
    cfg = policy.config
    m = policy.model
    params = {
        "vision_backbone": sum(p.numel() for p in m.vision_backbone.parameters()),
        "projector": sum(p.numel() for p in m.projector.parameters()),
        "language_model": sum(p.numel() for p in m.language_model.parameters()),
    }
    if hasattr(m, "action_model"):  # CogACT's DiT head
        params["action_model"] = sum(p.numel() for p in m.action_model.parameters())
    params["total"] = sum(params.values())
    n_text = len(policy.token_ids(args.instruction))
    prune = prune_config_from(args)
    k, _, _ = prune.resolve_layers(cfg.num_layers)
    kept = prune.budget(cfg.num_patches) if prune.method != "none" else None
    flops = _flops(policy, n_text, kept, k if kept is not None else None)
    print(
        f"policy {cfg.name}: {cfg.num_patches} visual tokens, {n_text} text tokens, "
        f"{cfg.num_layers} LLM layers"
    )
    for name, n in params.items():
        print(f"  params {name:<16}{n:>16,}")
    for stage, f in {**flops.stages, "total": flops.total}.items():
        print(f"  GFLOPs {stage:<16}{f / 1e9:>16.2f}")
    if args.per_layer:
        _print_layers(cfg, flops, n_text, kept, k)
    if args.out:
        write_json(
            args.out,
            {"policy": cfg.name, "params": params, "flops": {**flops.stages, "total": flops.total}},
        )
    return 0


DEFAULT_BUDGETS = ("50%", "25%", "12.5%")  # kept visual tokens, after dense


def _info_target(args) -> int:
    """Roofline bound per stage on datasheet targets, per weight format and pruning budget."""
    from vla_prune.roofline import WEIGHT_BYTES
    from vla_prune.targets import format_targets, get_target

    if args.target.strip().lower() == "list":
        print(format_targets())
        return 0
    targets = [get_target(name) for name in args.target.split(",")]
    weights = [w.strip() for w in args.weights.split(",")]
    for w in weights:
        if w not in WEIGHT_BYTES:
            raise ValueError(f"unknown weight format {w!r}; known: {', '.join(WEIGHT_BYTES)}")
    if args.run or args.prune_config:
        raise ValueError("info --target takes budgets from --keep (a comma list), not a run spec")
    policy = load_policy_arg(args.policy, "meta", "float32", args.seed)
    n_text = len(policy.token_ids(args.instruction))
    budgets = _target_budgets(args, policy.config)
    results = []
    for i, target in enumerate(targets):
        if i:
            print()
        results.append(_project_target(policy, target, weights, budgets, n_text))
    if args.out:
        write_json(args.out, {"policy": policy.config.name, "targets": results})
    return 0


def _target_budgets(args, cfg) -> list[tuple[str, int | None, int | None]]:
    """(label, kept visual tokens or None, pruning layer K or None): dense, then --keep's."""
    from vla_prune.config import PruneConfig
    from vla_prune.runspec import parse_keep

    method = args.pruner if args.pruner not in ("none", "dense") else "vla-pruner"
    keeps = args.keep.split(",") if args.keep else list(DEFAULT_BUDGETS)
    out: list[tuple[str, int | None, int | None]] = [("dense", None, None)]
    for text in (k.strip() for k in keeps):
        if text in ("dense", "none", "1", "1.0", "100%"):
            continue
        prune = PruneConfig(method=method, layer=args.layer, **parse_keep(text))
        k, _, _ = prune.resolve_layers(cfg.num_layers)
        kept = prune.budget(cfg.num_patches)
        label = f"{prune.keep_ratio * 100:g}%" if prune.keep_ratio is not None else text
        out.append((label, kept, k))
    return out


def _project_target(policy, target, weights, budgets, n_text: int) -> dict:
    """Print one table per weight format (rows: budgets) and return it all as a dict."""
    import dataclasses

    from vla_prune.roofline import WEIGHT_BYTES, project_step

    cfg = policy.config
    n_weights = sum(p.numel() for p in policy.model.parameters())
    print(
        f"{cfg.name} on {target.name}: {target.bf16_flops / 1e12:.1f} TFLOP/s dense bf16, "
        f"{target.bandwidth / 1e9:.1f} GB/s, {target.memory_gb:g} GB; {n_text} text + "
        f"{cfg.num_patches} visual tokens (roofline bound: an upper limit on the rate)"
    )
    print(f"  source: {target.source}")
    tables = {}
    for w in weights:
        gb = n_weights * WEIGHT_BYTES[w] / 1e9
        fits = "" if gb < target.memory_gb else ": they do not fit"
        print(
            f"\n{w} weights ({gb:.1f} of {target.memory_gb:g} GB{fits}; "
            "activations and KV cache bf16)"
        )
        rows = []
        for label, kept, k in budgets:
            flops = _flops(policy, n_text, kept, k)
            roofs = project_step(policy, flops, target, w, n_text, kept, k)
            total = sum(r.ms for r in roofs.values())
            binding = max(roofs, key=lambda s: roofs[s].ms)
            rows.append(
                {
                    "budget": label,
                    "kept_visual_tokens": cfg.num_patches if kept is None else kept,
                    "prune_layer": k,
                    "stages": {s: {**dataclasses.asdict(r), "ms": r.ms} for s, r in roofs.items()},
                    "bound_ms": {s: r.ms for s, r in roofs.items()},
                    "total_ms": total,
                    "hz": 1e3 / total,
                    "binding_stage": binding,
                    "binding_roof": roofs[binding].bound,
                }
            )
        _print_target_table(rows)
        tables[w] = rows
    return {"target": dataclasses.asdict(target), "prompt_tokens": n_text, "tables": tables}


def _print_target_table(rows: list[dict]) -> None:
    stages = list(rows[0]["bound_ms"])
    widths = {s: max(len(s) + 5, 10) for s in stages}
    head = f"{'budget':<8}{'kept':>5}" + "".join(f"{s + ' ms':>{widths[s]}}" for s in stages)
    print(head + f"{'total ms':>10}{'Hz':>7}")
    for r in rows:
        cells = "".join(f"{r['bound_ms'][s]:>{widths[s]}.1f}" for s in stages)
        print(
            f"{r['budget']:<8}{r['kept_visual_tokens']:>5}{cells}{r['total_ms']:>10.1f}"
            f"{r['hz']:>7.1f}"
        )
    binds = {(r["binding_stage"], r["binding_roof"]) for r in rows}
    if len(binds) == 1:
        stage, roof = binds.pop()
        print(f"binds: {stage} ({roof}-bound) at every budget")
    else:
        parts = ", ".join(f"{r['budget']} {r['binding_stage']} ({r['binding_roof']})" for r in rows)
        print(f"binds: {parts}")
    roofs = "; ".join(
        f"{s} {rows[0]['stages'][s]['compute_ms']:.1f} / {rows[0]['stages'][s]['memory_ms']:.1f}"
        for s in stages
    )
    print(f"dense compute / memory roof ms: {roofs}")


def cmd_profile(args) -> int:
    from vla_prune.profiling import format_table, machine_info, summarize

    if args.device == "meta":
        return cmd_info(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    policy = load_policy_arg(args.policy, args.device, args.dtype, args.seed)
    prune = prune_config_from(args)
    skips = _skip_layers(args)
    kw = {}
    if (cache := run_spec_from(args).cache) is not None:
        if policy.head.cache_config is None:
            raise ValueError(f"cache{cache} needs a CogACT policy (a DiT head): {args.policy}")
        from vla_prune.caching import CacheConfig

        kw["cache"] = CacheConfig(interval=cache, enabled=True)
    engine = engine_from(args)
    policy.configure(prune=prune, skip_layers=skips, engine=engine, **kw)
    rng = np.random.default_rng(args.seed)
    size = policy.config.image_size
    cuda = torch.device(args.device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(args.device)
    timings, kept = [], []
    for i in range(args.warmup + args.steps):
        image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        r = policy.step(image, args.instruction)
        if i >= args.warmup:
            timings.append(r.timings_ms)
            kept.append(r.kept_visual_tokens)
    summary = summarize(timings)
    n_text = policy.prepare(image, args.instruction)["input_ids"].shape[1]
    k, _, _ = prune.resolve_layers(policy.config.num_layers)
    n_kept = int(np.median(kept))
    flops = _flops(policy, n_text, n_kept, k, skips)
    stage_flops = {**flops.stages, "total": flops.total}
    stage_flops["decode"] += stage_flops.pop("lm_head")  # the timer's decode includes it
    if not stage_flops["decode"]:
        del stage_flops["decode"]
    print(
        f"policy {policy.config.name} | pruner {prune.method} keep {n_kept}/"
        f"{policy.config.num_patches} | skip {sorted(skips or [])} | {args.steps} steps | "
        f"device {args.device} "
        f"{args.dtype} | engine compile={engine.compile} weights={engine.weights} | "
        f"threads {torch.get_num_threads()}"
    )
    nbytes = bound = None
    if args.roofline:
        from vla_prune.roofline import bounds_ms, device_peak, stage_bytes

        peak = device_peak(args.device, DTYPES[args.dtype])
        nbytes = stage_bytes(
            policy.model,
            policy.config,
            n_text,
            n_kept if n_kept < policy.config.num_patches else None,
            k,
            torch.finfo(DTYPES[args.dtype]).bits // 8,
            frozenset(skips or ()),
        )
        bound = bounds_ms(flops, nbytes, peak)
        print(
            f"roofline: {peak.name}: {peak.flops / 1e12:.2f} TFLOP/s, "
            f"{peak.bandwidth / 1e9:.1f} GB/s ({peak.source})"
        )
    print(format_table(summary, stage_flops, nbytes, bound))
    if cuda:
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated(args.device) / 1e9:.2f} GB")
    if args.per_layer:
        _print_layers(
            policy.config, flops, n_text, n_kept if n_kept < policy.config.num_patches else None, k
        )
    result = {
        "policy": policy.config.name,
        "prune": prune.__dict__,
        "kept_visual_tokens": n_kept,
        "steps": args.steps,
        "device": args.device,
        "dtype": args.dtype,
        "machine": machine_info(args.device),
        "summary_ms": summary,
        "flops": stage_flops,
        "flops_per_layer": {"prefill": flops.prefill_layers, "decode": flops.decode_layers},
        "skip_layers": sorted(skips or []),
        "engine": {"compile": engine.compile, "weights": engine.weights},
        "bytes": nbytes,
        "roofline_ms": bound,
        "timings_ms": timings,
        "peak_gpu_memory_gb": torch.cuda.max_memory_allocated(args.device) / 1e9 if cuda else None,
    }
    safe = str(args.policy).strip("/").replace("/", "_")
    write_json(args.out or f"runs/profile/{safe}.json", result)  # always: re-plot / compare later
    return 0


DEFAULT_EVAL_CONFIG = "configs/eval/embedded.yaml"


def _flops(policy, n_text: int, kept: int | None, k_layer: int | None, skips=()):
    """Analytic FLOPs of one step of this policy (OpenVLA: decode; CogACT: DiT sampling)."""
    from vla_prune.engine.flops import step_flops

    skips = frozenset(skips or ())
    head = policy.head
    f = step_flops(
        policy.config, n_text, kept, k_layer, decode_steps=head.decode_steps, skip_layers=skips,
        lm_head=head.prefill_output == "logits",
    )
    return dataclasses.replace(f, action_head=head.flops())


def _print_layers(cfg, flops, n_text: int, kept: int | None, k_layer: int) -> None:
    """Per decoder layer: rows it runs on in prefill, its prefill and decode GFLOPs."""
    t = n_text + cfg.num_patches
    print(f"{'layer':>5}{'rows':>7}{'prefill GF':>12}{'decode GF':>11}")
    for i, (pf, dc) in enumerate(zip(flops.prefill_layers, flops.decode_layers)):
        rows = t if kept is None or i < k_layer else t - cfg.num_patches + kept
        print(f"{i:>5}{rows:>7}{pf / 1e9:>12.3f}{dc / 1e9:>11.4f}")


def _skip_layers(args) -> list[int] | None:
    spec = run_spec_from(args)
    if spec.skip_count is not None:
        raise ValueError(
            f"profile runs the layers it is told: skip[i,j] or --skip-file from "
            f"`vla-prune calibrate --skip {spec.skip_count}`, not skip{spec.skip_count}"
        )
    if spec.skip_layers:
        return list(spec.skip_layers)
    if args.skip_file:
        from vla_prune.caching.layer_skip import load_skip_list

        return load_skip_list(args.skip_file)
    if args.skip_layers:
        return [int(x) for x in args.skip_layers.split(",")]
    return None


def _calibration_frames(args):
    """(image, instruction) pairs: every `every`-th frame of scripted-expert episodes of the
    embedded suite (seeds from 1,000,000: never evaluation scenes), or PNGs from a folder."""
    if args.images:
        from PIL import Image

        files = sorted(Path(args.images).glob("*.png"))
        if not files:
            raise ValueError(f"no PNG images in {args.images}")
        return [(np.asarray(Image.open(f).convert("RGB")), args.instruction) for f in files]
    if not require_sim("calibrate"):
        raise ValueError('calibration from the embedded suite needs pip install -e ".[sim]"')
    from sim.envs import make_env
    from sim.experts import expert_for

    frames = []
    for task in args.tasks.split(","):
        env = make_env("embedded", task)
        try:
            for ep in range(args.episodes):
                obs, _ = env.reset(seed=1_000_000 + ep)
                expert = expert_for(env)
                for t in range(env.max_episode_steps):
                    if t % args.every == 0:
                        frames.append((obs["image"], obs["instruction"]))
                    obs, _, terminated, truncated, _ = env.step(expert(obs))
                    if terminated or truncated:
                        break
        finally:
            env.close()
    return frames


def cmd_calibrate(args) -> int:
    """Block influence per LLM layer over recorded steps -> a skip list (JSON)."""
    from vla_prune.caching.layer_skip import choose_skips, record_influence

    policy = load_policy_arg(args.policy, "cpu", "float32", args.seed)
    frames = _calibration_frames(args)
    recording = record_influence(policy, frames)
    _, sem, act = prune_config_from(args).resolve_layers(policy.config.num_layers)
    skips = choose_skips(recording, args.skip, protect=(sem, act))
    for i, inf in enumerate(recording.influence):
        print(f"layer {i:>3}  I = {inf:.5f}{'  skip' if i in skips else ''}")
    out = args.out or "runs/calibration/skip_layers.json"
    write_json(
        out,
        {
            "policy": args.policy,
            "steps": len(frames),
            "skip_layers": skips,
            "influence": recording.influence.tolist(),
            "recording": recording.__dict__,
        },
    )
    return 0


def cmd_bench(args) -> int:
    """Reference vs ours (dense, pruned), interleaved in one process; markdown + JSON."""
    from vla_prune.benchmark import (
        COGACT_CONFIGS,
        DEFAULT_CONFIGS,
        format_markdown,
        run_bench,
        write_results,
    )
    from vla_prune.runspec import split_specs

    if args.threads:
        torch.set_num_threads(args.threads)
    policy = load_policy_arg(args.policy, args.device, args.dtype, args.seed)
    default = COGACT_CONFIGS if policy.head.cache_config is not None else DEFAULT_CONFIGS
    labels = tuple(split_specs(args.configs)) if args.configs else default
    rows = run_bench(policy, labels, steps=args.steps, seed=args.seed, engine=engine_from(args))
    command = "vla-prune " + " ".join(sys.argv[1:])
    print(format_markdown(rows, f"{args.policy} ({args.device}, {args.dtype})"))
    stem = write_results(
        rows, args.out or "bench/results", args.policy, args.device, args.dtype, command
    )
    print(f"wrote {stem}.md and {stem}.json")
    return 0

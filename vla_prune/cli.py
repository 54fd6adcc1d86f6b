"""`vla-prune` command line: profile, info, viz, eval, ros-node."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _load(name: str, device: str, dtype: str, seed: int):
    import vla_prune

    return vla_prune.policy_from(name, device=device, dtype=DTYPES[dtype], seed=seed)


def _prune_config(args):
    from vla_prune import PruneConfig
    from vla_prune.config import load_yaml

    if args.prune_config:
        return load_yaml(PruneConfig, args.prune_config)
    if args.pruner == "none":
        return PruneConfig()
    return PruneConfig(method=args.pruner, keep_ratio=args.keep, layer=args.layer)


def cmd_info(args) -> int:

    policy = _load(args.policy, "meta", "float32", args.seed)
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
    prune = _prune_config(args)
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
        _write_json(
            args.out,
            {"policy": cfg.name, "params": params, "flops": {**flops.stages, "total": flops.total}},
        )
    return 0


def cmd_profile(args) -> int:
    from vla_prune.profiling import format_table, machine_info, summarize

    if args.device == "meta":
        return cmd_info(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    policy = _load(args.policy, args.device, args.dtype, args.seed)
    prune = _prune_config(args)
    skips = _skip_layers(args)
    policy.configure(prune=prune, skip_layers=skips)
    rng = np.random.default_rng(args.seed)
    size = policy.config.image_size
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
        f"{args.dtype} | threads {torch.get_num_threads()}"
    )
    nbytes = bound = None
    if args.roofline:
        from vla_prune.roofline import bounds_ms, device_peak, stage_bytes

        peak = device_peak(args.device, DTYPES[args.dtype])
        nbytes = stage_bytes(policy.model, policy.config, n_text, n_kept if n_kept <
                             policy.config.num_patches else None, k,
                             torch.finfo(DTYPES[args.dtype]).bits // 8, frozenset(skips or ()))
        bound = bounds_ms(flops, nbytes, peak)
        print(f"roofline: {peak.name}: {peak.flops / 1e12:.2f} TFLOP/s, "
              f"{peak.bandwidth / 1e9:.1f} GB/s ({peak.source})")
    print(format_table(summary, stage_flops, nbytes, bound))
    if args.per_layer:
        _print_layers(policy.config, flops, n_text, n_kept if n_kept < policy.config.num_patches
                      else None, k)
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
        "bytes": nbytes,
        "roofline_ms": bound,
        "timings_ms": timings,
    }
    if args.out:
        _write_json(args.out, result)
    return 0


DEFAULT_EVAL_CONFIG = "configs/eval/embedded.yaml"


def _eval_runs(text: str):
    """--configs: specs like dense,vla-pruner@0.25,fastv@64 or a YAML path (argparse type)."""
    from sim.eval.config import parse_runs

    try:
        return parse_runs(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _eval_config_path(path: str | None) -> Path:
    if path is not None:
        return Path(path)
    for root in (Path.cwd(), Path(__file__).resolve().parents[1]):  # cwd, then the repo
        if (root / DEFAULT_EVAL_CONFIG).is_file():
            return root / DEFAULT_EVAL_CONFIG
    raise ValueError(f"no {DEFAULT_EVAL_CONFIG} here; pass --eval-config FILE")


def _require_sim(command: str) -> bool:
    import os

    os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering; before mujoco is imported
    logging.getLogger("OpenGL").setLevel(logging.WARNING)  # PyOpenGL's INFO chatter
    try:
        import gymnasium  # noqa: F401
        import mujoco  # noqa: F401
    except ImportError as e:
        print(
            f'vla-prune {command} needs the simulation extra: pip install -e ".[sim]" ({e})',
            file=sys.stderr,
        )
        return False
    return True


def cmd_viz(args) -> int:
    """One episode; a PNG per step with the kept tokens over the camera image."""
    if not _require_sim("viz"):
        return 2
    from sim.envs import make_env
    from vla_prune.viz import overlay

    policy = _load(args.policy, "cpu", "float32", args.seed)
    prune = _prune_config(args)
    policy.configure(prune=prune)
    if args.unnorm_key:
        policy.configure(unnorm_key=args.unnorm_key)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = make_env(args.suite, args.task)
    try:
        obs, _ = env.reset(seed=args.seed)
        policy.reset()
        n = policy.config.num_patches
        side = int(round(n**0.5))
        for t in range(args.steps):
            r = policy.step(obs["image"], obs["instruction"])
            title = (f"step {t} | {prune.method} kept {r.kept_visual_tokens}/{n} | "
                     f"{obs['instruction']}")
            overlay(obs["image"], r.kept_indices, r.origin, (side, side), title=title).save(
                out / f"step_{t:03d}.png")
            obs, _, terminated, truncated, info = env.step(r.actions[0])
            if terminated or truncated:
                break
    finally:
        env.close()
    print(f"wrote {t + 1} frames to {out} (success: {bool(info.get('success'))})")
    return 0


def _calibration_frames(args):
    """(image, instruction) pairs: every `every`-th frame of scripted-expert episodes of the
    embedded suite (seeds from 1,000,000: never evaluation scenes), or PNGs from a folder."""
    if args.images:
        from PIL import Image

        files = sorted(Path(args.images).glob("*.png"))
        if not files:
            raise ValueError(f"no PNG images in {args.images}")
        return [(np.asarray(Image.open(f).convert("RGB")), args.instruction) for f in files]
    if not _require_sim("calibrate"):
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

    policy = _load(args.policy, "cpu", "float32", args.seed)
    frames = _calibration_frames(args)
    recording = record_influence(policy, frames)
    _, sem, act = _prune_config(args).resolve_layers(policy.config.num_layers)
    skips = choose_skips(recording, args.skip, protect=(sem, act))
    for i, inf in enumerate(recording.influence):
        print(f"layer {i:>3}  I = {inf:.5f}{'  skip' if i in skips else ''}")
    out = args.out or "runs/calibration/skip_layers.json"
    _write_json(out, {"policy": args.policy, "steps": len(frames), "skip_layers": skips,
                      "influence": recording.influence.tolist(), "recording": recording.__dict__})
    return 0


def _skip_layers(args) -> list[int] | None:
    if args.skip_file:
        return json.loads(Path(args.skip_file).read_text())["skip_layers"]
    if args.skip_layers:
        return [int(x) for x in args.skip_layers.split(",")]
    return None


def cmd_bench(args) -> int:
    """Reference vs ours (dense, pruned), interleaved in one process; markdown + JSON."""
    from vla_prune.benchmark import (
        COGACT_CONFIGS,
        DEFAULT_CONFIGS,
        format_markdown,
        run_bench,
        write_results,
    )

    if args.threads:
        torch.set_num_threads(args.threads)
    policy = _load(args.policy, args.device, args.dtype, args.seed)
    default = COGACT_CONFIGS if policy.prefill_output == "hidden" else DEFAULT_CONFIGS
    labels = tuple(args.configs.split(",")) if args.configs else default
    rows = run_bench(policy, labels, steps=args.steps, seed=args.seed)
    command = "vla-prune " + " ".join(sys.argv[1:])
    print(format_markdown(rows, f"{args.policy} ({args.device}, {args.dtype})"))
    stem = write_results(rows, args.out or "bench/results", args.policy, args.device,
                         args.dtype, command)
    print(f"wrote {stem}.md and {stem}.json")
    return 0


def cmd_eval(args) -> int:
    if not _require_sim("eval"):
        return 2
    from sim.eval import format_table, load_eval_config, run_eval

    cfg = load_eval_config(
        _eval_config_path(args.eval_config),
        suite=args.suite,
        tasks=args.tasks,  # "press,push" or "all"
        episodes=args.episodes,
        seed=args.seed,
        policy=args.policy,
        unnorm_key=args.unnorm_key,
        runs=args.configs,
        out=args.out,
        max_steps=args.max_steps,
        video=args.video or None,
        threads=args.threads,
        warmup=args.warmup,
        device=args.device,
        dtype=args.dtype,
    )
    summary = run_eval(cfg, progress=not args.quiet)
    print(format_table(summary))
    print(f"wrote {cfg.out}/episodes.jsonl and summary.md, summary.json, summary.png")
    return 0


def _flops(policy, n_text: int, kept: int | None, k_layer: int | None, skips=()):
    """Analytic FLOPs of one step of this policy (OpenVLA: decode; CogACT: DiT sampling)."""
    from vla_prune.engine.flops import step_flops

    skips = frozenset(skips or ())
    if policy.prefill_output != "hidden":
        return step_flops(policy.config, n_text, kept, k_layer, skip_layers=skips)
    from vla_prune.caching import sampling_flops

    f = step_flops(policy.config, n_text, kept, k_layer, decode_steps=0, skip_layers=skips)
    s = policy.sampling
    head = sampling_flops(policy.config.dit, 1, s.ddim_steps, s.cfg_scale, policy.cache_config)
    return type(f)(f.vision, f.projector, f.prefill_layers, f.decode_layers, 0, 0, head)


def _print_layers(cfg, flops, n_text: int, kept: int | None, k_layer: int) -> None:
    """Per decoder layer: rows it runs on in prefill, its prefill and decode GFLOPs."""
    t = n_text + cfg.num_patches
    print(f"{'layer':>5}{'rows':>7}{'prefill GF':>12}{'decode GF':>11}")
    for i, (pf, dc) in enumerate(zip(flops.prefill_layers, flops.decode_layers)):
        rows = t if kept is None or i < k_layer else t - cfg.num_patches + kept
        print(f"{i:>5}{rows:>7}{pf / 1e9:>12.3f}{dc / 1e9:>11.4f}")


def cmd_ros_node(args) -> int:
    """The ROS 2 policy node and the sim bridge as separate processes (ros_nodes.launcher)."""
    from ros_nodes import launcher

    try:
        import rclpy  # noqa: F401
    except ImportError as e:
        print(
            f'vla-prune ros-node needs the ROS 2 extra: pip install -e ".[ros,sim]" ({e})',
            file=sys.stderr,
        )
        return 2
    return launcher.run_args(args)


def _write_json(path: str, data: dict) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2, default=str))
    print(f"wrote {out}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vla-prune", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--policy", default="tiny-openvla", help="preset name or checkpoint dir")
        sp.add_argument("--pruner", default="none", help="pruning method (see configs/pruning)")
        sp.add_argument("--keep", type=float, default=0.25, help="kept visual-token ratio")
        sp.add_argument("--layer", type=int, default=None, help="pruning layer K (default: scaled)")
        sp.add_argument(
            "--prune-config", default=None, help="YAML PruneConfig (overrides --pruner)"
        )
        sp.add_argument("--instruction", default="pick up the red block")
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--out", default=None, help="write results as JSON here")
        sp.add_argument("--per-layer", action="store_true", help="FLOPs and rows per LLM layer")

    prof = sub.add_parser("profile", help="per-stage latency of control steps")
    common(prof)
    prof.add_argument("--steps", type=int, default=20)
    prof.add_argument("--warmup", type=int, default=3)
    prof.add_argument("--device", default="cpu", help="cpu | cuda | meta (meta = counts only)")
    prof.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    prof.add_argument("--threads", type=int, default=1, help="CPU threads (0 = torch default)")
    prof.add_argument("--skip-layers", default=None, help="LLM layers to skip, e.g. 5,9")
    prof.add_argument("--roofline", action=argparse.BooleanOptionalAction, default=True,
                      help="bytes moved and roofline bound per stage (peaks measured on CPU)")
    prof.add_argument("--skip-file", default=None, help="JSON from `vla-prune calibrate`")
    prof.set_defaults(fn=cmd_profile)

    bench = sub.add_parser("bench", help="reference vs ours, dense and pruned, side by side")
    bench.add_argument("--policy", default="small-openvla")
    bench.add_argument("--configs", default=None,
                       help="comma list, e.g. reference,dense,vla-pruner@0.25 (default: all)")
    bench.add_argument("--steps", type=int, default=10)
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    bench.add_argument("--threads", type=int, default=1)
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--out", default=None, help="results folder (default bench/results)")
    bench.set_defaults(fn=cmd_bench)

    cal = sub.add_parser("calibrate", help="choose LLM layers to skip by block influence")
    common(cal)
    cal.add_argument("--skip", type=int, default=1, help="how many layers to skip")
    cal.add_argument("--tasks", default="press,push,pick_place,stack")
    cal.add_argument("--episodes", type=int, default=2, help="expert episodes per task")
    cal.add_argument("--every", type=int, default=5, help="record every n-th frame")
    cal.add_argument("--images", default=None, help="a folder of PNGs instead of the suite")
    cal.set_defaults(fn=cmd_calibrate)

    viz = sub.add_parser("viz", help="PNGs of the kept tokens over the camera, one per step")
    common(viz)
    viz.add_argument("--suite", default="embedded")
    viz.add_argument("--task", default="press")
    viz.add_argument("--steps", type=int, default=40)
    viz.add_argument("--unnorm-key", default=None)
    viz.set_defaults(fn=cmd_viz, out="runs/viz")

    info = sub.add_parser("info", help="parameter counts and FLOPs per stage (no weights run)")
    common(info)
    info.set_defaults(fn=cmd_info)

    ev = sub.add_parser(
        "eval",
        help="success rate + latency of pruning configurations in simulation (paired, resumable)",
        description="Flags override the eval YAML (default configs/eval/embedded.yaml).",
    )
    ev.add_argument("--eval-config", default=None, help="eval YAML (EvalConfig fields)")
    ev.add_argument("--suite", default=None, help="env suite, e.g. embedded")
    ev.add_argument("--tasks", default=None, help="comma-separated task names, or 'all'")
    ev.add_argument("--episodes", type=int, default=None, help="episodes per task and config")
    ev.add_argument("--seed", type=int, default=None, help="episode i uses env seed SEED + i")
    ev.add_argument("--policy", default=None, help="checkpoint dir or preset name")
    ev.add_argument("--unnorm-key", default=None, help="dataset statistics (default: suite)")
    ev.add_argument(
        "--configs",
        type=_eval_runs,
        default=None,
        help="comma-separated [label=]method[@keep] (dense, vla-pruner@0.25, fastv@64, "
        "x=path.yaml) or a YAML file with a list / `configs:`",
    )
    ev.add_argument("--out", default=None, help="output dir (resumes if it holds episodes)")
    ev.add_argument("--max-steps", type=int, default=None, help="env steps per episode")
    ev.add_argument("--video", action="store_true", help="write episode GIFs to OUT/videos")
    ev.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1)")
    ev.add_argument("--warmup", type=int, default=None, help="untimed steps per config")
    ev.add_argument("--device", default=None, help="cpu | cuda")
    ev.add_argument("--dtype", default=None, choices=sorted(DTYPES))
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    ev.set_defaults(fn=cmd_eval)

    from ros_nodes.launcher import add_arguments as ros_arguments

    ros = sub.add_parser(
        "ros-node",
        help="ROS 2 policy node (+ sim bridge) from one parameter file",
        description="Starts python -m ros_nodes.policy_node and ros_nodes.sim_bridge with "
        "--params-file; Fast DDS restricted to shared memory on this host unless "
        "--allow-network. SIGINT / SIGTERM stop both.",
    )
    ros_arguments(ros)
    ros.set_defaults(fn=cmd_ros_node)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ValueError as e:  # bad configs/inputs: one clear line, no traceback
        print(f"vla-prune: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""`vla-prune` command line: the parser; each command lives in a module beside this one."""

from __future__ import annotations

import argparse
import logging
import sys

from .common import DTYPES
from .latency import cmd_bench, cmd_calibrate, cmd_info, cmd_profile
from .ros import cmd_ros_node
from .simulation import cmd_eval, cmd_viz, parse_eval_runs


def _suites() -> str:
    """The registered env suites, for --help (the registry imports no simulator)."""
    try:
        from sim.envs import list_suites
    except ImportError as e:  # the sim extra is missing
        return f"? (pip install -e '.[sim]' to list them: {e})"
    return " | ".join(list_suites())


def engine_flags(sp: argparse.ArgumentParser, default: bool | None = False) -> None:
    """--compile / --weights: the EngineConfig of every configuration that names none."""
    sp.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=default,
        help="compiled static-shape decode step (torch.compile; CUDA graphs on a GPU)",
    )
    sp.add_argument(
        "--weights",
        default=None if default is None else "fp32",
        choices=("fp32", "bf16", "int8"),
        help="weight format: fp32 | bf16 | int8 (int8 weight-only LLM linears, bf16 elsewhere)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vla-prune", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--policy", default="tiny-openvla", help="preset name or checkpoint dir")
        sp.add_argument("--pruner", default="none", help="pruning method (see configs/pruning)")
        sp.add_argument(
            "--keep", default="0.25", help="kept visual tokens: a ratio (0.25), a count (64), 25%%"
        )
        sp.add_argument(
            "--run",
            default=None,
            help="a run spec instead of --pruner/--keep, e.g. vla-pruner@0.25+cache5+skip[2] "
            "(grammar: vla_prune/runspec.py)",
        )
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
    prof.add_argument(
        "--roofline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="bytes moved and roofline bound per stage (peaks measured on CPU)",
    )
    prof.add_argument("--skip-file", default=None, help="JSON from `vla-prune calibrate`")
    engine_flags(prof)
    prof.set_defaults(fn=cmd_profile)

    bench = sub.add_parser("bench", help="reference vs ours, dense and pruned, side by side")
    bench.add_argument("--policy", default="small-openvla")
    bench.add_argument(
        "--configs",
        default=None,
        help="comma list of reference, reference+attn and run specs, e.g. "
        "reference,dense,vla-pruner@0.25,fastv@64,cache5+vla-pruner@0.25+skip2 (default: all)",
    )
    bench.add_argument("--steps", type=int, default=10)
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    bench.add_argument("--threads", type=int, default=1)
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--out", default=None, help="results folder (default bench/results)")
    engine_flags(bench)
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
    viz.add_argument("--suite", default="embedded", help=f"env suite: {_suites()}")
    viz.add_argument("--task", default="press")
    viz.add_argument("--steps", type=int, default=40)
    viz.add_argument("--unnorm-key", default=None)
    viz.set_defaults(fn=cmd_viz, out="runs/viz")

    info = sub.add_parser("info", help="parameter counts and FLOPs per stage (no weights run)")
    common(info)
    info.add_argument(
        "--target",
        default=None,
        help="roofline bound per stage and control rate on a datasheet GPU, e.g. "
        "jetson-agx-orin-64gb, jetson-thor (comma list; 'list' shows the table and its sources)",
    )
    info.add_argument(
        "--weights",
        default="bf16,int8,int4",
        help="weight formats for --target (weight-only: int8/int4 change bytes, not the math)",
    )
    # keep=None: --target then projects dense + 50/25/12.5%, or dense + the --keep comma list.
    info.set_defaults(fn=cmd_info, keep=None)

    ev = sub.add_parser(
        "eval",
        help="success rate + latency of pruning configurations in simulation (paired, resumable)",
        description="Flags override the eval YAML (default configs/eval/embedded.yaml).",
    )
    ev.add_argument("--eval-config", default=None, help="eval YAML (EvalConfig fields)")
    ev.add_argument("--suite", default=None, help=f"env suite: {_suites()} (default: embedded)")
    ev.add_argument("--tasks", default=None, help="comma-separated task names, or 'all'")
    ev.add_argument("--episodes", type=int, default=None, help="episodes per task and config")
    ev.add_argument("--seed", type=int, default=None, help="episode i uses env seed SEED + i")
    ev.add_argument("--policy", default=None, help="checkpoint dir or preset name")
    ev.add_argument("--unnorm-key", default=None, help="dataset statistics (default: suite)")
    ev.add_argument(
        "--configs",
        type=parse_eval_runs,
        default=None,
        help="comma-separated run specs [label=]method@keep[+cacheN][+skip[i,j]][+ensemble] "
        "(dense, vla-pruner@0.25, fastv@64, x=path.yaml) or a YAML file with a list / `configs:`",
    )
    ev.add_argument("--out", default=None, help="output dir (resumes if it holds episodes)")
    ev.add_argument("--max-steps", type=int, default=None, help="env steps per episode")
    ev.add_argument("--video", action="store_true", help="write episode GIFs to OUT/videos")
    ev.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1)")
    ev.add_argument(
        "--workers",
        type=int,
        default=None,
        help="local: processes running whole configurations side by side (e.g. one per core); "
        "ray: worker actors, each taking one episode (or wave) at a time",
    )
    ev.add_argument(
        "--backend",
        default=None,
        choices=("local", "ray"),
        help="where episodes run: this machine's processes, or Ray actors (pip install -e "
        "'.[ray]'); the records are the same, and either backend resumes the other's OUT",
    )
    ev.add_argument(
        "--ray-address",
        default=None,
        help="ray: a running cluster (auto, ray://head:10001, head:6379); default: start one here",
    )
    ev.add_argument(
        "--envs-per-worker",
        type=int,
        default=None,
        help="ray: episodes a worker runs in lockstep, answered by one batched policy call",
    )
    ev.add_argument(
        "--gpus-per-worker", type=float, default=None, help="ray: e.g. 1, or 0.5 (two a GPU)"
    )
    ev.add_argument("--cpus-per-worker", type=float, default=None, help="ray (default 1)")
    ev.add_argument(
        "--max-retries",
        type=int,
        default=None,
        help="ray: re-runs of an episode whose worker died (default 3)",
    )
    ev.add_argument("--warmup", type=int, default=None, help="untimed steps per config")
    ev.add_argument("--device", default=None, help="cpu | cuda")
    engine_flags(ev, default=None)
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

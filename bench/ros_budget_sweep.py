"""Success and deadline misses against the latency budget, over ROS, on the embedded suite.

One policy node per policy (its levels built and measured once at configure, the log keeps
the front); for each budget (set at run time, like `ros2 param set`) and each task family the
lock-step sim bridge runs the episodes as its own process. Per episode (joined from the
bridge's record and the node's step log by image stamp): success, policy steps, steps over the
budget ("misses": answered with the safe action), safe answers, and the levels the steps ran
at. Out: OUT/episodes.jsonl (one line per finished episode: a rerun resumes where it stopped),
OUT/summary.{json,md,png} (success and miss rate against the budget), OUT/<policy>/node.log
(the measured front, level changes and why), OUT/<policy>/steps.jsonl.gz (the node's step log).

Semantics (lock-step, `trigger: image`): the bridge steps the env on the answer to its latest
image, so the sim waits for the node; a step past its deadline is answered with `hold` at the
deadline, and until it ends every new image gets `safe/busy` at once (each such answer is an
env step: the robot holds while the policy is late, as it would in real time).

    python bench/ros_budget_sweep.py --budgets 10,20,30,45,100   # bench/results/ros-budget-sweep
    python bench/ros_budget_sweep.py                       # + 60 ms (the default budgets)
    python bench/ros_budget_sweep.py --budgets 30 --episodes 1 --families press --out /tmp/s
    python bench/ros_budget_sweep.py --report-only         # rebuild the summary and plot

Network rule: every ROS process runs with Fast DDS on shared memory and discovery on this host
(ros_nodes.launcher.ros_env).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ros_nodes.launcher import DEFAULT_PARAMS, node_command, ros_env  # noqa: E402

log = logging.getLogger("ros_budget_sweep")

FAMILIES = ("press", "push", "pick_place", "stack")
BUDGETS = (10.0, 20.0, 30.0, 45.0, 60.0, 100.0)  # ms: infeasible here (~15 ms steps) to generous
RESULTS = REPO / "bench" / "results"
QUALITY = {  # eval summaries ranking each shipped policy's levels by success
    "embedded-openvla": RESULTS / "embedded-sweep-press",
    "embedded-cogact": RESULTS / "embedded-cogact-press",
}
EPISODE_TIMEOUT_S = 120.0  # a bridge run is killed after this per episode (a hang, not a slow run)


# -- the node and its client --------------------------------------------------------------------


class NodeClient:
    """Reads the policy node's diagnostics and sets its parameters."""

    def __init__(self, domain_id: int):
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.executors import SingleThreadedExecutor

        self.rclpy = rclpy
        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=domain_id)
        self.node = rclpy.create_node("budget_sweep", context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.diag: dict[str, dict[str, str]] = {}
        self.node.create_subscription(DiagnosticArray, "diagnostics", self._on_diag, 10)

    def _on_diag(self, msg) -> None:
        from ros_nodes.diagnostics import diagnostic_values

        self.diag = diagnostic_values(msg)

    def control(self, key: str, default: str = "") -> str:
        return self.diag.get("control", {}).get(key, default)

    def spin_until(self, cond, timeout: float, what: str, alive=None) -> None:
        end = time.monotonic() + timeout
        while not cond():
            if alive is not None and not alive():
                raise RuntimeError(f"the policy node exited while waiting for {what}")
            if time.monotonic() > end:
                raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
            self.executor.spin_once(timeout_sec=0.05)

    def set_params(self, **values) -> None:
        from rcl_interfaces.srv import SetParameters
        from rclpy.parameter import Parameter

        cli = self.node.create_client(SetParameters, "/vla_policy/set_parameters")
        self.spin_until(cli.service_is_ready, 30, "the parameter service")
        req = SetParameters.Request(
            parameters=[Parameter(k, value=v).to_parameter_msg() for k, v in values.items()]
        )
        future = cli.call_async(req)
        self.spin_until(future.done, 30, "set_parameters")
        self.node.destroy_client(cli)
        for r in future.result().results:
            if not r.successful:
                raise RuntimeError(f"set_parameters {values}: {r.reason}")

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=1.0)
        self.node.destroy_node()
        self.rclpy.try_shutdown(context=self.context)


def params_file(path: Path, policy: dict[str, Any], bridge: dict[str, Any]) -> Path:
    data = yaml.safe_load(DEFAULT_PARAMS.read_text())
    data["vla_policy"]["ros__parameters"].update(policy)
    data["vla_sim_bridge"]["ros__parameters"].update(bridge)
    path.write_text(yaml.safe_dump(data))
    return path


def stop(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- records ------------------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a torn last line (a crash mid-write)
            continue
    return out


def episode_key(r: dict[str, Any]) -> tuple:
    return (r["policy"], float(r["budget_ms"]), r["task"], int(r["seed"]))


def join_episodes(
    record: Path, steps: list[dict[str, Any]], policy: str, budget: float, task: str
) -> list[dict[str, Any]]:
    """The bridge's episodes, each with the node's steps that answered its images."""
    lines = read_jsonl(record)
    by_stamp: dict[int, dict[str, Any]] = {}
    for s in steps:
        by_stamp.setdefault(s["stamp"], s)
    stamps: dict[int, set[int]] = {}
    for x in lines:
        if "step" in x and x.get("stamp"):
            stamps.setdefault(x["episode"], set()).add(x["stamp"])
    out = []
    for x in lines:
        if "episode_result" not in x:
            continue
        r = x["episode_result"]
        mine = [by_stamp[s] for s in sorted(stamps.get(r["episode"], ())) if s in by_stamp]
        lat = [s["latency_ms"] for s in mine]
        sources = r.get("sources", {})
        answers = sum(sources.values())
        misses = sum(bool(s["missed"]) for s in mine)
        out.append({
            "policy": policy, "budget_ms": budget, "task": task, "seed": r["seed"],
            "success": bool(r["success"]), "steps": r["steps"], "policy_steps": len(mine),
            "misses": misses, "miss_rate": misses / len(mine) if mine else math.nan,
            "answers": answers, "safe_answers": r["safe_actions"],
            "safe_rate": r["safe_actions"] / answers if answers else math.nan,
            "sources": sources, "levels": dict(Counter(s["level_name"] for s in mine)),
            "latency_p50_ms": float(np.median(lat)) if lat else None,
            "latency_p90_ms": float(np.percentile(lat, 90)) if lat else None,
            "resends": r["resends"],
        })
    return out


# -- the sweep ----------------------------------------------------------------------------------


def missing_blocks(done: set[int], seed: int, episodes: int) -> list[tuple[int, int]]:
    """Contiguous (first seed, count) runs of the seeds not done yet."""
    todo = [s for s in range(seed, seed + episodes) if s not in done]
    blocks: list[tuple[int, int]] = []
    for s in todo:
        if blocks and blocks[-1][0] + blocks[-1][1] == s:
            blocks[-1] = (blocks[-1][0], blocks[-1][1] + 1)
        else:
            blocks.append((s, 1))
    return blocks


def run_policy(args, policy: str, out: Path, done: set[tuple], env: dict) -> None:
    folder = out / policy
    folder.mkdir(parents=True, exist_ok=True)
    step_log = folder / "steps.jsonl"
    quality = args.quality.get(policy, QUALITY.get(policy))
    node_params = {
        "policy": policy, "accel": args.accel, "trigger": "image", "threads": 1,
        "budget_ms": args.budgets[0], "max_image_age_ms": 60_000.0,
        "diagnostics_period_s": 0.5, "step_log_path": str(step_log),
        "quality_summary": str(quality) if quality else "",
    }
    bridge = {"lockstep": True, "exit_when_done": True, "start_delay_s": 0.2,
              "lockstep_timeout_s": 10.0}
    params = params_file(folder / "params.yaml", node_params, bridge)
    node_log = open(folder / "node.log", "a")  # noqa: SIM115 - closed below
    node_log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} ---\n")
    node_log.flush()
    proc = subprocess.Popen(node_command("policy", params), env=env, stdout=node_log,
                            stderr=subprocess.STDOUT)
    client = NodeClient(int(env["ROS_DOMAIN_ID"]))
    try:
        t0 = time.monotonic()
        client.spin_until(lambda: client.control("state") == "active", 600,
                          f"{policy} to configure", alive=lambda: proc.poll() is None)
        log.info("%s configured in %.0f s (front in %s)", policy, time.monotonic() - t0,
                 folder / "node.log")
        writer = open(out / "episodes.jsonl", "a")  # noqa: SIM115 - closed below
        try:
            for budget in args.budgets:
                client.set_params(budget_ms=float(budget))
                client.spin_until(lambda b=budget: float(client.control("budget_ms", "0")) == b,
                                  30, f"budget {budget}")
                for task in args.families:
                    have = {k[3] for k in done if k[:3] == (policy, float(budget), task)}
                    for first, n in missing_blocks(have, args.seed, args.episodes):
                        t1 = time.monotonic()
                        record = folder / f"b{budget:g}_{task}_s{first}.jsonl"
                        record.unlink(missing_ok=True)  # an unfinished earlier try
                        cmd = node_command("bridge", params, [
                            f"task:={task}", f"seed:={first}", f"episodes:={n}",
                            f"record_path:={record}",
                        ])
                        with open(folder / "bridge.log", "a") as blog:
                            bridge_proc = subprocess.Popen(cmd, env=env, stdout=blog,
                                                           stderr=subprocess.STDOUT)
                            try:
                                bridge_proc.wait(timeout=EPISODE_TIMEOUT_S * n)
                            except subprocess.TimeoutExpired:
                                log.error("bridge %s budget %g seeds %d+%d timed out", task,
                                          budget, first, n)
                            finally:
                                stop(bridge_proc)
                        rows = join_episodes(record, read_jsonl(step_log), policy,
                                             float(budget), task)
                        if not args.keep_raw:
                            record.unlink(missing_ok=True)  # every executed action: MBs
                        for r in rows:
                            if episode_key(r) not in done:
                                writer.write(json.dumps(r) + "\n")
                                writer.flush()
                                done.add(episode_key(r))
                        ok = sum(r["success"] for r in rows)
                        miss = sum(r["misses"] for r in rows)
                        steps = sum(r["policy_steps"] for r in rows)
                        log.info("%s budget %g %s: %d/%d success, %d/%d steps missed (%.0f s)",
                                 policy, budget, task, ok, len(rows), miss, steps,
                                 time.monotonic() - t1)
        finally:
            writer.close()
    finally:
        client.close()
        stop(proc)
        node_log.close()
        pack(step_log)


def pack(step_log: Path) -> None:
    """The node's step log (one line per policy step) appended to steps.jsonl.gz."""
    import gzip

    if step_log.exists():
        with gzip.open(step_log.with_suffix(".jsonl.gz"), "ab") as z:
            z.write(step_log.read_bytes())
        step_log.unlink()


# -- summary and plot ---------------------------------------------------------------------------


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def front_of(node_log: Path) -> list[str]:
    """The last configure's front, as the node logged it."""
    if not node_log.exists():
        return []
    lines = node_log.read_text(errors="replace").splitlines()
    starts = [i for i, x in enumerate(lines) if "measured levels on the front" in x]
    if not starts:
        return []
    block = []
    for x in lines[starts[-1]:]:
        text = x.split("]: ", 1)[-1]
        if block and not text.startswith("  "):
            break
        if "off the front" not in text:
            block.append(text)
    return block


def summarize(out: Path) -> dict[str, Any]:
    rows = read_jsonl(out / "episodes.jsonl")
    cells: dict[tuple[str, float], list[dict]] = {}
    for r in rows:
        cells.setdefault((r["policy"], float(r["budget_ms"])), []).append(r)
    table = []
    for (policy, budget), rs in sorted(cells.items()):
        k, n = sum(r["success"] for r in rs), len(rs)
        steps = sum(r["policy_steps"] for r in rs)
        answers = sum(r["answers"] for r in rs)
        levels = Counter()
        for r in rs:
            levels.update(r["levels"])
        lat = [r["latency_p50_ms"] for r in rs if r["latency_p50_ms"] is not None]
        table.append({
            "policy": policy, "budget_ms": budget, "episodes": n, "successes": k,
            "success_rate": k / n, "ci95": wilson(k, n),
            "tasks": {t: [sum(r["success"] for r in rs if r["task"] == t),
                          sum(r["task"] == t for r in rs)]
                      for t in dict.fromkeys(r["task"] for r in rs)},
            "policy_steps": steps, "misses": sum(r["misses"] for r in rs),
            "miss_rate": sum(r["misses"] for r in rs) / steps if steps else math.nan,
            "safe_rate": sum(r["safe_answers"] for r in rs) / answers if answers else math.nan,
            "levels": dict(levels.most_common()),
            "median_episode_p50_ms": float(np.median(lat)) if lat else None,
        })
    policies = sorted({r["policy"] for r in rows})
    fronts = {p: front_of(out / p / "node.log") for p in policies}
    summary = {"cells": table, "fronts": fronts}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(markdown(summary))
    if table:
        plot(summary, out / "summary.png")
    return summary


def markdown(summary: dict[str, Any]) -> str:
    lines = ["# Latency budget sweep over ROS (embedded suite, lock-step bridge)", "",
             "| policy | budget ms | success | 95% CI | per family | miss rate | safe answers "
             "| step p50 ms | levels (share of steps) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in summary["cells"]:
        lo, hi = c["ci95"]
        fams = ", ".join(f"{t} {k}/{n}" for t, (k, n) in c["tasks"].items())
        steps = max(c["policy_steps"], 1)
        levels = ", ".join(f"{name} {100 * v / steps:.0f}%"
                           for name, v in list(c["levels"].items())[:3])
        p50 = c["median_episode_p50_ms"]
        lines.append(
            f"| {c['policy']} | {c['budget_ms']:g} | {c['successes']}/{c['episodes']} "
            f"| [{lo:.2f}, {hi:.2f}] | {fams} | {100 * c['miss_rate']:.1f}% "
            f"| {100 * c['safe_rate']:.1f}% | {'-' if p50 is None else f'{p50:.1f}'} "
            f"| {levels} |"
        )
    lines += ["", "miss rate: policy steps over the budget (answered with the safe action) / "
              "policy steps; safe answers: safe actions / all executed answers (misses, and "
              "`busy` while a late step finishes).", ""]
    for policy, front in summary["fronts"].items():
        lines += [f"## {policy}: measured front at configure", "", "```", *front, "```", ""]
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    ok, miss = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for policy in dict.fromkeys(c["policy"] for c in summary["cells"]):
        cs = [c for c in summary["cells"] if c["policy"] == policy]
        x = [c["budget_ms"] for c in cs]
        y = [c["success_rate"] for c in cs]
        err = [[c["success_rate"] - c["ci95"][0] for c in cs],
               [c["ci95"][1] - c["success_rate"] for c in cs]]
        ok.errorbar(x, y, yerr=err, marker="o", capsize=3, label=policy)
        miss.plot(x, [c["miss_rate"] for c in cs], marker="o", label=f"{policy}: steps missed")
        miss.plot(x, [c["safe_rate"] for c in cs], marker="x", linestyle="--",
                  label=f"{policy}: safe answers")
    ok.set(xlabel="budget (ms)", ylabel="success rate (Wilson 95%)", ylim=(0, 1),
           title="success under the budget")
    miss.set(xlabel="budget (ms)", ylabel="rate", ylim=(0, 1.05), title="deadline misses")
    for ax in (ok, miss):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--policies", default="embedded-openvla,embedded-cogact")
    p.add_argument("--budgets", default=",".join(f"{b:g}" for b in BUDGETS),
                   help="ms, comma-separated (default %(default)s)")
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--episodes", type=int, default=10, help="per family and budget")
    p.add_argument("--seed", type=int, default=0, help="first eval seed")
    p.add_argument("--accel", default="vla-pruner@1.0", help="the node's accel run spec")
    p.add_argument("--quality", action="append", default=[], metavar="POLICY=PATH",
                   help="eval summary ranking a policy's levels (default: the committed ones)")
    p.add_argument("--out", default=str(RESULTS / "ros-budget-sweep"))
    p.add_argument("--domain-id", type=int, default=None)
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--keep-raw", action="store_true",
                   help="keep the bridge's per-action records (OUT/<policy>/b*_*.jsonl)")
    args = p.parse_args(argv)
    args.policies = [x.strip() for x in args.policies.split(",") if x.strip()]
    args.budgets = [float(x) for x in args.budgets.split(",") if x.strip()]
    args.families = [x.strip() for x in args.families.split(",") if x.strip()]
    args.quality = dict(q.split("=", 1) for q in args.quality)
    return args


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        domain = args.domain_id if args.domain_id is not None else 1 + os.getpid() % 100
        env = ros_env(domain)  # SHM transport, localhost discovery
        env["ROS_DOMAIN_ID"] = str(domain)
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        done = {episode_key(r) for r in read_jsonl(out / "episodes.jsonl")}
        (out / "command.txt").write_text("python bench/ros_budget_sweep.py "
                                         + " ".join(sys.argv[1:] if argv is None else argv) + "\n")
        t0 = time.monotonic()
        for policy in args.policies:
            run_policy(args, policy, out, done, env)
        log.info("sweep done in %.1f min", (time.monotonic() - t0) / 60)
    summary = summarize(out)
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""ROS overhead per control step, and the latency controller under an injected slowdown.

Both parts run the policy node as its own process (``trigger: image``) with this script as the
camera, in lock-step: publish an image, wait for the action echoing its stamp, publish the next.

1. Overhead: ``image published -> action received`` minus the policy's own step time (the
   node's step log: StepResult timings "total"), per step; median and p99. No deadline.
2. Budget: a budget of ``--budget-ms`` (default 2.5 x the measured median step); after
   ``--calm`` steps a per-token slowdown (``inject_delay_ms``, default 2 x budget at all visual
   tokens) is switched on at run time for ``--load`` steps, then off again. Per step: budget,
   latency, kept visual tokens, deadline misses -> ``bench/results/ros_budget_<policy>.png``.

Results (with the exact command) go to ``bench/results/ros_overhead_<policy>.json`` and
``ros_budget_<policy>.json``. Network rule: Fast DDS on shared memory, discovery on this host.

    python bench/ros_overhead.py --policy tiny-openvla --steps 300
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ros_nodes.launcher import DEFAULT_PARAMS, node_command, ros_env  # noqa: E402

RESULTS = REPO / "bench" / "results"
RESENDS = 2
log = logging.getLogger("ros_overhead")


class Camera:
    """The node's counterpart: lock-step images, actions, diagnostics, parameter changes."""

    def __init__(self, domain_id: int, size: int):
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.executors import SingleThreadedExecutor
        from sensor_msgs.msg import Image, JointState
        from std_msgs.msg import String

        from ros_nodes.params import qos

        self.rclpy = rclpy
        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=domain_id)
        self.node = rclpy.create_node("bench_camera", context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.image_pub = self.node.create_publisher(Image, "camera/image", qos(5, "reliable"))
        self.resends = 0
        self.text_pub = self.node.create_publisher(String, "instruction", qos(1, "reliable", True))
        self.node.create_subscription(
            JointState, "action_stamped", self._on_action, qos(100, "reliable")
        )
        self.node.create_subscription(DiagnosticArray, "diagnostics", self._on_diag, 10)
        self.answers: dict[int, tuple[float, str]] = {}
        self.state = ""
        self.image = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)

    def _on_action(self, msg) -> None:
        from ros_nodes.actions import stamp_ns

        stamp = stamp_ns(msg.header.stamp)
        self.answers.setdefault(stamp, (time.perf_counter(), msg.header.frame_id))

    def _on_diag(self, msg) -> None:
        from ros_nodes.diagnostics import diagnostic_values

        self.state = diagnostic_values(msg).get("control", {}).get("state", "")

    def instruct(self, text: str) -> None:
        from std_msgs.msg import String

        self.text_pub.publish(String(data=text))
        time.sleep(0.3)

    def spin_until(self, cond, timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > end:
                raise TimeoutError(f"timed out waiting for {what}")
            self.executor.spin_once(timeout_sec=0.01)

    def step(self, timeout: float = 5.0) -> tuple[int, float, float, str]:
        """One lock-step image -> (stamp, sent, received, source); source ends in "+resent"
        when the image had to be sent again (that step's timing is then not meaningful)."""
        from sensor_msgs.msg import Image

        from ros_nodes.actions import stamp_ns

        h, w = self.image.shape[:2]
        msg = Image(height=h, width=w, encoding="rgb8", step=w * 3)
        msg.data = self.image.tobytes()
        msg.header.stamp = self.node.get_clock().now().to_msg()
        stamp = stamp_ns(msg.header.stamp)
        sent = time.perf_counter()
        self.image_pub.publish(msg)
        resent = False
        for _ in range(RESENDS):  # a lost image or answer: send the same frame again
            try:
                self.spin_until(lambda: stamp in self.answers, timeout, "an answer")
                break
            except TimeoutError:
                self.resends += 1
                resent = True
                self.image_pub.publish(msg)
        self.spin_until(lambda: stamp in self.answers, timeout, "an answer")
        received, source = self.answers[stamp]
        if resent:
            log.warning("step %s needed a resent image", stamp)
        return stamp, sent, received, source + ("+resent" if resent else "")

    def set_params(self, **values) -> None:
        from rcl_interfaces.srv import SetParameters
        from rclpy.parameter import Parameter

        cli = self.node.create_client(SetParameters, "/vla_policy/set_parameters")
        self.spin_until(cli.service_is_ready, 10, "the parameter service")
        req = SetParameters.Request(
            parameters=[Parameter(k, value=v).to_parameter_msg() for k, v in values.items()]
        )
        future = cli.call_async(req)
        self.spin_until(future.done, 10, "set_parameters")
        for r in future.result().results:
            if not r.successful:
                raise RuntimeError(r.reason)

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=1.0)
        self.node.destroy_node()
        self.rclpy.try_shutdown(context=self.context)


def read_log(path: Path) -> dict[int, dict]:
    out = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        out.setdefault(rec["stamp"], rec)
    return out


def pct(x, q) -> float:
    return round(float(np.percentile(np.asarray(x, dtype=float), q)), 3)


def start_node(args, tmp: Path, env: dict, **params) -> tuple:
    import subprocess

    data = yaml.safe_load(DEFAULT_PARAMS.read_text())
    data["vla_policy"]["ros__parameters"].update(dict(
        policy=args.policy, trigger="image", threads=1, warmup_steps=3, max_image_age_ms=10_000.0,
        diagnostics_period_s=0.5, **params,
    ))
    path = tmp / f"params_{len(list(tmp.iterdir()))}.yaml"
    path.write_text(yaml.safe_dump(data))
    log = open(tmp / f"{path.stem}.log", "w")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(node_command("policy", path), env=env, stdout=log, stderr=log)
    return proc, log


def stop(proc, log, failed: bool = False) -> None:
    import signal

    if failed and proc.poll() is None:  # the node's thread stacks into its log
        proc.send_signal(signal.SIGUSR1)
        time.sleep(1.0)
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=15)
    except Exception:  # noqa: BLE001
        proc.kill()
    log.close()


@contextmanager
def running_node(args, tmp: Path, env: dict, **params):
    """The policy node for the duration of a block; on a timeout its thread stacks go to the
    log before it is stopped."""
    proc, log = start_node(args, tmp, env, **params)
    failed = False
    try:
        yield proc
    except TimeoutError:
        failed = True
        raise
    finally:
        stop(proc, log, failed=failed)


def overhead(args, cam: Camera, tmp: Path, env: dict) -> dict:
    step_log = tmp / "overhead_steps.jsonl"
    with running_node(args, tmp, env, budget_ms=0.0, step_log_path=str(step_log)):
        cam.spin_until(lambda: cam.state == "active" and cam.image_pub.get_subscription_count(),
                       120, "the policy node")
        cam.instruct(args.instruction)
        runs = [cam.step() for _ in range(args.warmup + args.steps)][args.warmup:]
        time.sleep(0.2)
    steps = read_log(step_log)
    e2e, policy, node = [], [], []
    for stamp, sent, received, source in runs:
        if source != "policy":  # a resent image: its round trip includes the timeout
            continue
        rec = steps[stamp]
        e2e.append((received - sent) * 1e3)
        policy.append(rec["policy_ms"])
        node.append(rec["latency_ms"])
    e2e, policy, node = map(np.asarray, (e2e, policy, node))
    over = e2e - policy
    return {
        "steps": len(e2e),
        "resends": cam.resends,  # steps with a resent image are left out
        "image": list(cam.image.shape),
        "overhead_ms": {"median": pct(over, 50), "p90": pct(over, 90), "p99": pct(over, 99)},
        "end_to_end_ms": {"median": pct(e2e, 50), "p99": pct(e2e, 99)},
        "policy_step_ms": {"median": pct(policy, 50), "p99": pct(policy, 99)},
        # inside the node: worker hand-off; outside: DDS both ways, decode, publish
        "node_internal_ms": {"median": pct(node - policy, 50), "p99": pct(node - policy, 99)},
        "transport_and_decode_ms": {"median": pct(e2e - node, 50), "p99": pct(e2e - node, 99)},
    }


def budget_run(args, cam: Camera, tmp: Path, env: dict, step_ms: float) -> dict:
    budget = args.budget_ms or round(2.5 * step_ms, 1)
    inject = args.inject_ms or 2.0 * budget
    step_log = tmp / "budget_steps.jsonl"
    answers = []
    with running_node(
        args, tmp, env, budget_ms=budget, relax_after_steps=args.relax_after,
        inject_delay_mode="per_token", step_log_path=str(step_log),
    ):
        cam.answers.clear()
        cam.spin_until(lambda: cam.state == "active" and cam.image_pub.get_subscription_count(),
                       120, "the policy node")
        cam.instruct(args.instruction)
        for i in range(args.calm + args.load + args.recover):
            if i == args.calm:
                cam.set_params(inject_delay_ms=inject)
            if i == args.calm + args.load:
                cam.set_params(inject_delay_ms=0.0)
            stamp, sent, received, source = cam.step()
            answers.append({"i": i, "stamp": stamp, "source": source,
                            "answer_ms": round((received - sent) * 1e3, 3)})
            if source != "policy":
                # A miss: the late step still runs. A camera frame now would only be answered
                # "busy"; wait until the step is surely done, so each row here is one step.
                time.sleep((budget + inject) / 1e3)
        time.sleep(2 * budget / 1e3 + inject / 1e3)
    steps = read_log(step_log)
    for a in answers:
        rec = steps.get(a["stamp"], {})
        a.update({k: rec.get(k) for k in ("latency_ms", "policy_ms", "kept", "missed")})

    def phase(a: dict) -> str:
        return ("calm" if a["i"] < args.calm
                else "load" if a["i"] < args.calm + args.load else "recover")

    summary = {}
    for name in ("calm", "load", "recover"):
        part = [a for a in answers if phase(a) == name]
        lat = [a["latency_ms"] for a in part if a["latency_ms"] is not None]
        summary[name] = {
            "steps": len(part),
            "misses": sum(a["source"] == "safe/deadline_miss" for a in part),
            "safe_answers": sum(a["source"] != "policy" for a in part),
            "latency_p50_ms": pct(lat, 50) if lat else None,
            "kept_last": part[-1]["kept"] if part else None,
            "kept_min": min((a["kept"] for a in part if a["kept"]), default=None),
        }
        if name == "load":
            fit = next((a["i"] - args.calm for a in part if a["source"] == "policy"), None)
            summary[name]["steps_until_first_fit"] = fit
            summary[name]["misses_after_first_fit"] = sum(
                a["source"] == "safe/deadline_miss" for a in part
                if fit is not None and a["i"] - args.calm > fit
            )
    return {"budget_ms": budget, "inject_delay_ms_at_all_tokens": inject,
            "target_ms": 0.85 * budget, "phases": [args.calm, args.load, args.recover],
            "summary": summary, "steps": answers}


def plot(run: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = run["steps"]
    x = [a["i"] for a in steps]
    lat = [a["latency_ms"] if a["latency_ms"] is not None else np.nan for a in steps]
    kept = [a["kept"] if a["kept"] is not None else np.nan for a in steps]
    miss = [a["i"] for a in steps if a["source"] == "safe/deadline_miss"]
    calm, load, _ = run["phases"]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for ax in (ax1, ax2):
        ax.axvspan(calm - 0.5, calm + load - 0.5, color="tab:red", alpha=0.08,
                   label="injected slowdown")
    ax1.plot(x, lat, ".-", lw=1, label="step latency")
    ax1.axhline(run["budget_ms"], color="k", ls="--", lw=1, label="budget")
    ax1.axhline(run["target_ms"], color="gray", ls=":", lw=1, label="target (0.85 budget)")
    if miss:
        ax1.plot(miss, [run["budget_ms"]] * len(miss), "rx", label="deadline miss (safe action)")
    ax1.set_ylabel("ms")
    ax1.legend(fontsize=8, loc="upper right")
    ax1.set_title(title, fontsize=10)
    ax2.step(x, kept, where="post", color="tab:green")
    ax2.set_ylabel("kept visual tokens")
    ax2.set_xlabel("control step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument("--policy", default="tiny-openvla")
    ap.add_argument("--instruction", default="press the green button")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=300, help="measured overhead steps")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--budget-ms", type=float, default=0.0, help="0: 2.5 x median step")
    ap.add_argument("--inject-ms", type=float, default=0.0, help="0: 2 x budget")
    ap.add_argument("--calm", type=int, default=20)
    ap.add_argument("--load", type=int, default=60)
    ap.add_argument("--recover", type=int, default=60)
    ap.add_argument("--relax-after", type=int, default=15)
    ap.add_argument("--domain-id", type=int, default=None)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    domain = args.domain_id if args.domain_id is not None else 1 + os.getpid() % 100
    tmp = Path(tempfile.mkdtemp(prefix="ros_overhead_"))
    env = ros_env(domain, ros_home=tmp / "ros_home")
    os.environ.update({k: env[k] for k in ("FASTDDS_BUILTIN_TRANSPORTS",
                                           "ROS_AUTOMATIC_DISCOVERY_RANGE", "ROS_HOME")})
    cam = Camera(domain, args.image_size)
    try:
        over = overhead(args, cam, tmp, env)
        o = over["overhead_ms"]
        print(f"ROS overhead per step ({over['steps']} steps, {args.image_size}px rgb8): "
              f"median {o['median']:.2f} ms, p99 {o['p99']:.2f} ms "
              f"(policy step median {over['policy_step_ms']['median']:.1f} ms)")
        run = budget_run(args, cam, tmp, env, over["policy_step_ms"]["median"])
    finally:
        cam.close()
    for name, s in run["summary"].items():
        print(f"{name:8s} {s}")
    from vla_prune.profiling import machine_info

    common = {"command": "python " + " ".join(sys.argv), "policy": args.policy,
              "machine": machine_info("cpu"), "load_average": os.getloadavg()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = Path(args.policy).name
    (out / f"ros_overhead_{tag}.json").write_text(json.dumps({**common, **over}, indent=2))
    (out / f"ros_budget_{tag}.json").write_text(json.dumps({**common, **run}, indent=2))
    plot(run, out / f"ros_budget_{tag}.png",
         f"{args.policy}: budget {run['budget_ms']:.0f} ms, per-token slowdown "
         f"{run['inject_delay_ms_at_all_tokens']:.0f} ms at all tokens in the shaded steps")
    print(f"wrote {out}/ros_overhead_{tag}.json, ros_budget_{tag}.json, ros_budget_{tag}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Start the policy node and the sim bridge as separate processes from one parameter file.

The stand-in for ``ros2 launch`` (launch / launch_ros are not on PyPI): each node runs as
``python -m ros_nodes.<node> --ros-args --params-file FILE``. SIGINT / SIGTERM are passed on to
both; a node that does not exit within the grace period is killed. When the bridge finishes its
episodes (``exit_when_done``) the policy node is stopped too.

Network rule: unless `allow_network` is set, the children run with Fast DDS on shared memory
and discovery limited to this host (no multicast leaves the machine).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

NODES = {"policy": "ros_nodes.policy_node", "bridge": "ros_nodes.sim_bridge"}
REPO = Path(__file__).resolve().parents[1]
DEFAULT_PARAMS = REPO / "configs" / "ros" / "policy_node.yaml"
LOCAL_ONLY = {"FASTDDS_BUILTIN_TRANSPORTS": "SHM", "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST"}


def ros_env(
    domain_id: int | None = None,
    ros_home: str | Path | None = None,
    allow_network: bool = False,
    base: dict[str, str] | None = None,
) -> dict[str, str]:
    """Environment for a ROS child process of this interpreter.

    Keeps the venv's ROS bootstrap variables (the child is the same environment); RMW stays
    the default (Fast DDS). `allow_network` leaves discovery to the caller (a real robot).
    """
    env = dict(os.environ if base is None else base)
    if not allow_network:
        env.update(LOCAL_ONLY)
    if domain_id is not None:
        env["ROS_DOMAIN_ID"] = str(domain_id)
    if ros_home is not None:
        env["ROS_HOME"] = str(ros_home)
    env.setdefault("MUJOCO_GL", "egl")
    env.setdefault("OMP_NUM_THREADS", "1")
    pythonpath = env.get("PYTHONPATH", "")
    if str(REPO) not in pythonpath.split(os.pathsep):  # works from a source checkout too
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), pythonpath) if p)
    return env


def node_command(
    node: str, params: str | Path, overrides: Sequence[str] = (), log_level: str | None = None
) -> list[str]:
    """`python -m ros_nodes.<node> --ros-args --params-file FILE [-p name:=value ...]`."""
    if node not in NODES:
        raise ValueError(f"unknown node {node!r}; choose from {sorted(NODES)}")
    cmd = [sys.executable, "-m", NODES[node], "--ros-args", "--params-file", str(params)]
    for item in overrides:
        cmd += ["-p", item]
    if log_level:
        cmd += ["--log-level", log_level]
    return cmd


def _split_overrides(items: Sequence[str]) -> dict[str, list[str]]:
    """"policy.budget_ms:=80.0" -> {"policy": ["budget_ms:=80.0"]}; no prefix: both nodes."""
    out: dict[str, list[str]] = {n: [] for n in NODES}
    for item in items:
        if ":=" not in item:
            raise ValueError(f"override {item!r} must look like [policy.|bridge.]name:=value")
        head, value = item.split(":=", 1)
        node, _, name = head.rpartition(".")
        if node and node not in NODES:
            raise ValueError(f"override {item!r}: unknown node {node!r}")
        for n in [node] if node else list(NODES):
            out[n].append(f"{name}:={value}")
    return out


def launch(
    params: str | Path = DEFAULT_PARAMS,
    nodes: Sequence[str] = ("policy", "bridge"),
    overrides: Sequence[str] = (),
    domain_id: int | None = None,
    allow_network: bool = False,
    grace_s: float = 10.0,
    log_level: str | None = None,
) -> int:
    """Run the nodes until the bridge is done, one of them fails, or a signal arrives.

    Returns 0 when every node exited cleanly, else the first non-zero exit code.
    """
    unknown = [n for n in nodes if n not in NODES]
    if unknown or not nodes:
        raise ValueError(f"unknown nodes {unknown}; choose from {sorted(NODES)}")
    params = Path(params)
    if not params.is_file():
        raise ValueError(f"parameter file {params} not found")
    per_node = _split_overrides(overrides)
    env = ros_env(domain_id, allow_network=allow_network)
    procs: dict[str, subprocess.Popen] = {}
    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signum

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for name in nodes:
            cmd = node_command(name, params, per_node[name], log_level)
            log.info("starting %s: %s", name, " ".join(cmd))
            procs[name] = subprocess.Popen(cmd, env=env)
        code = _supervise(procs, stop)
    finally:
        _stop_all(procs, grace_s)
        for s, handler in old.items():
            signal.signal(s, handler)
    codes = [p.returncode for p in procs.values()]
    return code if code else next((c for c in codes if c not in (0, None)), 0)


def _supervise(procs: dict[str, subprocess.Popen], stop: dict) -> int:
    while stop["signal"] is None:
        for name, proc in procs.items():
            code = proc.poll()
            if code is None:
                continue
            if code != 0:
                log.error("%s exited with code %s; stopping the others", name, code)
                return code
            if name == "bridge" or len(procs) == 1:
                log.info("%s finished", name)
                return 0
            log.warning("%s exited; stopping the others", name)
            return 0
        time.sleep(0.1)
    log.info("signal %s: stopping %s", stop["signal"], ", ".join(procs))
    return 0


def _stop_all(procs: dict[str, subprocess.Popen], grace_s: float) -> None:
    """SIGINT each running child (rclpy shuts down cleanly on it), then SIGKILL stragglers."""
    for proc in procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + grace_s
    for name, proc in procs.items():
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0f s: killing it", name, grace_s)
            proc.kill()
            proc.wait()


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m ros_nodes.launcher", description=__doc__)
    add_arguments(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_args(args)


def add_arguments(p) -> None:
    """The launcher's flags (shared with `vla-prune ros-node`)."""
    p.add_argument("--params", default=str(DEFAULT_PARAMS), help="ROS parameter YAML")
    p.add_argument(
        "--nodes", default="policy,bridge", help="comma-separated: policy, bridge (default both)"
    )
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="[NODE.]NAME:=VALUE",
        help="parameter override, e.g. policy.budget_ms:=80.0 (repeatable)",
    )
    p.add_argument("--domain-id", type=int, default=None, help="ROS_DOMAIN_ID for both nodes")
    p.add_argument(
        "--allow-network", action="store_true",
        help="do not restrict DDS to shared memory on this host (real robots only)",
    )
    p.add_argument("--log-level", default=None, help="ROS log level: debug, info, warn, error")


def run_args(args) -> int:
    nodes = [n.strip() for n in args.nodes.split(",") if n.strip()]
    return launch(
        args.params, nodes, args.overrides, args.domain_id, args.allow_network,
        log_level=args.log_level,
    )


if __name__ == "__main__":
    sys.exit(main())

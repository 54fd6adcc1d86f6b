"""Bad parameter files stop the node at start-up with a clear one-line error."""

from __future__ import annotations

import sys

import pytest

pytest.importorskip("rclpy", reason="needs the ros extra: pip install -e '.[ros]'")

from ros_helpers import PARAMS, Proc  # noqa: E402

pytestmark = pytest.mark.ros

CASES = {
    "type": (["budget_ms:=fast"], 2, "parameter budget_ms='fast': expected float, got str"),
    "value": (
        ["budget_ms:=-1.0", "accel:=nope@0.5"],
        1,
        "parameter budget_ms=-1.0: must be a finite number >= 0",
    ),
}


def test_bad_parameters_fail_with_clear_errors(ros_env, tmp_path):
    procs = {}
    for name, (overrides, _, _) in CASES.items():  # concurrently: start-up dominates
        cmd = [
            sys.executable,
            "-m",
            "ros_nodes.policy_node",
            "--ros-args",
            "--params-file",
            str(PARAMS),
        ]
        for o in overrides:
            cmd += ["-p", o]
        procs[name] = Proc(cmd, ros_env.env, tmp_path / f"{name}.log")
    for name, (_, code, message) in CASES.items():
        assert procs[name].wait(timeout=60) == code, procs[name].tail()
        log = procs[name].tail()
        assert message in log
        if name == "value":
            assert "unknown pruning method 'nope'" in log
        procs[name].stop()

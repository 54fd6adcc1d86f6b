"""ROS test fixtures: the network rule, node processes, a client node in the test process.

Network rule (mandatory on these machines): every ROS process runs with Fast DDS on shared
memory (FASTDDS_BUILTIN_TRANSPORTS=SHM) and discovery limited to this host
(ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST); each test gets its own ROS_DOMAIN_ID and ROS_HOME.
Helpers live in ros_helpers.py (a unique module name: tests/ has several conftest.py).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from ros_helpers import (
    NETWORK_RULE,
    REPO,
    Client,
    Proc,
    RosEnv,
    micro_policy,
    next_domain_id,
    save_policy,
    scrambled_tiny_policy,
)

os.environ.setdefault("MUJOCO_GL", "egl")


@pytest.fixture
def ros_env(tmp_path, monkeypatch) -> RosEnv:
    """The network rule for this test process and every child it starts."""
    home = tmp_path / "ros_home"
    home.mkdir()
    domain = next_domain_id()
    for k, v in {**NETWORK_RULE, "ROS_DOMAIN_ID": str(domain), "ROS_HOME": str(home)}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("RMW_IMPLEMENTATION", raising=False)
    env = dict(os.environ, OMP_NUM_THREADS="1", MUJOCO_GL="egl", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return RosEnv(domain, home, env)


@pytest.fixture
def start_node(ros_env, tmp_path):
    """start_node("policy", params_path, **overrides) -> Proc; stopped after the test."""
    procs: list[Proc] = []

    def start(node: str, params: Path, **overrides) -> Proc:
        module = {"policy": "ros_nodes.policy_node", "bridge": "ros_nodes.sim_bridge"}[node]
        cmd = [sys.executable, "-m", module, "--ros-args", "--params-file", str(params)]
        for k, v in overrides.items():
            cmd += ["-p", f"{k}:={v}"]
        proc = Proc(cmd, ros_env.env, tmp_path / f"{node}.log")
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        code = proc.stop()
        if code not in (0, None):
            print(f"--- {proc.log.name} (exit {code}) ---\n{proc.tail()}")


@pytest.fixture
def client(ros_env):
    c = Client(ros_env.domain_id)
    yield c
    c.close()


@pytest.fixture(scope="session")
def micro_checkpoint(tmp_path_factory) -> Path:
    return save_policy(micro_policy(), tmp_path_factory.mktemp("micro") / "micro-openvla")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return save_policy(scrambled_tiny_policy(0), tmp_path_factory.mktemp("tiny") / "tiny")

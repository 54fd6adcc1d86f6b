"""A closed-loop episode over ROS (launcher: policy node + lock-step sim bridge) equals the
in-process eval (`sim.eval.runner.run_episode`) for the same seed and policy."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("rclpy", reason="needs the ros extra: pip install -e '.[ros]'")
pytest.importorskip("mujoco", reason="needs the sim extra: pip install -e '.[sim]'")

from ros_helpers import Proc, launcher_cmd, write_params  # noqa: E402

pytestmark = [pytest.mark.ros, pytest.mark.sim]

TASK, SEED = "press", 3


class Recording:
    """A policy that remembers every action it returned (run_episode sees a normal policy)."""

    def __init__(self, policy):
        self.policy, self.actions = policy, []

    def reset(self):
        self.policy.reset()

    def step(self, image, instruction):
        result = self.policy.step(image, instruction)
        self.actions.extend(np.asarray(result.actions, dtype=np.float64))
        return result


def in_process(checkpoint) -> tuple[dict, list[np.ndarray]]:
    import torch

    import vla_prune
    from sim.envs import make_env
    from sim.eval.runner import run_episode

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the node (threads: 1)
    env = make_env("embedded", TASK)
    try:
        policy = vla_prune.policy_from(str(checkpoint))
        # What the node runs at level 0 with accel vla-pruner@0.5: VLA-Pruner keeping 128.
        policy.configure(prune=vla_prune.PruneConfig(method="vla-pruner", keep_count=128))
        rec = Recording(policy)
        ep = run_episode(env, rec, SEED, env.max_episode_steps)
    finally:
        env.close()
        torch.set_num_threads(threads)
    return ep, rec.actions



def run_launcher(params, record, ros_env, tmp_path) -> list[dict]:
    """Node + bridge to completion through the launcher; the bridge's record lines."""
    launcher = Proc(launcher_cmd(params, ros_env.domain_id), ros_env.env, tmp_path / "l.log")
    try:
        code = launcher.wait(timeout=150)
    finally:
        launcher.stop()
    assert code == 0, launcher.tail()
    return [json.loads(x) for x in record.read_text().splitlines()]

def test_lockstep_episode_matches_in_process(ros_env, tiny_checkpoint, tmp_path):
    record = tmp_path / "bridge.jsonl"
    params = write_params(
        tmp_path / "params.yaml",
        policy=dict(
            policy=str(tiny_checkpoint),
            accel="vla-pruner@0.5",
            budget_ms=0.0,  # no deadline: every step is the policy's own action
            trigger="image",  # a step per new image (the timer path runs in the other tests)
            max_image_age_ms=60_000.0,
            warmup_steps=1,
        ),
        # A generous re-send timeout: a re-sent image could be acted on twice, which would rightly
        # break the action-for-action comparison; slow loopback DDS must not trigger it.
        bridge=dict(
            task=TASK,
            seed=SEED,
            episodes=1,
            lockstep=True,
            record_path=str(record),
            lockstep_timeout_s=120.0,
        ),
    )
    lines = run_launcher(params, record, ros_env, tmp_path)
    steps = [x for x in lines if "step" in x]
    (result,) = [x["episode_result"] for x in lines if "episode_result" in x]
    assert result["resends"] == 0 and result["safe_actions"] == 0, result
    assert all(x["source"] == "policy" for x in steps)

    ep, actions = in_process(tiny_checkpoint)
    assert result["success"] == ep["success"]
    assert result["steps"] == ep["steps"] == len(steps)
    assert result["instruction"] == ep["instruction"]
    ros_actions = np.array([x["action"] for x in steps])
    np.testing.assert_array_equal(ros_actions, np.array(actions[: len(steps)]))
    assert len(np.unique(ros_actions, axis=0)) > 1  # the scrambled policy reacts to the scene


def test_bridge_counts_each_episode_on_its_own(ros_env, micro_checkpoint, tmp_path):
    """Two episodes under a budget no level meets: every executed action is a safe one, and
    each episode's record counts its own (the counters restart with the episode)."""
    record = tmp_path / "bridge.jsonl"
    params = write_params(
        tmp_path / "params.yaml",
        policy=dict(
            policy=str(micro_checkpoint), min_keep_fraction=1.0, warmup_steps=1,
            level_timing_steps=1, budget_ms=50.0, inject_delay_ms=200.0,
            inject_delay_mode="fixed", trigger="image", max_image_age_ms=60_000.0,
        ),
        bridge=dict(task="press", seed=SEED, episodes=2, max_steps=6, record_path=str(record),
                    lockstep=True, start_delay_s=0.2),
    )
    lines = run_launcher(params, record, ros_env, tmp_path)
    results = [x["episode_result"] for x in lines if "episode_result" in x]
    assert [r["episode"] for r in results] == [0, 1]
    for r in results:
        assert r["steps"] == 6 and r["safe_actions"] == 6 and r["late_actions"] == 0, r
        assert sum(r["sources"].values()) == 6 and "policy" not in r["sources"], r
        assert r["sources"].get("safe/deadline_miss", 0) >= 1, r

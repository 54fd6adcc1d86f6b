"""A simulated robot over ROS: wraps ``make_env(suite, task)`` behind the policy node's topics.

Publishes the camera image (``sensor_msgs/Image`` rgb8, stamped), the instruction
(``std_msgs/String``, latched) and a reset (``std_msgs/Empty``) at each episode start; subscribes
the policy's ``action_stamped`` (``sensor_msgs/JointState``, see ros_nodes/actions.py) and steps
the env with every row of the action chunk, as ``sim.eval.runner.run_episode`` does. Episode
results go out as ``diagnostic_msgs/DiagnosticStatus`` on ``episode_status`` (and to a JSONL
file with ``record_path``), with this episode's counters: resends, ignored / safe / late
actions, held steps, and the executed answers by source (``policy``, ``safe/deadline_miss``,
...).

Lock-step mode (default, for exact comparison with the in-process eval): the env steps only on
the action whose header stamp answers the latest image, so the sim waits for the policy however
slow it is. Free-running mode (``lockstep: false``) steps at ``rate_hz`` with the latest action,
or a hold action when none arrived — a real robot's clock.

Run: ``python -m ros_nodes.sim_bridge --ros-args --params-file configs/ros/policy_node.yaml``.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticStatus, KeyValue
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import Empty, String

from ros_nodes.actions import LATE_SOURCE, SAFE_PREFIX, parse_action_stamped, stamp_ns
from ros_nodes.params import BridgeParams, check_bridge_param, declare, qos

os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering; before mujoco is imported

NODE_NAME = "vla_sim_bridge"
POLL_HZ = 50.0
ACTION_DEPTH = 10


class SimBridge(Node):
    def __init__(self, name: str = NODE_NAME, **kw):
        super().__init__(name, **kw)
        self.p = p = declare(self, BridgeParams)
        errors = [e for k, v in vars(p).items() if (e := check_bridge_param(k, v))]
        if errors:
            raise ValueError("; ".join(errors))
        from sim.envs import make_env

        env_kw = {}
        if p.image_size:
            env_kw["image_size"] = p.image_size
        if p.max_steps:
            env_kw["max_steps"] = p.max_steps
        self.env = make_env(p.suite, p.task, **env_kw)
        self.limit = p.max_steps or self.env.max_episode_steps
        # The writer keeps a few images (a reliable reader that lags still gets the latest);
        # the policy's reader keeps qos_depth.
        self.image_pub = self.create_publisher(
            Image, p.image_topic, qos(max(p.qos_depth, 5), p.qos_reliability)
        )
        self.instruction_pub = self.create_publisher(
            String, p.instruction_topic, qos(1, "reliable", latched=True)
        )
        self.reset_pub = self.create_publisher(Empty, p.reset_topic, 10)
        self.status_pub = self.create_publisher(
            DiagnosticStatus, p.status_topic, qos(10, "reliable", latched=True)
        )
        self.create_subscription(
            JointState, p.action_stamped_topic, self._on_action,
            qos(ACTION_DEPTH, p.qos_reliability),  # safe actions must not push out the answer
        )
        self._record = open(p.record_path, "a") if p.record_path else None  # noqa: SIM115
        self.episode = 0
        self.done = False
        self.results: list[dict] = []
        self._obs = None
        self._pending: set[int] = set()  # stamps of the images showing the current obs
        self._sent_at = 0.0
        self._first_image_at: float | None = None  # when to send an episode's first image
        self._started = False
        self._latest: tuple[str, np.ndarray] | None = None  # free-running: newest action
        self._gripper = 0.0
        self._new_counts()
        self.create_timer(1.0 / POLL_HZ, self._poll)
        if not p.lockstep:
            self.create_timer(1.0 / p.rate_hz, self._free_tick)

    # -- episodes -----------------------------------------------------------------------------

    def _new_counts(self) -> None:
        """Per-episode counters (each episode's record has its own)."""
        self.counts = {"resends": 0, "ignored_actions": 0, "safe_actions": 0,
                       "late_actions": 0, "held_steps": 0}
        self.sources: dict[str, int] = {}  # executed answers by frame_id

    def _poll(self) -> None:
        now = time.monotonic()
        if not self._started:
            # Wait until the policy listens, so the first image and instruction are not lost.
            listening = self.image_pub.get_subscription_count() > 0
            if listening and self.instruction_pub.get_subscription_count() > 0:
                self._started = True
                self._begin_episode()
            return
        if self._first_image_at is not None and now >= self._first_image_at:
            self._first_image_at = None
            self._publish_obs()
        elif (self.p.lockstep and self._pending and self._first_image_at is None
              and now - self._sent_at > self.p.lockstep_timeout_s):
            self.counts["resends"] += 1
            self.get_logger().warning("no answer to the latest image: sending it again")
            self._publish_obs(resend=True)

    def _begin_episode(self) -> None:
        seed = self.p.seed + self.episode
        self._obs, _ = self.env.reset(seed=seed)
        self._steps, self._reward, self._info = 0, 0.0, {"success": False}
        self._terminated = self._truncated = False
        self._gripper = 0.0
        self._latest = None
        self._new_counts()
        self.reset_pub.publish(Empty())
        self.instruction_pub.publish(String(data=self._obs["instruction"]))
        self._status("running")
        self._first_image_at = time.monotonic() + self.p.start_delay_s

    def _publish_obs(self, resend: bool = False) -> None:
        image = np.ascontiguousarray(self._obs["image"], dtype=np.uint8)
        msg = Image(height=image.shape[0], width=image.shape[1], encoding="rgb8",
                    is_bigendian=0, step=image.shape[1] * 3)
        msg.data = image.tobytes()
        msg.header.frame_id = self.p.camera_frame
        msg.header.stamp = self.get_clock().now().to_msg()
        if not resend:
            self._pending.clear()
        self._pending.add(stamp_ns(msg.header.stamp))
        self._sent_at = time.monotonic()
        self.image_pub.publish(msg)

    def _on_action(self, msg: JointState) -> None:
        if self.done or self._obs is None:
            return
        try:
            stamp, source, actions = parse_action_stamped(msg)
        except ValueError as e:
            self.get_logger().warning(f"ignoring action: {e}")
            self.counts["ignored_actions"] += 1
            return
        if not self.p.lockstep:
            # Newest action for the next tick; a policy action is not displaced by a safe
            # "no fresh image" hold that happens to arrive after it within the same tick.
            if not source.startswith(SAFE_PREFIX) or self._latest is None or (
                self._latest[0].startswith(SAFE_PREFIX)
            ):
                self._latest = (source, actions)
            return
        if stamp not in self._pending or self._first_image_at is not None:
            self.counts["ignored_actions"] += 1  # not an answer to the image on display
            return
        self._pending.clear()
        self._execute(actions, source, stamp)
        if not self.done and self._obs is not None and self._first_image_at is None:
            self._publish_obs()

    def _free_tick(self) -> None:
        if self.done or self._obs is None or self._first_image_at is not None or not self._started:
            return
        if self._latest is None:
            self.counts["held_steps"] += 1
            action = np.zeros((1, 7))
            action[0, -1] = self._gripper
            source = SAFE_PREFIX + "bridge_hold"
        else:
            source, action = self._latest
        self._latest = None
        self._execute(action, source, 0)
        if not self.done and self._obs is not None and self._first_image_at is None:
            self._publish_obs()

    def _execute(self, actions: np.ndarray, source: str, stamp: int) -> None:
        """Every row of the chunk, like run_episode; ends the episode when the env says so."""
        if source.startswith(SAFE_PREFIX):
            self.counts["safe_actions"] += 1
        elif source == LATE_SOURCE:
            self.counts["late_actions"] += 1
        self.sources[source] = self.sources.get(source, 0) + 1
        for action in actions:
            obs, reward, terminated, truncated, info = self.env.step(action)
            self._obs, self._info = obs, info
            self._steps += 1
            self._reward += float(reward)
            self._gripper = float(action[-1])
            self._write({
                "episode": self.episode, "step": self._steps, "stamp": stamp, "source": source,
                "action": [float(x) for x in action], "reward": float(reward),
            })
            if terminated or truncated or self._steps >= self.limit:
                self._terminated, self._truncated = bool(terminated), bool(truncated)
                self._end_episode()
                return

    def _end_episode(self) -> None:
        result = {
            "episode": self.episode,
            "seed": self.p.seed + self.episode,
            "task": self.p.task,
            "instruction": self._obs["instruction"],
            "success": bool(self._info.get("success", False)),
            "steps": self._steps,
            "reward": self._reward,
            **self.counts,
            "sources": dict(self.sources),
        }
        self.results.append(result)
        self._write({"episode_result": result})
        self._status("success" if result["success"] else "failure", result)
        self.get_logger().info(f"episode {self.episode}: {result}")
        self.episode += 1
        self._pending.clear()
        if self.p.episodes and self.episode >= self.p.episodes:
            self.done = True
            self._obs = None
        else:
            self._begin_episode()

    def _status(self, state: str, result: dict | None = None) -> None:
        level = DiagnosticStatus.OK if state != "failure" else DiagnosticStatus.WARN
        values = {"episode": self.episode, "task": self.p.task, **(result or {})}
        self.status_pub.publish(DiagnosticStatus(
            level=level, name=f"{self.get_name()}: episode", message=state,
            hardware_id=self.get_name(),
            values=[KeyValue(key=k, value=str(v)) for k, v in values.items()],
        ))

    def _write(self, record: dict) -> None:
        if self._record is not None:
            self._record.write(json.dumps(record) + "\n")
            self._record.flush()

    def close(self) -> None:
        if self._record is not None:
            self._record.close()
            self._record = None
        self.env.close()


def main(argv: list[str] | None = None) -> int:
    rclpy.init(args=argv if argv is not None else sys.argv)
    try:
        node = SimBridge()
    except ValueError as e:
        print(f"{NODE_NAME}: error: {e}", file=sys.stderr)
        rclpy.try_shutdown()
        return 2
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    try:
        while rclpy.ok() and not (node.done and node.p.exit_when_done):
            executor.spin_once(timeout_sec=0.1)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except RuntimeError:
        # SIGINT / SIGTERM shut the context down while the executor was taking a message:
        # rclpy's binding then raises a bare RuntimeError, not ExternalShutdownException.
        if rclpy.ok():  # a real error while running
            raise
    finally:
        node.close()
        executor.shutdown(timeout_sec=1.0)
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

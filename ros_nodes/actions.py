"""Action messages: what the policy node publishes and how a consumer reads it back.

Message choice (standard messages only, no custom interface package to build):

* ``action`` — ``std_msgs/Float32MultiArray``, row-major ``[chunk, 7]``; ``layout.dim[0]`` is
  ``("chunk", n, 7 n)`` and ``layout.dim[1]`` is ``("dx,dy,dz,droll,dpitch,dyaw,gripper", 7, 7)``.
  The simplest thing for a controller to consume, but it has no header.
* ``action_stamped`` — ``sensor_msgs/JointState``: the same numbers in ``position`` with one name
  per entry (``dx`` ... ``gripper``, prefixed ``"<row>/"`` when the chunk has several rows), and
  a header: ``stamp`` echoes the camera image the action answers (so a consumer can match
  actions to frames and measure age), ``frame_id`` says where it came from: ``"policy"``,
  ``"policy/late"`` (past its deadline, sent because the budget is infeasible and
  ``on_infeasible: late``) or ``"safe/<reason>"`` (deadline_miss, stale_image, no_fresh_image,
  ...). A safe action that answers no particular image carries the current time instead.
* optionally ``geometry_msgs/Twist`` for velocity bases: the first row's deltas times the control
  rate (per-step deltas -> velocities); the safe action is zero velocity.
"""

from __future__ import annotations

from typing import Any

import numpy as np

ACTION_LABELS = ("dx", "dy", "dz", "droll", "dpitch", "dyaw", "gripper")
ACTION_DIM = len(ACTION_LABELS)
POLICY_SOURCE = "policy"
LATE_SOURCE = "policy/late"
SAFE_PREFIX = "safe/"


def safe_action(mode: str, gripper: float) -> np.ndarray:
    """[1, 7]: "hold" = zero deltas, gripper kept; "zero" = all zeros (gripper opens)."""
    action = np.zeros((1, ACTION_DIM), dtype=np.float32)
    if mode == "hold":
        action[0, -1] = gripper
    return action


def joint_names(chunk: int) -> list[str]:
    if chunk == 1:
        return list(ACTION_LABELS)
    return [f"{i}/{label}" for i in range(chunk) for label in ACTION_LABELS]


def build_action_msgs(actions: np.ndarray, stamp: Any, source: str):
    """[chunk, 7] float -> (Float32MultiArray, JointState)."""
    from sensor_msgs.msg import JointState
    from std_msgs.msg import Float32MultiArray, MultiArrayDimension

    a = np.ascontiguousarray(actions, dtype=np.float32).reshape(-1, ACTION_DIM)
    chunk = a.shape[0]
    flat = Float32MultiArray()
    flat.layout.dim = [
        MultiArrayDimension(label="chunk", size=chunk, stride=chunk * ACTION_DIM),
        MultiArrayDimension(label=",".join(ACTION_LABELS), size=ACTION_DIM, stride=ACTION_DIM),
    ]
    flat.data = a.ravel()
    stamped = JointState(name=joint_names(chunk), position=a.astype(np.float64).ravel())
    stamped.header.stamp = stamp
    stamped.header.frame_id = source
    return flat, stamped


def build_twist(action: np.ndarray, rate_hz: float):
    from geometry_msgs.msg import Twist

    v = np.asarray(action, dtype=np.float64).reshape(-1)[:6] * rate_hz
    t = Twist()
    t.linear.x, t.linear.y, t.linear.z = (float(x) for x in v[:3])
    t.angular.x, t.angular.y, t.angular.z = (float(x) for x in v[3:6])
    return t


def parse_action_stamped(msg: Any) -> tuple[int, str, np.ndarray]:
    """JointState from the policy node -> (stamp ns, source, actions [chunk, 7])."""
    stamp = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
    pos = np.asarray(msg.position, dtype=np.float64)
    if pos.size == 0 or pos.size % ACTION_DIM:
        raise ValueError(f"action has {pos.size} values, not a multiple of {ACTION_DIM}")
    return stamp, str(msg.header.frame_id), pos.reshape(-1, ACTION_DIM)


def stamp_ns(stamp: Any) -> int:
    return stamp.sec * 1_000_000_000 + stamp.nanosec

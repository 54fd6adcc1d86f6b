"""The VLA policy as a ROS 2 lifecycle node with a per-step latency budget.

Lifecycle: configure loads the model and creates topics; activate starts the control timer;
deactivate stops it (lifecycle publishers stop publishing actions); cleanup / shutdown release
the model. With ``autostart`` (default) the node configures and activates itself.

Each control tick (``control_rate_hz``; or each new image with ``trigger: image``) runs one
policy step on the latest camera image under a deadline of ``budget_ms`` (ros_nodes/
step_control.py). The robot always gets an answer per tick: the policy's action, or the safe
action (``hold`` / ``zero``) when the step missed its deadline, no fresh image arrived, the image
is older than ``max_image_age_ms``, the previous step overran and still runs, or the input was
rejected (a rejected image is answered at once). At configure the acceleration levels are
built from the policy and timed (ros_nodes/policy_runtime.py); the latency controller
(vla_prune.runtime.budget) walks their latency / quality front from the measured latencies.
No callback waits for the policy, so one SingleThreadedExecutor serves inputs, diagnostics,
parameters and lifecycle while a step runs.

Run: ``python -m ros_nodes.policy_node --ros-args --params-file configs/ros/policy_node.yaml``.
Topics, messages and diagnostics: see ros_nodes/actions.py and ros_nodes/diagnostics.py.
"""

from __future__ import annotations

import concurrent.futures as cf
import faulthandler
import signal
import sys
import threading

import numpy as np
import rclpy
from rcl_interfaces.msg import SetParametersResult
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from sensor_msgs.msg import CompressedImage, Image, JointState
from std_msgs.msg import Empty, Float32MultiArray, String

from ros_nodes.actions import (
    LATE_SOURCE,
    POLICY_SOURCE,
    SAFE_PREFIX,
    build_action_msgs,
    build_twist,
)
from ros_nodes.actions import safe_action as make_safe_action
from ros_nodes.diagnostics import NodeStats, to_diagnostic_array
from ros_nodes.inputs import (
    Limits,
    Rejected,
    check_instruction,
    check_stamp,
    decode_compressed,
    decode_image,
)
from ros_nodes.params import (
    PolicyNodeParams,
    check_policy_params,
    declare,
    qos,
    updated_policy_params,
)
from ros_nodes.policy_runtime import PolicyRuntime
from ros_nodes.step_control import Frame, Step, StepControl

NODE_NAME = "vla_policy"
ACTION_DEPTH = 10


class PolicyNode(StepControl, LifecycleNode):
    def __init__(self, name: str = NODE_NAME, **kw):
        super().__init__(name, **kw)
        self.p = declare(self, PolicyNodeParams)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.stats = NodeStats(window=self.p.latency_window)
        self.runtime: PolicyRuntime | None = None
        self._lock = threading.Lock()
        self._pub_lock = threading.Lock()  # no publishing while release() drops publishers
        self._frame: Frame | None = None
        self._instruction: str | None = None
        self._last_gripper = self.p.initial_gripper
        self._inflight: Step | None = None
        self._worker: cf.ThreadPoolExecutor | None = None
        self._timer = self._diag_timer = self._guard = None
        self._done_guard = self._deadline = None  # step finished / step deadline
        self._deadline_s = 0.0
        self._subs: list = []
        self._pubs: dict[str, object] = {}
        self._diag_pub = None
        self._state = "unconfigured"

    # -- parameters ---------------------------------------------------------------------------

    def _on_set_parameters(self, params) -> SetParametersResult:
        changes = {param.name: param.value for param in params}
        new, reason = updated_policy_params(self.p, changes, self.runtime is not None)
        if new is None:
            return SetParametersResult(successful=False, reason=reason)
        old, self.p = self.p, new
        if self.runtime is not None:
            self.runtime.update(new)
        if new.control_rate_hz != old.control_rate_hz and self._timer is not None:
            self._start_control()
        if new.diagnostics_period_s != old.diagnostics_period_s and self._diag_timer is not None:
            self._start_diag_timer()
        return SetParametersResult(successful=True)

    # -- lifecycle ----------------------------------------------------------------------------

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        errors = check_policy_params(self.p)
        if errors:
            for e in errors:
                self.get_logger().error(e)
            return TransitionCallbackReturn.FAILURE
        try:
            self.runtime = PolicyRuntime(self.p, self.stats, self.get_logger())
        except Exception as e:  # noqa: BLE001 - any loading problem: report it, stay unconfigured
            self.get_logger().error(f"cannot load policy {self.p.policy!r}: {e}")
            return TransitionCallbackReturn.FAILURE
        p = self.p
        self._last_gripper = p.initial_gripper
        self._worker = cf.ThreadPoolExecutor(1, thread_name_prefix="policy")
        self._done_guard = self.create_guard_condition(self._on_step_done)
        data_qos = qos(p.qos_depth, p.qos_reliability)
        # Actions keep a short history: a safe action right after a policy action must not
        # overwrite it before the consumer has taken it. Images keep only the latest.
        action_qos = qos(ACTION_DEPTH, p.qos_reliability)
        pub = self.create_lifecycle_publisher
        self._pubs = {
            "action": pub(Float32MultiArray, p.action_topic, action_qos),
            "stamped": pub(JointState, p.action_stamped_topic, action_qos),
        }
        if p.twist_topic:
            from geometry_msgs.msg import Twist

            self._pubs["twist"] = pub(Twist, p.twist_topic, action_qos)
        from diagnostic_msgs.msg import DiagnosticArray

        self._diag_pub = self.create_publisher(DiagnosticArray, p.diagnostics_topic, 10)
        if p.image_transport == "compressed":
            image_sub = self.create_subscription(
                CompressedImage, p.compressed_image_topic, self._on_compressed, data_qos
            )
        else:
            image_sub = self.create_subscription(Image, p.image_topic, self._on_image, data_qos)
        self._subs = [
            image_sub,
            self.create_subscription(
                String, p.instruction_topic, self._on_instruction,
                qos(max(p.qos_depth, 1), "reliable", latched=True),
            ),
            self.create_subscription(Empty, p.reset_topic, self._on_reset, 10),
        ]
        self._start_diag_timer()
        self._state = "inactive"
        ctrl = self.runtime.controller
        self.get_logger().info(
            f"configured {p.policy} ({self.runtime.num_visual} visual tokens), levels "
            f"{[lv.name for lv in ctrl.levels]}, budget {p.budget_ms} ms, starting at "
            f"{ctrl.current.name}"
        )
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._start_control()
        self._state = "active"
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_control()
        self._state = "inactive"
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.release()
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.release()
        self._state = "finalized"
        return TransitionCallbackReturn.SUCCESS

    def release(self) -> None:
        """Stop control, drop topics, free the model (cleanup, shutdown, process exit)."""
        self._stop_control()
        if self._diag_timer is not None:
            self.destroy_timer(self._diag_timer)
            self._diag_timer = None
        for sub in self._subs:
            self.destroy_subscription(sub)
        self._subs = []
        with self._pub_lock:
            pubs, self._pubs = self._pubs, {}
        for pub in pubs.values():
            self.destroy_lifecycle_publisher(pub)
        with self._pub_lock:
            diag, self._diag_pub = self._diag_pub, None
        if diag is not None:
            self.destroy_publisher(diag)
        if self._done_guard is not None:
            self.destroy_guard_condition(self._done_guard)
            self._done_guard = None
        if self._deadline is not None:
            self.destroy_timer(self._deadline)
            self._deadline = None
        if self._worker is not None:
            self._worker.shutdown(wait=True, cancel_futures=True)
            self._worker = None
        if self.runtime is not None:
            self.runtime.close()
        self._inflight, self._frame, self._instruction, self.runtime = None, None, None, None
        self._state = "unconfigured"

    def _start_control(self) -> None:
        """A timer at control_rate_hz, or (trigger: image) a guard condition each new image
        triggers; both run `_tick`."""
        self._stop_control()
        if self.p.trigger == "image":
            self._guard = self.create_guard_condition(self._tick)
        else:
            self._timer = self.create_timer(1.0 / self.p.control_rate_hz, self._tick)

    def _stop_control(self) -> None:
        if self._timer is not None:
            self.destroy_timer(self._timer)
            self._timer = None
        if self._guard is not None:
            self.destroy_guard_condition(self._guard)
            self._guard = None

    def _start_diag_timer(self) -> None:
        if self._diag_timer is not None:
            self.destroy_timer(self._diag_timer)
        self._diag_timer = self.create_timer(self.p.diagnostics_period_s, self.publish_diagnostics)

    # -- inputs -------------------------------------------------------------------------------

    def _limits(self) -> Limits:
        return Limits(self.p.max_image_side, self.p.max_instruction_chars)

    def _reject(self, err: Rejected, kind: str, header=None) -> None:
        """Count, log (throttled) and forget the last good input of that kind: the robot gets
        the safe action until a good one arrives. A rejected image is answered at once (its
        stamp echoed), so a lock-step consumer is not left waiting."""
        self.stats.reject(err.reason, err.detail)
        self.get_logger().warning(f"rejected {err}", throttle_duration_sec=2.0)
        with self._lock:
            if kind == "image":
                self._frame = None
            else:
                self._instruction = None
        if header is not None and self._state == "active":
            self._publish_safe(err.reason, header.stamp)

    def _accept_frame(self, image: np.ndarray, header) -> None:
        stamp = header.stamp.sec * 1_000_000_000 + header.stamp.nanosec
        try:
            check_stamp(stamp, self.get_clock().now().nanoseconds, self.p.max_image_age_ms)
        except Rejected as e:
            self._reject(e, "image", header)
            return
        with self._lock:
            self._frame = Frame(image, stamp, header.stamp)
        if self._guard is not None:
            self._guard.trigger()

    def _on_image(self, msg: Image) -> None:
        try:
            image = decode_image(msg, self._limits())
        except Rejected as e:
            self._reject(e, "image", msg.header)
            return
        self._accept_frame(image, msg.header)

    def _on_compressed(self, msg: CompressedImage) -> None:
        try:
            image = decode_compressed(msg, self._limits())
        except Rejected as e:
            self._reject(e, "image", msg.header)
            return
        self._accept_frame(image, msg.header)

    def _on_instruction(self, msg: String) -> None:
        try:
            text = check_instruction(msg.data, self._limits())
        except Rejected as e:
            self._reject(e, "instruction")
            return
        with self._lock:
            if text != self._instruction and self.runtime is not None:
                self.runtime.request_reset()  # a new instruction is a new episode
            self._instruction = text

    def _on_reset(self, msg: Empty) -> None:
        if self.runtime is not None:
            self.runtime.request_reset()

    def _publish_safe(self, reason: str, stamp) -> None:
        self.stats.safe(reason)
        action = make_safe_action(self.p.safe_action, self._last_gripper)
        self._publish(action, stamp, SAFE_PREFIX + reason)

    def _publish(self, actions: np.ndarray, stamp, source: str) -> None:
        if self._state != "active":  # a step that ends after deactivate: no action, no warning
            return
        if stamp is None:
            stamp = self.get_clock().now().to_msg()
        flat, stamped = build_action_msgs(actions, stamp, source)
        with self._pub_lock:
            if not self._pubs:  # released (cleanup / shutdown)
                return
            self._pubs["action"].publish(flat)
            self._pubs["stamped"].publish(stamped)
            if "twist" in self._pubs:
                self._pubs["twist"].publish(build_twist(actions[0], self.p.control_rate_hz))
        if source in (POLICY_SOURCE, LATE_SOURCE):
            self._last_gripper = float(actions[-1, -1])

    def publish_diagnostics(self) -> None:
        snap = self.stats.snapshot()
        msg = to_diagnostic_array(
            snap, self.get_clock().now().to_msg(), self.get_name(), self._state
        )
        with self._pub_lock:
            if self._diag_pub is not None:
                self._diag_pub.publish(msg)


def main(argv: list[str] | None = None) -> int:
    """Entry point (ros2 run / the launcher): spin until SIGINT / SIGTERM."""
    faulthandler.register(signal.SIGUSR1)  # kill -USR1 <pid>: every thread's stack to stderr
    rclpy.init(args=argv if argv is not None else sys.argv)
    try:
        node = PolicyNode()
    except ValueError as e:  # a parameter of the wrong type in the parameter file
        print(f"{NODE_NAME}: error: {e}", file=sys.stderr)
        rclpy.try_shutdown()
        return 2
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    code = 0
    try:
        if node.p.autostart:
            if node.trigger_configure() != TransitionCallbackReturn.SUCCESS:
                node.get_logger().error("configure failed; exiting")
                code = 1
            else:
                node.trigger_activate()
        if code == 0:
            executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except RuntimeError:
        # SIGINT / SIGTERM shut the context down while the executor was taking a message:
        # rclpy's binding then raises a bare RuntimeError, not ExternalShutdownException.
        if rclpy.ok():  # a real error while running
            raise
    finally:
        node.release()
        executor.shutdown(timeout_sec=1.0)
        node.destroy_node()
        rclpy.try_shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())

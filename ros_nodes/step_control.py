"""One control step of the policy node, without ever blocking the executor.

A tick (control timer, or a new image with ``trigger: image``) takes the latest image and starts
one policy step in the node's worker thread. Two things can end it, both handled in the executor
thread: the worker finishing (it triggers a guard condition -> ``_on_step_done``) and the
one-shot deadline timer (``budget_ms``, or ``MAX_STEP_S`` without a budget -> ``_on_deadline``).
Whichever comes first answers the image: the policy's action, or the safe action
``deadline_miss``; a result that arrives after its deadline is only bookkept (latency -> the
budget controller), never published. While a step runs past its deadline, each tick (and each
new image) is answered with the safe action ``busy``. Exception: when the budget is infeasible
(below the fastest level's measured p90) and ``on_infeasible: late``, the deadline passes
silently and the late result answers the image, flagged ``policy/late``.

Why never block: an earlier version waited for the step inside a callback of rclpy's
MultiThreadedExecutor. That executor (jazzy, rclpy 7.1) re-yields every task queued in its thread
pool but not yet started, so it never waits while one is queued; with the policy thread holding
the GIL, tasks start late, and the spin loop burned a whole core and starved the policy: ~160-600
ms per lock-step step of a ~10 ms policy, which we had first mistaken for slow loopback DDS.

``StepControl`` is a mixin of ``PolicyNode``: it uses the node's runtime, worker, frame and
instruction state, publishers (``_publish``, ``_publish_safe``) and ``p`` (parameters).
"""

from __future__ import annotations

import concurrent.futures as cf
import time
from dataclasses import dataclass

import numpy as np

from ros_nodes.actions import LATE_SOURCE, POLICY_SOURCE
from ros_nodes.inputs import Rejected, check_stamp

MAX_STEP_S = 30.0  # without a budget a step still may not hold up control longer than this


@dataclass
class Frame:
    image: np.ndarray
    stamp_ns: int
    stamp: object  # builtin_interfaces/Time, echoed in the answer
    used: bool = False


@dataclass
class Step:
    """A policy step in flight in the worker thread."""

    future: cf.Future
    frame: Frame
    t0: float  # perf_counter at submission
    end: float | None = None  # perf_counter when the worker finished (set by the worker)
    missed: bool = False  # the deadline passed first
    late: bool = False  # ... and the answer waits for the late result (on_infeasible: late)


class StepControl:
    """The control step of PolicyNode (see the module docstring)."""

    def _tick(self) -> None:
        rt = self.runtime
        if rt is None or self._worker is None:
            return
        on_image = self.p.trigger == "image"
        step = self._inflight
        if step is not None and step.future.done():
            self._on_step_done()  # finished, its wake-up not handled yet: handle it first
            step = self._inflight
        overran = step is not None and step.missed
        with self._lock:
            frame, instruction = self._frame, self._instruction
            fresh = instruction is not None and frame is not None and not frame.used
            if fresh and (step is None or (overran and on_image)):
                frame.used = True  # each image is acted on at most once
        if step is not None:
            # Still within its deadline: nothing to say yet (its end re-triggers image mode).
            # Past it: this tick, and an image that arrived meanwhile, get the safe action.
            if overran:
                self._publish_safe("busy", frame.stamp if on_image and fresh else None)
            return
        if instruction is None:
            self._publish_safe("no_instruction", frame.stamp if on_image and frame else None)
            return
        if not fresh:
            if not on_image:  # a tick without a new image: hold (image mode: nothing to do)
                self._publish_safe("no_fresh_image", None)
            return
        try:
            check_stamp(frame.stamp_ns, self.get_clock().now().nanoseconds,
                        self.p.max_image_age_ms)
        except Rejected as e:
            self._publish_safe(e.reason, frame.stamp)
            return
        rt.sync_policy()  # level change / reset, while the worker is idle
        t0 = time.perf_counter()
        step = Step(self._worker.submit(rt.infer, frame.image, instruction), frame, t0)
        self._inflight = step
        step.future.add_done_callback(lambda _f, step=step: self._step_finished(step))
        self._arm_deadline()

    def _step_finished(self, step: Step) -> None:
        """Worker thread: note the end time and wake the executor (-> _on_step_done)."""
        step.end = time.perf_counter()
        guard = self._done_guard
        if guard is not None:
            try:
                guard.trigger()
            except Exception:  # noqa: BLE001 - released meanwhile (cleanup / shutdown)
                pass

    def _arm_deadline(self) -> None:
        """Start the one-shot deadline timer of the step just submitted."""
        budget = self.p.budget_ms
        deadline_s = budget / 1e3 if budget > 0 else MAX_STEP_S
        if self._deadline is None or deadline_s != self._deadline_s:
            if self._deadline is not None:
                self.destroy_timer(self._deadline)
            self._deadline = self.create_timer(deadline_s, self._on_deadline)
            self._deadline_s = deadline_s
        else:
            self._deadline.reset()

    def _on_deadline(self) -> None:
        self._deadline.cancel()
        step = self._inflight
        if step is None or step.missed:
            return
        if step.future.done():  # finished just in time; its wake-up is still queued
            self._on_step_done()
            return
        step.missed = True
        self.stats.missed()
        rt = self.runtime
        if rt is not None and rt.act_late:
            step.late = True  # answered when it ends
            return
        self._publish_safe("deadline_miss", step.frame.stamp)

    def _on_step_done(self) -> None:
        step, rt = self._inflight, self.runtime
        if step is None or not step.future.done():
            return
        self._inflight = None
        if self._deadline is not None:
            self._deadline.cancel()
        if rt is None or step.future.cancelled():  # released meanwhile
            return
        self._answer(step, rt)
        with self._lock:
            waiting = self._frame is not None and not self._frame.used
        if waiting and self._guard is not None:  # image mode: an image came during the step
            self._guard.trigger()

    def _answer(self, step: Step, rt) -> None:
        """The finished step's answer; one that overran was answered at its deadline."""
        future, stamp = step.future, step.frame.stamp
        error = future.exception()
        if error is not None:
            if not step.missed or step.late:  # not answered yet
                self._publish_safe(rt.classify_error(error), stamp)
            return
        latency = rt.finished(future, step.t0, step.missed, step.frame.stamp_ns, end=step.end)
        late = step.late
        if step.missed and not late:
            return
        budget = self.p.budget_ms
        if not step.missed and budget > 0 and latency > budget:  # past it, before its timer
            self.stats.missed()
            if not rt.act_late:
                self._publish_safe("deadline_miss", stamp)
                return
            late = True
        result = future.result()
        if not np.isfinite(result.actions).all():
            self._publish_safe("non_finite_action", stamp)
            return
        self._publish(result.actions, stamp, LATE_SOURCE if late else POLICY_SOURCE)
        self.stats.published(late=late)

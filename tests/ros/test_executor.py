"""While a policy step runs, the node's executor is neither blocked nor busy: diagnostics keep
their period and the process sleeps while the step sleeps; with a deadline, the image is
answered at the deadline, an image during the overrun at once, and the late result never.

(The regression that made the executor single-threaded, a spin loop starving a CPU-bound policy
of the GIL, is a speed effect: bench/ros_overhead.py measures it, not this test.)"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

pytest.importorskip("rclpy", reason="needs the ros extra: pip install -e '.[ros]'")

from ros_helpers import Harness, write_params  # noqa: E402

pytestmark = pytest.mark.ros

STEP_S = 3.0  # injected step length (sleep: no CPU); long, so a stalled machine keeps the margins
BUDGET_MS = 400.0


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, all threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0  # clock ticks (USER_HZ = 100)


def test_a_long_step_leaves_the_executor_free(
    ros_env, start_node, client, micro_checkpoint, tmp_path
):
    from diagnostic_msgs.msg import DiagnosticArray

    params = write_params(
        tmp_path / "params.yaml",
        policy=dict(
            policy=str(micro_checkpoint),
            trigger="image",
            budget_ms=0.0,
            max_image_age_ms=5000.0,
            diagnostics_period_s=0.1,
            relax_after_steps=1000,
            min_keep_tokens=64,  # one level: the controller cannot shorten the step
            inject_delay_ms=STEP_S * 1e3,
            inject_delay_mode="fixed",
        ),
    )
    node = start_node("policy", params)
    h = Harness(client)
    diag_times: list[float] = []
    client.node.create_subscription(
        DiagnosticArray, "diagnostics", lambda _m: diag_times.append(time.monotonic()), 10
    )
    h.wait_active()
    h.instruct()
    client.spin_for(0.3)

    # No deadline: the step runs its 2 s while the executor serves everything else.
    first = h.publish_image()
    t0, cpu0 = time.monotonic(), cpu_seconds(node.pid)
    client.spin_until(lambda: any(a.stamp == first for a in h.answers), 10, "the policy answer")
    cpu = cpu_seconds(node.pid) - cpu0
    elapsed = time.monotonic() - t0
    assert [a.source for a in h.answers if a.stamp == first] == ["policy"]
    during = [t for t in diag_times if t0 < t < t0 + STEP_S]
    # Diagnostics every 0.1 s while the worker sleeps in the step (generous: >= 1/4 of them).
    assert len(during) >= STEP_S / 0.1 / 4, len(during)
    # A sleeping step costs the process little CPU; a busy-looping executor costs a core.
    assert cpu < 0.4 * elapsed, (cpu, elapsed)

    # With a deadline: answered at the deadline, an image during the overrun gets "busy" at
    # once, and the late result is never sent.
    (ok,) = client.set_params("vla_policy", budget_ms=BUDGET_MS)
    assert ok.successful
    second = h.publish_image()
    t1 = time.monotonic()
    client.spin_until(lambda: any(a.stamp == second for a in h.answers), 10, "the deadline answer")
    (miss,) = [a for a in h.answers if a.stamp == second]
    assert miss.source == "safe/deadline_miss" and miss.received - t1 < STEP_S / 2
    third = h.publish_image()
    client.spin_until(lambda: any(a.stamp == third for a in h.answers), 10, "the busy answer")
    (busy,) = [a for a in h.answers if a.stamp == third]
    assert busy.source == "safe/busy" and busy.received - t1 < STEP_S * 0.75
    client.spin_for(STEP_S)  # the overrun step ends meanwhile
    answered = sorted(a.stamp for a in h.answers if a.stamp in h.sent)
    assert answered == sorted([first, second, third])
    assert h.value("control", "deadline_misses") == 1
    assert node.alive()

"""The policy node under an injected slowdown: the controller lowers the kept visual tokens
until steps fit the budget; every miss is counted and answered with the safe action."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("rclpy", reason="needs the ros extra: pip install -e '.[ros]'")

from ros_helpers import Harness, write_params  # noqa: E402

pytestmark = pytest.mark.ros

# The micro policy (64 visual tokens, ~10 ms a step) plus a per-token slowdown of 400 ms at all
# 64 tokens: 300 ms at 48 tokens (a miss), 200 ms at 32 (fits the 255 ms target). Sleeps are
# precise and the policy's own compute is small, so a loaded machine does not blur the levels.
BUDGET_MS = 300.0
INJECT_MS = 400.0
# The calm phase runs under a wide budget: on a shared 2-core CI machine one step of the ~10 ms
# policy was once stalled past 255 ms (CPU steal), which rightly escalated the level. Whether
# the policy alone fits at full quality is a statement about the policy, not about neighbours.
CALM_BUDGET_MS = 3000.0


def step_log(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_slowdown_lowers_the_level_and_misses_get_the_safe_action(
    ros_env, start_node, client, micro_checkpoint, tmp_path
):
    log = tmp_path / "steps.jsonl"
    params = write_params(
        tmp_path / "params.yaml",
        policy=dict(
            policy=str(micro_checkpoint),
            min_keep_tokens=16,
            budget_ms=CALM_BUDGET_MS,
            control_rate_hz=5.0,
            max_image_age_ms=2000.0,
            relax_after_steps=1000,
            diagnostics_period_s=0.2,
            inject_delay_ms=0.0,
            inject_delay_mode="per_token",
            safe_action="hold",
            step_log_path=str(log),
        ),
    )
    node = start_node("policy", params)
    h = Harness(client)
    h.wait_active()
    h.instruct()
    h.start_camera(20.0)

    # Normal load: the policy alone fits the budget at full quality.
    client.spin_until(lambda: len(h.policy_answers()) >= 4, 60, "4 policy steps")
    calm = step_log(log)
    assert h.value("control", "level") == 0 and h.value("control", "deadline_misses") == 0, calm
    assert all(s["kept"] == 64 for s in calm), calm

    # Run-time parameters: a bad value is refused with a reason, good ones take effect.
    (bad,) = client.set_params("vla_policy", budget_ms=-5.0)
    assert not bad.successful and "budget_ms" in bad.reason
    (ok,) = client.set_params("vla_policy", budget_ms=BUDGET_MS)
    assert ok.successful
    client.spin_until(lambda: h.value("control", "budget_ms") == BUDGET_MS, 5, "new budget")
    (ok,) = client.set_params("vla_policy", inject_delay_ms=INJECT_MS)
    assert ok.successful
    start = len(h.answers)

    client.spin_until(lambda: len(h.policy_answers()) >= 4 + 12, 90, "12 steps under load")
    h.stop_camera()
    client.spin_until(
        lambda: (
            h.value("control", "deadline_misses")
            == sum(a.source == "safe/deadline_miss" for a in h.answers)
        ),
        5,
        "diagnostics to catch up",
    )
    assert node.alive()
    trace = [a.source for a in h.answers[start:]]  # in failure messages
    loaded = h.answers[start:]
    misses = [a for a in loaded if a.source == "safe/deadline_miss"]
    # At least one miss (the first loaded step cannot fit), each answered with the safe action
    # for the image it missed: zero deltas, the gripper held where the policy left it.
    assert len(misses) >= 1, trace
    assert h.value("control", "deadline_misses") == len(misses)
    assert all(m.stamp in h.sent for m in misses)
    gripper = 0.0  # initial_gripper, then whatever the policy last commanded
    for a in h.answers:
        if a.source == "policy":
            gripper = a.actions[-1, -1]
        elif a.source == "safe/deadline_miss":
            np.testing.assert_array_equal(a.actions[0, :6], 0.0)
            assert a.actions[0, 6] == pytest.approx(gripper)
    # The controller went faster: fewer kept tokens, not below the floor.
    kept = h.value("control", "kept_tokens")
    assert 16 <= kept < 64 and h.value("control", "level") > 0
    # ... and the steps fit again: the last answers to images are the policy's own.
    tail = [a.source for a in h.image_answers()[-6:]]
    assert tail.count("policy") >= 5, (trace, h.diag["control"], step_log(log)[-8:])
    print(
        f"misses {len(misses)}, kept {kept:.0f}, p50 {h.value('control', 'latency_p50_ms'):.0f} ms"
    )

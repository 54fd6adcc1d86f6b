"""The policy node under an injected slowdown: the controller walks its measured levels until
steps fit the budget (fewer kept tokens; a DiT-cache level when no keep count is enough);
every miss is counted and answered with the safe action; a budget no level can meet is an
error on diagnostics."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

pytest.importorskip("rclpy", reason="needs the ros extra: pip install -e '.[ros]'")

from ros_helpers import Harness, write_params  # noqa: E402

ERROR = 2  # diagnostic_msgs/DiagnosticStatus.ERROR

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
            level_min_gain=0.0,  # every measured keep count a level (the calm steps barely
            # differ on the micro policy; under the per-token load they do)
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


def test_a_budget_no_keep_count_meets_is_met_by_a_dit_cache_level(
    ros_env, start_node, client, tmp_path
):
    """CogACT with a slowdown in its DiT head (per DiT block computed, like a big DiT): no
    keep count fits the budget, the controller moves on to a DiT-cache level, which does."""
    log = tmp_path / "steps.jsonl"
    params = write_params(
        tmp_path / "params.yaml",
        policy=dict(
            policy="tiny-cogact-112",  # 64 visual tokens, random weights (a preset)
            accel="vla-pruner@1.0",
            min_keep_fraction=0.5,  # keep counts 64, 48, 32
            level_cache="5",  # 2 of 10 DDIM steps run the DiT: 20 % of its blocks
            level_min_gain=0.0,
            budget_ms=CALM_BUDGET_MS,
            control_rate_hz=5.0,
            max_image_age_ms=2000.0,
            relax_after_steps=1000,
            diagnostics_period_s=0.2,
            inject_delay_mode="per_dit_block",
            step_log_path=str(log),
        ),
    )
    node = start_node("policy", params)
    h = Harness(client)
    h.wait_active(timeout=120)
    configured = next(line for line in node.tail(200).splitlines() if "configured" in line)
    assert "keep64" in configured and "cache5" in configured, configured
    h.instruct()
    h.start_camera(20.0)
    client.spin_until(lambda: len(h.policy_answers()) >= 3, 60, "3 calm policy steps")
    assert h.value("control", "level") == 0 and "cache" not in h.diag["control"]["level_name"]

    # 400 ms at every uncached DiT head, 80 ms with the cache: over the 300 ms budget at every
    # keep count, well under it with the cache.
    results = client.set_params("vla_policy", budget_ms=BUDGET_MS, inject_delay_ms=INJECT_MS)
    assert all(r.successful for r in results)
    start = len(h.answers)
    client.spin_until(
        lambda: sum(a.source == "policy" for a in h.answers[start:]) >= 6, 90,
        "6 steps that fit under load",
    )
    h.stop_camera()
    assert node.alive()
    loaded = [s for s in step_log(log) if s["budget_ms"] == BUDGET_MS and s["inject_ms"] > 0]
    uncached = [s for s in loaded if "cache" not in s["level_name"]]
    cached = [s for s in loaded if "cache5" in s["level_name"]]
    trace = [(s["level_name"], s["latency_ms"]) for s in loaded]
    assert uncached and all(s["latency_ms"] > BUDGET_MS for s in uncached), trace
    assert cached and all(s["latency_ms"] < BUDGET_MS for s in cached), trace
    assert loaded[-1]["level_name"].startswith("keep") and "cache5" in loaded[-1]["level_name"]
    # The level changes and why are in the step log.
    changes = [s["change"] for s in loaded if "change" in s]
    assert changes and changes[-1]["to"] == cached[0]["level_name"], changes
    assert all(c["reason"] == "escalate" and "ms" in c["detail"] for c in changes)
    misses = [a for a in h.answers[start:] if a.source == "safe/deadline_miss"]
    # (a step already running when the budget changed kept its old deadline)
    assert 1 <= len(misses) <= len(uncached)
    assert h.value("control", "deadline_misses") >= len(misses)
    tail = [a.source for a in h.image_answers()[-4:]]
    assert tail.count("policy") >= 3, (tail, trace)


def test_an_infeasible_budget_is_an_error_and_gets_safe_actions_only(
    ros_env, start_node, client, micro_checkpoint, tmp_path
):
    params = write_params(
        tmp_path / "params.yaml",
        policy=dict(
            policy=str(micro_checkpoint),
            min_keep_fraction=0.5,
            warmup_steps=1,
            level_timing_steps=2,
            budget_ms=100.0,
            inject_delay_ms=300.0,  # every level: > 300 ms, measured at configure
            inject_delay_mode="fixed",
            control_rate_hz=5.0,
            max_image_age_ms=2000.0,
            diagnostics_period_s=0.2,
        ),
    )
    node = start_node("policy", params)
    h = Harness(client)
    h.wait_active(timeout=120)
    # configure said so, naming the budget and the fastest level's measured p90 ...
    error = next(line for line in node.tail(200).splitlines() if "infeasible" in line)
    assert "ERROR" in error and "budget 100 ms" in error, error
    p90 = float(re.search(r"measured p90 ([\d.]+) ms", error).group(1))
    assert p90 > 300.0, error
    # ... and so do the diagnostics, at ERROR level.
    client.spin_until(lambda: "control" in h.status, 10, "diagnostics")
    level, message = h.status["control"]
    assert level == ERROR and "infeasible" in message, h.status
    assert h.value("control", "fastest_p90_ms") == pytest.approx(p90, abs=0.06)

    h.instruct()
    h.start_camera(10.0)
    client.spin_until(lambda: len(h.image_answers()) >= 5, 30, "5 answers")
    assert {a.source for a in h.answers} <= {"safe/deadline_miss", "safe/busy",
                                               "safe/no_fresh_image", "safe/no_instruction"}
    assert any(a.source == "safe/deadline_miss" for a in h.answers)

    # on_infeasible: late -> the late results answer their images, flagged.
    (ok,) = client.set_params("vla_policy", on_infeasible="late")
    assert ok.successful
    start = len(h.answers)
    client.spin_until(
        lambda: sum(a.source == "policy/late" for a in h.answers[start:]) >= 2, 30, "late answers"
    )
    assert not any(a.source == "policy" for a in h.answers[start:])
    late = [a for a in h.answers[start:] if a.source == "policy/late"]
    assert all(a.stamp in h.sent for a in late)

    # A budget the levels meet: no error, the policy's own actions.
    (ok,) = client.set_params("vla_policy", budget_ms=3000.0)
    assert ok.successful
    client.spin_until(lambda: h.status["control"][0] != ERROR, 10, "the error to clear")
    start = len(h.answers)
    client.spin_until(lambda: len(h.policy_answers()) >= 2, 30, "policy answers")
    h.stop_camera()
    assert h.value("control", "late_actions") >= 2
    assert node.alive()

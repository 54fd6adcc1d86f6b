"""Malformed messages: the node rejects each one with a counted reason, answers every bad image
with the safe action, keeps running, and still controls afterwards. Plus lifecycle transitions."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest

pytest.importorskip("rclpy", reason="needs the ros extra: pip install -e '.[ros]'")

from ros_helpers import Harness, image_msg, write_params  # noqa: E402

pytestmark = pytest.mark.ros

ROUNDS = 40  # x (13 kinds of image + 1 instruction) = 560 malformed messages


def bad_images(h: Harness):
    """(reason, message) for each kind of broken image."""
    from builtin_interfaces.msg import Time

    from ros_nodes.actions import stamp_ns

    rgb = h.image
    now = h.now

    def shifted(seconds: float) -> Time:
        ns = stamp_ns(now()) + int(seconds * 1e9)
        return Time(sec=ns // 10**9, nanosec=ns % 10**9)

    def msg(image=rgb, stamp=None, **fields):
        m = image_msg(image, stamp or now())
        for k, v in fields.items():
            setattr(m, k, v)
        return m

    nan = np.full((16, 16, 3), 0.5, np.float32)
    nan[3, 4, 1] = np.nan
    inf = nan.copy()
    inf[3, 4, 1] = np.inf
    return [
        ("bad_encoding", lambda: msg(encoding="yuv422")),
        ("bad_encoding", lambda: msg(encoding="16UC1")),
        ("size_mismatch", lambda: msg(data=rgb.tobytes()[:-7])),
        ("size_mismatch", lambda: msg(height=64)),
        ("bad_step", lambda: msg(step=100)),
        ("empty_data", lambda: msg(data=b"")),
        ("image_too_large", lambda: msg(height=50_000, width=50_000)),
        ("image_too_large", lambda: msg(np.zeros((2, 1100, 3), np.uint8))),
        ("bad_size", lambda: msg(np.zeros((1, 4, 3), np.uint8))),
        ("non_finite", lambda: msg(nan, encoding="32FC3")),
        ("non_finite", lambda: msg(inf, encoding="32FC3")),
        # An hour off: the node may reach a message of this burst seconds after it was sent, and
        # a +10 s stamp read 10 s late is (rightly) no longer in the future.
        ("stale_image", lambda: msg(stamp=shifted(-3600.0))),
        ("future_stamp", lambda: msg(stamp=shifted(+3600.0))),
    ]


# (A NUL cannot be sent: ROS strings end at the first NUL, the node gets a valid prefix.)
BAD_INSTRUCTIONS = [
    ("empty_instruction", ""),
    ("empty_instruction", "   \t\n"),
    ("instruction_too_long", "pick " * 1000),
    ("instruction_too_long", "\u00e9" * 1001),
]


DELIVERY_S = 180  # generous: a timeout only matters when the test fails


def test_fuzz_and_lifecycle(ros_env, start_node, client, micro_checkpoint, tmp_path):
    from std_msgs.msg import String

    from ros_nodes.actions import stamp_ns
    from ros_nodes.params import qos

    params = write_params(
        tmp_path / "params.yaml",
        policy=dict(
            policy=str(micro_checkpoint),
            budget_ms=0.0,
            control_rate_hz=20.0,
            qos_depth=1000,  # keep every fuzz message: each one must be counted
            max_image_side=1024,
            max_instruction_chars=1000,
            diagnostics_period_s=0.2,
            # Malformed images are rejected before their stamp is checked; a wide age limit keeps
            # the good images good however far behind the node runs in the burst.
            max_image_age_ms=60_000.0,
        ),
    )
    node = start_node("policy", params)
    h = Harness(client, image_depth=1000)
    text_pub = client.node.create_publisher(String, "instruction", qos(1000, "reliable", True))
    h.wait_active()
    text_pub.publish(String(data="press the green button"))
    client.spin_for(0.2)
    h.publish_image()
    client.spin_until(lambda: h.policy_answers(), 30, "a first policy action")

    images = bad_images(h)
    texts = itertools.cycle(BAD_INSTRUCTIONS)
    sent: Counter = Counter()
    bad_stamps: set[int] = set()
    for _ in range(ROUNDS):  # each round: every kind of bad image, then a bad instruction
        for reason, make in images:
            m = make()
            bad_stamps.add(stamp_ns(m.header.stamp))
            h.image_pub.publish(m)
            sent[reason] += 1
        reason, text = next(texts)
        text_pub.publish(String(data=text))
        sent[reason] += 1
        client.spin_for(0.01)
    total = sum(sent.values())
    assert total >= 500

    client.spin_until(
        lambda: h.value("inputs", "rejected_total") >= total,
        DELIVERY_S,
        f"{total} rejections on diagnostics (sent {dict(sent)})",
    )
    assert node.alive()
    inputs = h.diag["inputs"]
    assert int(inputs["rejected_total"]) == total
    for reason, n in sent.items():
        assert int(inputs[f"rejected_{reason}"]) == n, reason
    # Every bad image was answered with the safe action for its own stamp.
    client.spin_until(
        lambda: len({a.stamp for a in h.answers if a.stamp in bad_stamps}) == len(bad_stamps),
        DELIVERY_S,
        "a safe answer to every bad image",
    )
    answered = [a for a in h.answers if a.stamp in bad_stamps]
    assert all(a.source.startswith("safe/") for a in answered)
    assert all(np.all(a.actions[0, :6] == 0) for a in answered)

    # Still controlling: a good instruction and image get the policy's action.
    text_pub.publish(String(data="press the green button"))
    client.spin_for(0.3)
    before = len(h.policy_answers())
    for _ in range(15):  # re-send if the transport loses or delays an image (a new stamp each)
        h.publish_image()
        try:
            client.spin_until(lambda: len(h.policy_answers()) > before, 4, "a policy action")
            break
        except TimeoutError:
            continue
    assert len(h.policy_answers()) > before, "no policy action after the fuzz"

    # Lifecycle: deactivate stops actions; activate resumes; the model stays loaded.
    assert client.lifecycle("vla_policy", "deactivate")
    assert client.lifecycle_state("vla_policy") == "inactive"
    client.spin_for(0.3)
    n = len(h.answers)
    h.publish_image()
    client.spin_for(0.5)
    assert len(h.answers) == n
    assert client.lifecycle("vla_policy", "activate")
    h.publish_image()
    client.spin_until(lambda: len(h.policy_answers()) > before + 1, 20, "actions after activate")
    assert client.lifecycle("vla_policy", "deactivate")
    assert client.lifecycle("vla_policy", "cleanup")
    assert client.lifecycle_state("vla_policy") == "unconfigured"
    assert node.alive()

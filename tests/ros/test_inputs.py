"""Message validation and node parameters, without ROS (plain objects stand in for messages)."""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pytest

from ros_nodes.inputs import (
    Limits,
    Rejected,
    check_instruction,
    check_stamp,
    decode_compressed,
    decode_image,
)
from ros_nodes.params import (
    BridgeParams,
    PolicyNodeParams,
    check_bridge_param,
    check_policy_param,
    check_policy_params,
    coerce,
)

LIMITS = Limits(max_side=256, max_instruction_chars=50)


def raw(image: np.ndarray, encoding: str, **kw) -> SimpleNamespace:
    h, w = image.shape[:2]
    fields = dict(
        height=h,
        width=w,
        encoding=encoding,
        is_bigendian=0,
        step=w * image.shape[2] * image.itemsize,
        data=image.tobytes(),
    )
    fields.update(kw)
    return SimpleNamespace(**fields)


def reason(msg, fn=decode_image) -> str:
    with pytest.raises(Rejected) as e:
        fn(msg, LIMITS)
    return e.value.reason


def test_decodes_rgb_bgr_rgba_and_float():
    rgb = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    assert np.array_equal(decode_image(raw(rgb, "rgb8"), LIMITS), rgb)
    assert np.array_equal(decode_image(raw(rgb[..., ::-1].copy(), "bgr8"), LIMITS), rgb)
    rgba = np.concatenate([rgb, np.full((6, 5, 1), 7, np.uint8)], axis=2)
    assert np.array_equal(decode_image(raw(rgba, "rgba8"), LIMITS), rgb)
    floats = rgb.astype(np.float32) / 255.0
    assert np.array_equal(decode_image(raw(floats, "32FC3"), LIMITS), rgb)
    big = floats.astype(">f4")
    assert np.array_equal(decode_image(raw(big, "32FC3", is_bigendian=1), LIMITS), rgb)


def test_row_padding_is_cropped():
    rgb = np.arange(4 * 3 * 3, dtype=np.uint8).reshape(4, 3, 3)
    padded = np.zeros((4, 12), np.uint8)
    padded[:, :9] = rgb.reshape(4, 9)
    msg = SimpleNamespace(
        height=4, width=3, encoding="rgb8", is_bigendian=0, step=12, data=padded.tobytes()
    )
    assert np.array_equal(decode_image(msg, LIMITS), rgb)


def test_rejections_name_the_problem():
    rgb = np.zeros((8, 8, 3), np.uint8)
    assert reason(raw(rgb, "yuv422")) == "bad_encoding"
    assert reason(raw(rgb, "rgb8", data=b"")) == "empty_data"
    assert reason(raw(rgb, "rgb8", data=rgb.tobytes()[:-1])) == "size_mismatch"
    assert reason(raw(rgb, "rgb8", width=9)) == "bad_step"
    assert reason(raw(rgb, "rgb8", height=9)) == "size_mismatch"
    assert reason(raw(rgb, "rgb8", height=100_000, width=100_000)) == "image_too_large"
    assert reason(raw(np.zeros((300, 2, 3), np.uint8), "rgb8")) == "image_too_large"
    assert reason(raw(rgb, "rgb8", height=1)) == "bad_size"
    nan = np.zeros((4, 4, 3), np.float32)
    nan[1, 2, 0] = np.nan
    assert reason(raw(nan, "32FC3")) == "non_finite"
    nan[1, 2, 0] = np.inf
    assert reason(raw(nan, "32FC3")) == "non_finite"


def test_compressed():
    from PIL import Image

    rgb = np.random.default_rng(1).integers(0, 256, (10, 12, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    msg = SimpleNamespace(format="rgb8; png compressed rgb8", data=buf.getvalue())
    assert np.array_equal(decode_compressed(msg, LIMITS), rgb)
    bad = SimpleNamespace(format="png", data=b"not a png at all")
    assert reason(bad, decode_compressed) == "bad_compressed"
    assert reason(SimpleNamespace(format="tiff", data=b"x"), decode_compressed) == "bad_encoding"
    assert reason(SimpleNamespace(format="jpeg", data=b""), decode_compressed) == "empty_data"
    buf = io.BytesIO()
    Image.fromarray(np.zeros((2, 300, 3), np.uint8)).save(buf, format="PNG")
    big = SimpleNamespace(format="png", data=buf.getvalue())
    assert reason(big, decode_compressed) == "image_too_large"


def test_instruction_and_stamp():
    assert check_instruction("  press the button ", LIMITS) == "press the button"
    for text, why in [
        ("", "empty_instruction"),
        ("   \n", "empty_instruction"),
        ("x" * 51, "instruction_too_long"),
        ("a\x00b", "bad_instruction"),
    ]:
        with pytest.raises(Rejected) as e:
            check_instruction(text, LIMITS)
        assert e.value.reason == why
    now = 10**18
    check_stamp(now - 100_000_000, now, 250.0)  # 100 ms old: fine
    for stamp, why in [
        (now - 300_000_000, "stale_image"),
        (0, "stale_image"),
        (now + 10**9, "future_stamp"),
    ]:
        with pytest.raises(Rejected) as e:
            check_stamp(stamp, now, 250.0)
        assert e.value.reason == why


def test_parameters():
    assert check_policy_params(PolicyNodeParams()) == []
    assert coerce(PolicyNodeParams, "budget_ms", 100) == 100.0  # YAML int for a float
    for name, value in [("budget_ms", "fast"), ("autostart", 1), ("qos_depth", 1.5)]:
        with pytest.raises(ValueError, match=name):
            coerce(PolicyNodeParams, name, value)
    with pytest.raises(ValueError, match="unknown parameter"):
        coerce(PolicyNodeParams, "budget", 1.0)
    bad = [
        ("budget_ms", -1.0),
        ("accel", "vla-pruner@0"),
        ("accel", "vla-pruner@1.5"),
        ("accel", "vla-pruner"),
        ("accel", "vla-pruner@0.5+skip2"),
        ("safe_action", "brake"),
        ("control_rate_hz", 0.0),
        ("max_image_age_ms", 0.0),
        ("min_keep_tokens", 0),
        ("qos_reliability", "maybe"),
        ("image_topic", " "),
        ("budget_ms", float("nan")),
    ]
    for name, value in bad:
        assert name in (check_policy_param(name, value) or ""), (name, value)
    assert check_policy_param("twist_topic", "") is None
    errors = check_policy_params(PolicyNodeParams(accel="nope@0.5"))
    assert errors and "unknown pruning method 'nope'" in errors[0]
    assert check_policy_param("accel", "vla-pruner@0.5+cache5+skip[1,2]") is None
    errors = check_policy_params(PolicyNodeParams(budget_relax=0.9, budget_target=0.8))
    assert errors and "budget_relax" in errors[0]
    assert check_bridge_param("rate_hz", 0.0)
    assert check_bridge_param("episodes", 0) is None
    assert BridgeParams().lockstep


def test_run_time_parameter_changes():
    from ros_nodes.params import updated_policy_params

    p = PolicyNodeParams()
    new, why = updated_policy_params(p, {"budget_ms": 80, "safe_action": "zero"}, True)
    assert new.budget_ms == 80.0 and new.safe_action == "zero" and p.budget_ms == 100.0
    for changes, text in [
        ({"budget_ms": -1.0}, "budget_ms"),
        ({"policy": "small-openvla"}, "applies at configure"),
        ({"budget_relax": 0.9}, "budget_relax"),
        ({"safe_action": 3}, "expected str"),
    ]:
        new, why = updated_policy_params(p, changes, True)
        assert new is None and text in why, (changes, why)
    new, _ = updated_policy_params(p, {"policy": "small-openvla"}, False)  # unconfigured: ok
    assert new.policy == "small-openvla"


def test_action_messages_round_trip():
    pytest.importorskip("sensor_msgs", reason="needs the ros extra")
    from builtin_interfaces.msg import Time

    from ros_nodes.actions import build_action_msgs, build_twist, parse_action_stamped, safe_action

    chunk = np.arange(14, dtype=np.float32).reshape(2, 7) / 10
    flat, stamped = build_action_msgs(chunk, Time(sec=3, nanosec=5), "policy")
    assert [d.label for d in flat.layout.dim][0] == "chunk"
    assert [(d.size, d.stride) for d in flat.layout.dim] == [(2, 14), (7, 7)]
    assert np.array_equal(np.asarray(flat.data, np.float32).reshape(2, 7), chunk)
    assert stamped.name[:2] == ["0/dx", "0/dy"] and len(stamped.name) == 14
    stamp, source, back = parse_action_stamped(stamped)
    assert (stamp, source) == (3_000_000_005, "policy")
    assert np.array_equal(back.astype(np.float32), chunk)  # float32 -> float64 is exact

    hold = safe_action("hold", 0.75)
    assert hold.tolist() == [[0, 0, 0, 0, 0, 0, 0.75]]
    assert safe_action("zero", 0.75).tolist() == [[0.0] * 7]
    twist = build_twist(chunk[1], rate_hz=10.0)
    assert twist.linear.x == pytest.approx(7.0) and twist.angular.z == pytest.approx(12.0)
    zero = build_twist(hold[0], rate_hz=10.0)
    assert (zero.linear.x, zero.linear.y, zero.angular.z) == (0.0, 0.0, 0.0)

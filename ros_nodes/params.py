"""Node parameters as dataclasses: defaults, validation with clear errors, run-time changes.

No ROS import here: the nodes declare one ROS parameter per field (the default's type is the
parameter's type) and run `check` on every set, at start-up and at run time.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any

SAFE_ACTIONS = ("hold", "zero")
RELIABILITIES = ("reliable", "best_effort")
INJECT_MODES = ("fixed", "per_token", "per_dit_block")
INFEASIBLE = ("safe", "late")
IMAGE_TRANSPORTS = ("raw", "compressed")
TRIGGERS = ("timer", "image")


@dataclass
class PolicyNodeParams:
    # -- the policy (read at configure) --
    policy: str = "tiny-openvla"  # preset name, shipped checkpoint name or checkpoint directory
    unnorm_key: str = ""  # dataset statistics; "" = the checkpoint's only one / the default
    seed: int = 0  # weights of a preset (random, seeded)
    threads: int = 1  # torch CPU threads
    warmup_steps: int = 2  # untimed steps at configure (lazy init, allocator)
    # Acceleration at the slowest level, in the run-spec grammar (vla_prune/runspec.py):
    # method@keep (keep = visual tokens kept when there is headroom) [+cacheN] [+skip[i,j]]
    # [+compile] [+bf16|+int8]; "dense" = no pruning. The levels the controller walks are
    # built from it at configure (vla_prune/runtime/levels.py): fewer kept tokens down to the
    # floor, faster engines, larger DiT cache intervals, calibrated layer skips; each is timed
    # on a few steps and only the latency / quality front is kept.
    accel: str = "vla-pruner@1.0"
    min_keep_fraction: float = 0.25  # quality floor as a fraction of the visual tokens ...
    min_keep_tokens: int = 1  # ... and as a count: the controller never keeps fewer
    level_engines: str = "auto"  # engines to try: "auto" (fp32/bf16/int8 at or below accel's,
    #   compiled and not), "" (accel's only) or a list like "compile,int8+compile"
    level_cache: str = "auto"  # CogACT DiT cache intervals to try: "auto" (2,3,5), "", "2,5"
    skip_file: str = ""  # `vla-prune calibrate` output: its layers, least influential first
    quality_summary: str = ""  # eval summary.json / episodes.jsonl ranking the levels by success
    level_timing_steps: int = 5  # timed steps per candidate level at configure
    level_min_gain: float = 0.03  # a front level is at least 3 % faster than the one before
    on_infeasible: str = "safe"  # budget below the fastest level's p90: safe (answer misses
    #   with the safe action) | late (act on the late result, frame_id "policy/late")
    # -- latency budget and control --
    budget_ms: float = 100.0  # per-step deadline; 0 = no deadline, no controller
    budget_target: float = 0.85  # the controller aims at this fraction of the budget
    budget_relax: float = 0.6  # ... and relaxes after sustained steps under this fraction
    relax_after_steps: int = 15
    control_rate_hz: float = 10.0
    trigger: str = "timer"  # timer: a step per tick at control_rate_hz | image: per new image
    max_image_age_ms: float = 250.0  # older images (by header stamp) are never acted on
    safe_action: str = "hold"  # hold: zero deltas, keep the gripper | zero: all zeros
    initial_gripper: float = 0.0  # gripper command "hold" keeps before the first action
    # -- inputs --
    image_transport: str = "raw"  # raw: sensor_msgs/Image | compressed: CompressedImage
    max_image_side: int = 1024
    max_instruction_chars: int = 1000
    # -- topics and QoS (read at configure) --
    image_topic: str = "camera/image"
    compressed_image_topic: str = "camera/image/compressed"
    instruction_topic: str = "instruction"
    action_topic: str = "action"  # std_msgs/Float32MultiArray [chunk, 7]
    action_stamped_topic: str = "action_stamped"  # sensor_msgs/JointState, image stamp echoed
    twist_topic: str = ""  # geometry_msgs/Twist for velocity bases; "" = off
    diagnostics_topic: str = "diagnostics"
    reset_topic: str = "policy_reset"  # std_msgs/Empty: new episode
    qos_depth: int = 1
    qos_reliability: str = "reliable"
    diagnostics_period_s: float = 1.0
    latency_window: int = 200  # steps in the latency percentiles
    step_log_path: str = ""  # JSONL, one line per finished policy step; "" = off
    # -- testing --
    inject_delay_ms: float = 0.0  # synthetic slowdown added to every policy step
    # fixed | per_token: scaled by kept / all visual tokens (a bigger LLM) | per_dit_block:
    # scaled by the DiT blocks computed / all (a bigger DiT head: the DiT cache saves it)
    inject_delay_mode: str = "per_token"
    autostart: bool = True  # configure + activate at start (no lifecycle manager needed)


# Changeable while the node is configured; the rest apply at the next configure.
POLICY_RUNTIME = frozenset({
    "budget_ms", "budget_target", "budget_relax", "relax_after_steps", "control_rate_hz",
    "max_image_age_ms", "safe_action", "initial_gripper", "max_image_side",
    "max_instruction_chars", "diagnostics_period_s", "inject_delay_ms", "inject_delay_mode",
    "on_infeasible",
})


@dataclass
class BridgeParams:
    suite: str = "embedded"
    task: str = "press"
    seed: int = 0  # episode i uses env seed `seed + i`
    episodes: int = 1  # 0 = run until stopped
    max_steps: int = 0  # env steps per episode; 0 = the task's limit
    image_size: int = 0  # 0 = the suite's default
    lockstep: bool = True  # step the env only on the action that answers the latest image
    lockstep_timeout_s: float = 5.0  # re-send the image when no answer came (lost message)
    rate_hz: float = 10.0  # free-running mode: env steps per second
    start_delay_s: float = 0.5  # after the policy subscribed, before the first image
    exit_when_done: bool = True
    camera_frame: str = "camera"
    record_path: str = ""  # JSONL of executed actions and episode results; "" = off
    image_topic: str = "camera/image"
    instruction_topic: str = "instruction"
    action_stamped_topic: str = "action_stamped"
    reset_topic: str = "policy_reset"
    status_topic: str = "episode_status"
    qos_depth: int = 1
    qos_reliability: str = "reliable"


def _fail(name: str, value: Any, need: str) -> str:
    return f"parameter {name}={value!r}: {need}"


def check_policy_param(name: str, value: Any) -> str | None:
    """None if `value` is valid for `name`, else the reason (one line)."""
    positive = {"control_rate_hz", "diagnostics_period_s", "max_image_age_ms"}
    if name == "accel":
        try:
            accel_spec(value)
        except ValueError as e:  # the grammar's own message: names the spec and the fault
            return f"parameter accel: {e}"
    if name == "level_engines":
        from vla_prune.runtime.levels import parse_engines  # lazy: the bridge needs no vla_prune

        try:
            parse_engines(value)
        except ValueError as e:
            return f"parameter level_engines: {e}"
    if name == "level_cache":
        from vla_prune.runtime.levels import parse_ints

        try:
            parse_ints(value, "level_cache")
        except ValueError as e:
            return f"parameter {e}"
    if name == "min_keep_fraction" and not (0.0 <= value <= 1.0):
        return _fail(name, value, "must be in [0, 1]")
    if name == "level_min_gain" and not (0.0 <= value < 1.0):
        return _fail(name, value, "must be in [0, 1)")
    if name == "on_infeasible" and value not in INFEASIBLE:
        return _fail(name, value, f"must be one of {INFEASIBLE}")
    if name in positive and not (value > 0 and math.isfinite(value)):
        return _fail(name, value, "must be a finite number > 0")
    if name in ("budget_ms", "inject_delay_ms") and not (
        value >= 0 and math.isfinite(value)
    ):
        return _fail(name, value, "must be a finite number >= 0")
    if name == "budget_target" and not (0.0 < value <= 1.0):
        return _fail(name, value, "must be in (0, 1]")
    if name == "budget_relax" and not (0.0 < value < 1.0):
        return _fail(name, value, "must be in (0, 1)")
    if name in ("min_keep_tokens", "threads", "max_image_side", "max_instruction_chars",
                "qos_depth", "latency_window", "relax_after_steps", "level_timing_steps") and (
        value < 1
    ):
        return _fail(name, value, "must be >= 1")
    if name == "warmup_steps" and value < 0:
        return _fail(name, value, "must be >= 0")
    if name == "safe_action" and value not in SAFE_ACTIONS:
        return _fail(name, value, f"must be one of {SAFE_ACTIONS}")
    if name == "qos_reliability" and value not in RELIABILITIES:
        return _fail(name, value, f"must be one of {RELIABILITIES}")
    if name == "inject_delay_mode" and value not in INJECT_MODES:
        return _fail(name, value, f"must be one of {INJECT_MODES}")
    if name == "trigger" and value not in TRIGGERS:
        return _fail(name, value, f"must be one of {TRIGGERS}")
    if name == "image_transport" and value not in IMAGE_TRANSPORTS:
        return _fail(name, value, f"must be one of {IMAGE_TRANSPORTS}")
    if name == "initial_gripper" and not math.isfinite(value):
        return _fail(name, value, "must be finite")
    if name == "policy" and not value.strip():
        return _fail(name, value, "must not be empty")
    if name.endswith("_topic") and name != "twist_topic" and not value.strip():
        return _fail(name, value, "must not be empty")
    return None


def check_policy_params(p: PolicyNodeParams) -> list[str]:
    """Every problem with a full parameter set, including cross-field ones."""
    errors = [e for f in fields(p) if (e := check_policy_param(f.name, getattr(p, f.name)))]
    if not errors and p.budget_relax >= p.budget_target:
        errors.append(
            f"budget_relax ({p.budget_relax}) must be below budget_target ({p.budget_target})"
        )
    return errors


def accel_spec(accel: str):
    """The `accel` parameter parsed by the one run-spec grammar (ValueError if malformed)."""
    from vla_prune.runspec import bad_spec, parse_run_spec

    spec = parse_run_spec(accel)
    if spec.skip_count is not None:
        raise bad_spec(accel, "the node runs the layers it is told: skip[i,j] from calibrate")
    if spec.blind or spec.ensemble:
        raise bad_spec(accel, "blind / ensemble are evaluation settings, not node levels")
    return spec


def check_bridge_param(name: str, value: Any) -> str | None:
    if name in ("episodes", "max_steps", "image_size", "seed") and value < 0:
        return _fail(name, value, "must be >= 0")
    if name in ("rate_hz", "lockstep_timeout_s") and not (value > 0 and math.isfinite(value)):
        return _fail(name, value, "must be a finite number > 0")
    if name == "start_delay_s" and not value >= 0:
        return _fail(name, value, "must be >= 0")
    if name == "qos_depth" and value < 1:
        return _fail(name, value, "must be >= 1")
    if name == "qos_reliability" and value not in RELIABILITIES:
        return _fail(name, value, f"must be one of {RELIABILITIES}")
    if name.endswith("_topic") and not value.strip():
        return _fail(name, value, "must not be empty")
    return None


def updated_policy_params(
    p: PolicyNodeParams, changes: dict[str, Any], configured: bool
) -> tuple[PolicyNodeParams | None, str]:
    """`p` with run-time `changes` applied, or (None, reason) if any change is refused."""
    new = dataclasses.replace(p)
    for name, value in changes.items():
        try:
            value = coerce(PolicyNodeParams, name, value)
        except ValueError as e:
            return None, str(e)
        if (err := check_policy_param(name, value)) is not None:
            return None, err
        if configured and name not in POLICY_RUNTIME:
            return None, f"{name} applies at configure: deactivate and clean up first"
        setattr(new, name, value)
    if new.budget_relax >= new.budget_target:
        return None, "budget_relax must be below budget_target"
    return new, ""


def coerce(cls: type, name: str, value: Any) -> Any:
    """`value` as the field's type (ints are fine for floats), or ValueError naming the field."""
    kinds = {f.name: type(f.default) for f in dataclasses.fields(cls)}
    if name not in kinds:
        raise ValueError(f"unknown parameter {name!r}; known: {sorted(kinds)}")
    kind = kinds[name]
    ok = (
        isinstance(value, bool) if kind is bool
        else isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float
        else isinstance(value, int) and not isinstance(value, bool) if kind is int
        else isinstance(value, str)
    )
    if not ok:
        raise ValueError(
            f"parameter {name}={value!r}: expected {kind.__name__}, got {type(value).__name__}"
        )
    return float(value) if kind is float else value


def declare(node: Any, cls: type) -> Any:
    """Declare one ROS parameter per dataclass field (overrides from --params-file apply) and
    return the dataclass filled with the coerced values. Types are checked by `coerce`, so a
    YAML `budget_ms: 100` (an int) is as good as `100.0`."""
    from rcl_interfaces.msg import ParameterDescriptor

    values = {}
    for f in dataclasses.fields(cls):
        desc = ParameterDescriptor(dynamic_typing=True)
        value = node.declare_parameter(f.name, f.default, desc).value
        values[f.name] = coerce(cls, f.name, value)
    return cls(**values)


def qos(depth: int, reliability: str, latched: bool = False) -> Any:
    """A rclpy QoSProfile; `latched` (transient local) gives late joiners the last message."""
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy

    profile = QoSProfile(depth=depth)
    profile.reliability = (
        ReliabilityPolicy.RELIABLE if reliability == "reliable" else ReliabilityPolicy.BEST_EFFORT
    )
    if latched:
        profile.durability = DurabilityPolicy.TRANSIENT_LOCAL
    return profile

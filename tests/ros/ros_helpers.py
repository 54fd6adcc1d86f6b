"""Helpers of the ROS tests: node processes, a client node in the test process, policies.

Network rule (mandatory on these machines): every ROS process runs with Fast DDS on shared
memory (FASTDDS_BUILTIN_TRANSPORTS=SHM) and discovery limited to this host
(ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST); each test gets its own ROS_DOMAIN_ID and ROS_HOME.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import yaml

from ros_nodes.launcher import LOCAL_ONLY

REPO = Path(__file__).resolve().parents[2]
PARAMS = REPO / "configs" / "ros" / "policy_node.yaml"
NETWORK_RULE = LOCAL_ONLY  # the launcher's environment: SHM transport, localhost discovery
_DOMAINS = itertools.count()


def next_domain_id() -> int:
    """Distinct per test in this run, and spread by pid across concurrent runs (1..100)."""
    return 1 + (os.getpid() * 7 + next(_DOMAINS)) % 100


@dataclasses.dataclass
class RosEnv:
    domain_id: int
    home: Path
    env: dict[str, str]


# Tests try only the levers they exercise: the shipped "auto" would compile the decode for
# three weight formats at every configure (tens of seconds per test on a 2-core machine).
TEST_POLICY_DEFAULTS = {"level_engines": "", "level_cache": ""}


def write_params(path: Path, policy: dict | None = None, bridge: dict | None = None) -> Path:
    """configs/ros/policy_node.yaml with TEST_POLICY_DEFAULTS and overrides, written to `path`."""
    data = yaml.safe_load(PARAMS.read_text())
    data["vla_policy"]["ros__parameters"].update({**TEST_POLICY_DEFAULTS, **(policy or {})})
    data["vla_sim_bridge"]["ros__parameters"].update(bridge or {})
    path.write_text(yaml.safe_dump(data))
    return path


class Proc:
    """A child process (node or launcher) with its output in a log file."""

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path):
        self.log = log
        self._out = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(cmd, env=env, stdout=self._out, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout=timeout)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGINT (clean rclpy shutdown), SIGKILL if it hangs; returns the exit code."""
        if self.alive():
            self.popen.send_signal(signal.SIGINT)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._out.close()
        return self.popen.returncode

    def tail(self, n: int = 40) -> str:
        if not self._out.closed:  # after stop() the log is closed (and complete)
            self._out.flush()
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


class Client:
    """An rclpy node in the test process, in its own context (its own domain)."""

    def __init__(self, domain_id: int):
        import rclpy
        from rclpy.executors import SingleThreadedExecutor

        self.rclpy = rclpy
        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=domain_id)
        self.node = rclpy.create_node("test_client", context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)

    def spin_for(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.executor.spin_once(timeout_sec=min(0.02, max(end - time.monotonic(), 0.0)))

    def spin_until(self, cond: Callable[[], bool], timeout: float, what: str = "") -> None:
        end = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > end:
                raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
            self.executor.spin_once(timeout_sec=0.02)

    def call(self, srv_type, name: str, request, timeout: float = 10.0):
        """Call a service and wait for the answer."""
        cli = self.node.create_client(srv_type, name)
        self.spin_until(cli.service_is_ready, timeout, f"service {name}")
        future = cli.call_async(request)
        self.spin_until(future.done, timeout, f"answer of {name}")
        self.node.destroy_client(cli)
        return future.result()

    def set_params(self, node: str, **values):
        """Set parameters of `node`; returns the SetParametersResult list."""
        from rcl_interfaces.srv import SetParameters
        from rclpy.parameter import Parameter

        req = SetParameters.Request(
            parameters=[Parameter(k, value=v).to_parameter_msg() for k, v in values.items()]
        )
        return self.call(SetParameters, f"/{node}/set_parameters", req).results

    def lifecycle(self, node: str, transition: str) -> bool:
        """Trigger a lifecycle transition ("deactivate", "activate", ...) of `node`."""
        from lifecycle_msgs.msg import Transition
        from lifecycle_msgs.srv import ChangeState

        tid = getattr(Transition, f"TRANSITION_{transition.upper()}")
        req = ChangeState.Request(transition=Transition(id=tid))
        return self.call(ChangeState, f"/{node}/change_state", req).success

    def lifecycle_state(self, node: str) -> str:
        from lifecycle_msgs.srv import GetState

        return self.call(GetState, f"/{node}/get_state", GetState.Request()).current_state.label

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=1.0)
        self.node.destroy_node()
        self.rclpy.try_shutdown(context=self.context)


def launcher_cmd(params: Path, domain_id: int) -> list[str]:
    """`python -m ros_nodes.launcher` (policy node + sim bridge) for a params file."""
    import sys

    return [
        sys.executable,
        "-m",
        "ros_nodes.launcher",
        "--params",
        str(params),
        "--domain-id",
        str(domain_id),
    ]


def image_msg(image: np.ndarray, stamp, encoding: str = "rgb8"):
    from sensor_msgs.msg import Image

    msg = Image(
        height=image.shape[0],
        width=image.shape[1],
        encoding=encoding,
        step=image.shape[1] * image.shape[2] * image.itemsize,
    )
    msg.data = np.ascontiguousarray(image).tobytes()
    msg.header.stamp = stamp
    return msg


def save_policy(policy, path: Path) -> Path:
    policy.save(path)
    return path


def micro_policy(seed: int = 0):
    """A 64-patch, 2-layer OpenVLA-shaped policy (~10 ms a step): fast soak and fuzz runs."""
    import torch

    from vla_prune import Policy
    from vla_prune.models.arch import VLAConfig
    from vla_prune.models.openvla import identity_stats
    from vla_prune.models.presets import SMALL_TOKENIZER_VOCAB, _dino, _siglip, _small_llm
    from vla_prune.models.prismatic import OpenVLAModel
    from vla_prune.models.tokenizer import build_word_tokenizer

    cfg = VLAConfig(
        name="micro-openvla",
        dino=dataclasses.replace(_dino(32, 1, 2), image_size=112),
        siglip=dataclasses.replace(_siglip(32, 1, 2), image_size=112),
        llm=_small_llm(64, 2, 2, SMALL_TOKENIZER_VOCAB),
        tokenizer_vocab_size=SMALL_TOKENIZER_VOCAB,
        max_length=512,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = OpenVLAModel(cfg)
    tok = build_word_tokenizer(cfg.tokenizer_vocab_size, cfg.n_action_bins)
    return Policy(model, tok, {"identity": identity_stats(cfg.action_dim)})


def scrambled_tiny_policy(seed: int = 0):
    """tiny-openvla with large random LLM/projector weights (tests/conftest.py tiny_policy):
    a freshly initialized tiny LLM emits the same token for every input, these vary."""
    from tests.conftest import tiny_policy

    return tiny_policy(seed)


@dataclasses.dataclass
class Answer:
    received: float  # time.monotonic()
    stamp: int  # header stamp (ns): the image answered, or the publish time
    source: str  # "policy" or "safe/<reason>"
    actions: np.ndarray  # [chunk, 7]


class Harness:
    """The policy node's counterpart in the test process: a camera publishing one image at a
    fixed rate with fresh stamps, the instruction, and recorders of actions and diagnostics."""

    def __init__(self, client: Client, image_depth: int = 1):
        from diagnostic_msgs.msg import DiagnosticArray
        from sensor_msgs.msg import Image, JointState
        from std_msgs.msg import String

        from ros_nodes.params import qos

        node = client.node
        self.client = client
        self.image_pub = node.create_publisher(Image, "camera/image", qos(image_depth, "reliable"))
        self.instruction_pub = node.create_publisher(
            String, "instruction", qos(1, "reliable", latched=True)
        )
        self.answers: list[Answer] = []
        self.diag: dict[str, dict[str, str]] = {}
        self.status: dict[str, tuple[int, str]] = {}  # status suffix -> (level, message)
        self.sent: dict[int, float] = {}  # image stamp -> send time
        depth = qos(100, "reliable")
        node.create_subscription(JointState, "action_stamped", self._on_action, depth)
        node.create_subscription(DiagnosticArray, "diagnostics", self._on_diag, 10)
        self._camera = None
        self.image = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)

    def _on_action(self, msg) -> None:
        from ros_nodes.actions import parse_action_stamped

        stamp, source, actions = parse_action_stamped(msg)
        self.answers.append(Answer(time.monotonic(), stamp, source, actions))

    def _on_diag(self, msg) -> None:
        from ros_nodes.diagnostics import diagnostic_values

        self.diag = diagnostic_values(msg)
        self.status = {
            s.name.rsplit(": ", 1)[-1]: (int.from_bytes(s.level, "little"), s.message)
            for s in msg.status
        }

    def value(self, status: str, key: str, default: float = 0.0) -> float:
        v = self.diag.get(status, {}).get(key)
        return default if v is None else float(v)

    def wait_active(self, timeout: float = 60.0) -> None:
        self.client.spin_until(
            lambda: (
                self.diag.get("control", {}).get("state") == "active"
                and self.image_pub.get_subscription_count() > 0
            ),
            timeout,
            "the policy node to be active",
        )

    def instruct(self, text: str = "press the green button") -> None:
        from std_msgs.msg import String

        self.instruction_pub.publish(String(data=text))

    def publish_image(self, image: np.ndarray | None = None) -> int:
        from ros_nodes.actions import stamp_ns

        msg = image_msg(self.image if image is None else image, self.now())
        stamp = stamp_ns(msg.header.stamp)
        self.sent[stamp] = time.monotonic()
        self.image_pub.publish(msg)
        return stamp

    def start_camera(self, rate_hz: float) -> None:
        self._camera = self.client.node.create_timer(1.0 / rate_hz, self.publish_image)

    def stop_camera(self) -> None:
        if self._camera is not None:
            self.client.node.destroy_timer(self._camera)
            self._camera = None

    def now(self):
        return self.client.node.get_clock().now().to_msg()

    def policy_answers(self) -> list[Answer]:
        return [a for a in self.answers if a.source == "policy"]

    def image_answers(self) -> list[Answer]:
        """Answers to images this harness sent (not ticks without a fresh image)."""
        return [a for a in self.answers if a.stamp in self.sent]

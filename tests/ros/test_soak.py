"""Soak: >= 2000 closed-loop steps (launcher: policy node + lock-step bridge, many episodes);
the policy node's resident memory grows by less than 5 % after warm-up; SIGTERM stops all."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

pytest.importorskip("rclpy", reason="needs the ros extra: pip install -e '.[ros]'")
pytest.importorskip("mujoco", reason="needs the sim extra: pip install -e '.[sim]'")

from ros_helpers import Harness, Proc, launcher_cmd, write_params  # noqa: E402

pytestmark = [pytest.mark.ros, pytest.mark.sim, pytest.mark.slow]

WARMUP_STEPS = 300
STEPS = 2000
# ~25 s here (~85 lock-step steps/s); the timeout only matters when the test fails.
SOAK_TIMEOUT_S = 600


def children(pid: int) -> dict[str, int]:
    """{"policy": pid, "bridge": pid} of the launcher's child processes."""
    out = {}
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        for name, module in (("policy", "policy_node"), ("bridge", "sim_bridge")):
            if f"ros_nodes.{module}" in cmdline:
                out[name] = int(child)
    return out


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def test_soak_memory_and_clean_shutdown(ros_env, client, micro_checkpoint, tmp_path):
    params = write_params(
        tmp_path / "params.yaml",
        policy=dict(
            policy=str(micro_checkpoint),
            trigger="image",
            budget_ms=200.0,
            max_image_age_ms=5000.0,
            diagnostics_period_s=0.5,
        ),
        bridge=dict(task="press", episodes=0, lockstep=True, start_delay_s=0.05),
    )
    cmd = launcher_cmd(params, ros_env.domain_id)
    launcher = Proc(cmd, ros_env.env, tmp_path / "launcher.log")
    try:
        h = Harness(client)  # only to read the diagnostics
        steps = lambda: h.value("control", "steps")  # noqa: E731
        client.spin_until(lambda: steps() >= WARMUP_STEPS, 120, f"{WARMUP_STEPS} steps")
        pids = children(launcher.pid)
        assert set(pids) == {"policy", "bridge"}, pids
        base, t0, n0 = rss_kb(pids["policy"]), time.monotonic(), steps()
        client.spin_until(lambda: steps() >= STEPS, SOAK_TIMEOUT_S, f"{STEPS} steps")
        final = rss_kb(pids["policy"])
        rate = (steps() - n0) / (time.monotonic() - t0)
        growth = (final - base) / base
        print(
            f"policy RSS {base / 1024:.1f} -> {final / 1024:.1f} MiB ({growth:+.2%}) over "
            f"{steps() - n0:.0f} steps at {rate:.0f} steps/s"
        )
        assert growth < 0.05
        assert h.value("control", "deadline_misses") <= 0.01 * steps()

        launcher.popen.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=30) == 0, launcher.tail()
        for pid in pids.values():
            assert (
                not Path(f"/proc/{pid}").exists()
                or "zombie" in Path(f"/proc/{pid}/status").read_text()
            )
    finally:
        launcher.stop()

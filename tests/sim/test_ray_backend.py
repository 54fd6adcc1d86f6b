"""`vla-prune eval --backend ray` on a local 2-CPU Ray (loopback only, no dashboard): the same
records as the local backend, batched or not; killed workers and a killed driver lose and double
nothing."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("mujoco")
ray = pytest.importorskip("ray")

from sim.eval import EvalConfig, parse_runs, read_episodes, run_eval  # noqa: E402
from sim.eval.config import RunConfig  # noqa: E402
from sim.eval.ray_backend import ACTOR_PREFIX, WorkQueue, run_eval_ray  # noqa: E402
from sim.eval.records import EPISODES_FILE, episode_key  # noqa: E402
from vla_prune_cli.main import main  # noqa: E402

pytestmark = pytest.mark.sim

REPO = Path(__file__).resolve().parents[2]
TIMINGS = ("latency_ms", "step_ms", "wall_s")  # the only fields that may differ between runs
# A real policy (varied actions), a random pruner (per-slot random streams) and CogACT
# (continuous actions, per-slot noise and ensemble): where a batched slot could go wrong.
RUNS = (
    *parse_runs("dense,vla-pruner@0.25,random@0.25"),
    RunConfig("cogact", policy="embedded-cogact", ensemble=True),
)


def small_config(out: Path, **kw) -> EvalConfig:
    base = dict(
        policy="embedded-openvla",
        unnorm_key="embedded",
        tasks=("press", "push"),
        episodes=2,
        seed=0,
        max_steps=8,
        warmup=0,
        threads=1,
        runs=RUNS,
        out=str(out),
    )
    return EvalConfig(**{**base, **kw})


def ray_config(out: Path, **kw) -> EvalConfig:
    return small_config(out, backend="ray", workers=2, **kw)


def without_timings(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in records]


def by_key(records: list[dict]) -> dict[tuple, dict]:
    return {episode_key(r): r for r in without_timings(records)}


@pytest.fixture(scope="module")
def cluster():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            object_store_memory=100 * 2**20,
            log_to_driver=False,
        )
        try:
            yield ray.get_runtime_context().gcs_address
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def local(tmp_path_factory) -> list[dict]:
    """The local backend's records: what every Ray run below must reproduce."""
    out = tmp_path_factory.mktemp("ray") / "local"
    run_eval(small_config(out), progress=False)
    return read_episodes(out / EPISODES_FILE)


def step_totals(records: list[dict], label: str, task: str) -> list[list[float]]:
    return [r["step_ms"]["total"] for r in records if (r["label"], r["task"]) == (label, task)]


def live_workers() -> list[str]:
    return [n for n in ray.util.list_named_actors() if n.startswith(ACTOR_PREFIX)]


# -- same answers everywhere ------------------------------------------------------------------


def test_ray_run_equals_local_record_for_record(cluster, local, tmp_path):
    out = tmp_path / "ray"
    summary = run_eval_ray(ray_config(out), progress=False)
    got = read_episodes(out / EPISODES_FILE)
    assert without_timings(got) == without_timings(local)  # every field, in the same order
    assert len({r["actions_hash"] for r in got}) == len(got)  # the hash tells rollouts apart
    assert summary["paired"] and len(summary["runs"]) == len(RUNS)
    assert not live_workers()  # the driver's actors are gone with it


def test_batched_waves_equal_one_env_per_worker(cluster, local, tmp_path):
    """Every field equal, but CogACT's actions hash: its actions are the DiT's floats, and a
    batched prefill (B x T rows, a padding mask) rounds differently from B = 1 in the last fp32
    bits on some CPUs (~1e-7 in an action on this session's AMD EPYC host; earlier hosts
    matched bit for bit) — the BLAS picks its blocking by row count. Discrete tokens absorb
    that; the frames (obs_hash) and outcomes must still be identical."""
    out = tmp_path / "b4"
    run_eval_ray(ray_config(out, envs_per_worker=4), progress=False)
    got = read_episodes(out / EPISODES_FILE)
    assert by_key(got).keys() == by_key(local).keys()
    for key, want in by_key(local).items():
        have = by_key(got)[key]
        if want["label"] == "cogact":
            have, want = (
                {k: v for k, v in r.items() if k != "actions_hash"} for r in (have, want)
            )
        assert have == want, key
    # They really were batched: a wave (one task's episodes of one configuration) shares each
    # step_batch call's timings; separate calls don't.
    for run in RUNS:
        for task in ("press", "push"):
            a, b = step_totals(got, run.label, task)
            assert a == b
    a, b = step_totals(local, "dense", "press")
    assert a != b


# -- nothing lost, nothing doubled ------------------------------------------------------------


def test_killed_workers_episodes_rerun_exactly_once(cluster, tmp_path, caplog):
    """Every worker is killed (ray.kill) when the first episode arrives: each was mid-episode,
    since each wave pairs a short episode with one >= 10 steps longer."""
    kw = dict(tasks=("press",), episodes=4, seed=2, max_steps=None, runs=parse_runs("dense"))
    run_eval(small_config(tmp_path / "local", **kw), progress=False)
    ref = read_episodes(tmp_path / "local" / EPISODES_FILE)
    steps = [r["steps"] for r in ref]
    assert abs(steps[0] - steps[1]) >= 10 and abs(steps[2] - steps[3]) >= 10, steps

    killed = []

    def kill_every_worker(record):
        if not killed:
            killed.extend(live_workers())
            for name in killed:
                ray.kill(ray.get_actor(name))

    out = tmp_path / "killed"
    cfg = ray_config(out, envs_per_worker=2, max_retries=2, **kw)
    with caplog.at_level(logging.WARNING, logger="sim.eval.ray_backend"):
        run_eval_ray(cfg, progress=False, on_episode=kill_every_worker)
    assert len(killed) == 2
    requeued = [r.args[2] for r in caplog.records if "back in the queue" in r.getMessage()]
    assert len(requeued) == 2 and sum(requeued) >= 2  # both mid-wave: re-run by replacements
    lines = (out / EPISODES_FILE).read_text().splitlines()
    got = [json.loads(line) for line in lines]
    assert [episode_key(r) for r in got] == [episode_key(r) for r in ref]  # each exactly once
    assert without_timings(got) == without_timings(ref)


def test_killed_driver_resumes_without_duplicates(cluster, local, tmp_path):
    """A CLI driver on the same cluster is SIGKILLed mid-run; a rerun finishes the file."""
    out = tmp_path / "driver"
    eval_yaml = tmp_path / "eval.yaml"  # exactly the in-process rerun's configuration
    eval_yaml.write_text(json.dumps(ray_config(out).to_dict()))  # JSON is YAML
    argv = ["eval", "--eval-config", str(eval_yaml), "--ray-address", cluster, "--quiet"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "MUJOCO_GL": "egl"}
    code = f"import sys; from vla_prune_cli.main import main; sys.exit(main({argv!r}))"
    driver = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env)
    path = out / EPISODES_FILE
    deadline = time.monotonic() + 120
    while not (path.exists() and path.read_bytes().count(b"\n") >= 3):
        assert driver.poll() is None, "the driver ended before it could be killed"
        assert time.monotonic() < deadline, "the driver wrote no episodes in 120 s"
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    before = path.read_bytes().count(b"\n")
    assert 3 <= before < len(local)
    with open(path, "a") as f:  # as if killed in the middle of a write: a torn line
        f.write('{"label": "dense", "task": "pu')

    run_eval_ray(ray_config(out), progress=False)  # resumes: the same OUT, the same episodes
    got = [json.loads(line) for line in path.read_text().splitlines()]
    assert without_timings(got) == without_timings(local)  # nothing lost, nothing doubled
    lines = path.read_text()
    run_eval_ray(ray_config(out), progress=False)  # all done: nothing runs, nothing changes
    assert path.read_text() == lines


# -- the queue and the command line -----------------------------------------------------------


def test_waves_are_one_task_of_one_configuration_and_retries_are_counted():
    runs = parse_runs("a=dense,b=fastv@0.25")
    cfg = EvalConfig(
        tasks=("press", "push"),
        episodes=3,
        runs=runs,
        backend="ray",
        envs_per_worker=2,
        max_retries=1,
    )
    queue = WorkQueue(cfg, done={("a", "press", 0)})
    waves = []
    while (wave := queue.next_wave()) is not None:
        waves.append(wave)
    assert waves == [
        ("b", [("press", 0), ("press", 1)]),  # b's head comes first in the local order
        ("a", [("press", 1), ("press", 2)]),
        ("b", [("press", 2)]),  # a task's last episodes: a shorter wave, never mixed tasks
        ("a", [("push", 0), ("push", 1)]),
        ("b", [("push", 0), ("push", 1)]),
        ("a", [("push", 2)]),
        ("b", [("push", 2)]),
    ]
    assert queue.give_back("a", [("push", 0), ("push", 1)]) == 2
    assert queue.next_wave() == ("a", [("push", 0), ("push", 1)])  # first in line again
    assert queue.give_back("a", [("push", 1)]) == 0  # its second loss: out of retries
    assert queue.lost == [("a", "push", 1)] and len(queue) == 0


def test_cli_backend_flags(tmp_path, capsys, monkeypatch):
    argv = ["eval", "--policy", "tiny-openvla", "--tasks", "press", "--out", str(tmp_path)]
    assert main([*argv, "--envs-per-worker", "2"]) == 2
    assert "needs backend ray" in capsys.readouterr().err
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "ray" else find_spec(name, *a)
    )
    assert main([*argv, "--backend", "ray"]) == 2  # the main job never needs Ray
    assert "pip install -e '.[ray]'" in capsys.readouterr().err

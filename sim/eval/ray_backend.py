"""`vla-prune eval --backend ray`: an eval's episodes on Ray actors; this process alone writes.

The unit of work is one episode (configuration, task, seed). The driver (this process) hands
each idle worker a *wave*: up to `envs_per_worker` queued episodes of one configuration, which
the worker runs in lockstep (`sim.eval.runner.run_wave`: one `step_batch` call per control
step) and streams back one record per finished episode. Workers are Ray actors that load each
policy once and keep it, and their envs, across configurations and episodes (configure + per-slot
reset per episode). Records are built by the same code as the local backend's, so they are the
same record for record, timings aside.

Nothing lost, nothing doubled:
- the driver is the only writer of OUT/episodes.jsonl (EpisodeWriter: one fsynced line per
  finished episode) and never queues an episode the file holds, so a killed driver resumes;
- a worker that dies (crash, `ray.kill`, node loss) loses only the episodes of its wave that it
  had not streamed back. They go back to the front of the queue, for whichever worker is idle
  next, at most `max_retries` times each; a replacement worker is started. The run finishes,
  then names any episode that ran out of retries (a rerun tries it again);
- actors have max_restarts=0, max_task_retries=0: Ray itself never re-runs a wave (that would
  stream its records a second time).
When the run is complete the file is rewritten, atomically, in the local backend's order.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sim.eval.config import EvalConfig
from sim.eval.parallel import _merge as write_in_run_order
from sim.eval.records import EPISODES_FILE, EpisodeWriter, episode_key
from sim.eval.runner import (
    EvalPolicies,
    Progress,
    _open_out,
    _resolve,
    env_kwargs,
    episode_record,
    run_wave,
    save_video,
    video_fps,
    video_stem,
)
from sim.eval.summary import report

log = logging.getLogger(__name__)

ACTOR_PREFIX = "vla-eval"
WAIT_LOG_S = 60.0  # a driver waiting this long on its workers says so

Episode = tuple[str, int]  # (task, seed) of one configuration
Video = tuple[str, bytes]  # (file suffix, encoded bytes): the driver writes it under OUT


def import_ray():
    try:
        import ray
    except ImportError as e:
        raise ImportError(f"--backend ray needs Ray: pip install -e '.[ray]' ({e})") from e
    return ray


# -- the worker ------------------------------------------------------------------------------


class EvalWorker:
    """A worker actor: its policies (EvalPolicies) and one env per batch slot, kept across
    waves. Only the driver writes; a worker returns records."""

    def __init__(self, cfg: EvalConfig):
        import torch

        logging.basicConfig(level=logging.WARNING)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.cfg = cfg
        self.runs = {r.label: r for r in cfg.runs}
        self.policies = EvalPolicies(cfg)
        self.env_kw = env_kwargs(cfg)
        self.envs: list[tuple[str, Any]] = []  # (task, env) per batch slot

    def where(self) -> str:
        return f"{socket.gethostname()} pid {os.getpid()}"

    def run(
        self, label: str, episodes: list[Episode]
    ) -> Iterator[tuple[dict[str, Any], Video | None]]:
        """One wave; yields (record, video or None) as each of its episodes ends."""
        run = self.runs[label]
        envs = self._envs([task for task, _ in episodes])
        seeds = [seed for _, seed in episodes]
        limits = [self.cfg.max_steps or env.max_episode_steps for env in envs]
        policy = self.policies.configured(run, envs[0], seeds[0])
        for slot, ep in run_wave(policy, envs, seeds, limits, self.cfg.video, run.blind):
            frames = ep.pop("frames")
            video = encode_video(frames, video_fps(envs[slot])) if frames else None
            task, seed = episodes[slot]
            yield episode_record(self.cfg, run, task, seed, ep, None), video

    def _envs(self, tasks: list[str]) -> list:
        """An env per slot of the wave; all of them rebuilt when a slot's task changes."""
        from sim.envs import make_env

        if [task for task, _ in self.envs[: len(tasks)]] != tasks:
            # Close them all before making any: a MuJoCo renderer closed while another env's GL
            # context is current frees that env's GL objects, and it then renders garbage.
            for _, env in self.envs:
                env.close()
            self.envs = [(task, make_env(self.cfg.suite, task, **self.env_kw)) for task in tasks]
        return [env for _, env in self.envs[: len(tasks)]]


def encode_video(frames: list, fps: float) -> Video:
    """The episode's video as bytes: the worker may be on another machine than OUT."""
    with tempfile.TemporaryDirectory() as tmp:
        path = save_video(frames, Path(tmp) / "episode", fps)
        return path.suffix, path.read_bytes()


# -- the queue -------------------------------------------------------------------------------


class WorkQueue:
    """Episodes not on disk yet, per configuration in (task, seed) order, handed out as waves.

    The next wave is up to `envs_per_worker` episodes of one configuration and one task: the
    configuration whose next episode comes first in the local backend's order, so
    configurations advance together and a run cut short stays nearly paired."""

    def __init__(self, cfg: EvalConfig, done: set[tuple[str, str, int]]):
        episodes = [(t, s) for t in cfg.tasks for s in cfg.seeds]
        self.rank = {ep: i for i, ep in enumerate(episodes)}
        self.pending = {
            r.label: deque(ep for ep in episodes if (r.label, *ep) not in done) for r in cfg.runs
        }
        self.width, self.max_retries = cfg.envs_per_worker, cfg.max_retries
        self.attempts: Counter[tuple[str, str, int]] = Counter()
        self.lost: list[tuple[str, str, int]] = []  # out of retries

    def __len__(self) -> int:
        return sum(len(q) for q in self.pending.values())

    def next_wave(self) -> tuple[str, list[Episode]] | None:
        heads = [(self.rank[q[0]], i, lb) for i, (lb, q) in enumerate(self.pending.items()) if q]
        if not heads:
            return None
        label = min(heads)[2]
        queue, wave = self.pending[label], []
        # One task per wave: one prompt length, so no slot is left-padded (padding changes a
        # batched step in the last bit, which a continuous head like CogACT's shows).
        while queue and len(wave) < self.width and queue[0][0] == (wave or queue)[0][0]:
            wave.append(queue.popleft())
        return label, wave

    def give_back(self, label: str, episodes: list[Episode]) -> int:
        """A dead worker's unfinished episodes go first in line, unless out of retries."""
        retry = []
        for ep in episodes:
            key = (label, *ep)
            self.attempts[key] += 1
            if self.attempts[key] > self.max_retries:
                self.lost.append(key)
            else:
                retry.append(ep)
        self.pending[label].extendleft(reversed(retry))
        return len(retry)


# -- the driver ------------------------------------------------------------------------------


@dataclass
class Seat:
    """One worker actor and what it is doing: starting (`ready` pending), idle, or a wave."""

    actor: Any
    name: str
    ready: Any  # ObjectRef of its first call, None once it answered
    label: str = ""
    wave: list[Episode] = field(default_factory=list)
    stream: Any = None  # ObjectRefGenerator of the running wave
    received: set[Episode] = field(default_factory=set)

    def unfinished(self) -> list[Episode]:
        return [ep for ep in self.wave if ep not in self.received]


class WorkerPool:
    """`size` worker actors, replaced when they die (at most `max_deaths` times in all)."""

    def __init__(self, ray, cfg: EvalConfig, size: int):
        self.ray, self.cfg = ray, cfg
        self.actor_class = ray.remote(EvalWorker)
        self.options = dict(
            num_cpus=cfg.cpus_per_worker,
            num_gpus=cfg.gpus_per_worker,
            max_restarts=0,  # the driver replaces dead workers itself ...
            max_task_retries=0,  # ... and re-queues what they had not returned
        )
        self.prefix = f"{ACTOR_PREFIX}-{uuid.uuid4().hex[:8]}"
        self.spawned, self.deaths = 0, 0
        self.max_deaths = size * (cfg.max_retries + 1)
        self.seats = [self._spawn() for _ in range(size)]

    def _spawn(self) -> Seat:
        name = f"{self.prefix}-{self.spawned}"
        self.spawned += 1
        actor = self.actor_class.options(name=name, **self.options).remote(self.cfg)
        return Seat(actor, name, actor.where.remote())

    def replace(self, seat: Seat, error: Exception) -> None:
        self.deaths += 1
        if self.deaths > self.max_deaths:
            raise RuntimeError(f"eval workers died {self.deaths} times; the last: {error}")
        self.ray.kill(seat.actor)  # already dead, or unreachable: make sure
        self.seats[self.seats.index(seat)] = self._spawn()

    def close(self) -> None:
        for seat in self.seats:
            self.ray.kill(seat.actor)


def connect(ray, address: str | None) -> bool:
    """Join the cluster at `address` (auto, ray://..., host:port) or start a local one on this
    machine's loopback; True if this call connected (the caller then disconnects)."""
    if ray.is_initialized():  # the caller's own session (tests, notebooks)
        return False
    if address:
        ray.init(address=address)
    else:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(include_dashboard=False, _node_ip_address="127.0.0.1")
    return True


def check_resources(ray, cfg: EvalConfig) -> None:
    """Refuse a worker no node can hold (it would wait for ever), and cuda without a GPU."""
    have = ray.cluster_resources()
    for key, need in (("CPU", cfg.cpus_per_worker), ("GPU", cfg.gpus_per_worker)):
        if need > have.get(key, 0):
            raise ValueError(f"a worker needs {need} {key} and the cluster has {have.get(key, 0)}")
    if cfg.device.startswith("cuda") and cfg.gpus_per_worker <= 0:
        raise ValueError("--device cuda on Ray needs --gpus-per-worker (1, or 0.5 for two a GPU)")


class Driver:
    """Feeds waves to the pool, writes each record as it arrives, re-queues a dead worker's."""

    def __init__(
        self,
        ray,
        cfg: EvalConfig,
        queue: WorkQueue,
        pool: WorkerPool,
        writer: EpisodeWriter,
        out: Path,
        progress: Progress,
        on_episode: Callable[[dict[str, Any]], None] | None,
    ):
        self.ray, self.cfg, self.queue, self.pool = ray, cfg, queue, pool
        self.writer, self.out, self.bar, self.on_episode = writer, out, progress, on_episode
        self.runs = {r.label: r for r in cfg.runs}
        self.written: set[tuple[str, str, int]] = set()

    def run(self) -> None:
        ray, pool = self.ray, self.pool
        waited = time.monotonic()
        while True:
            for seat in pool.seats:
                if seat.ready is None and seat.stream is None and len(self.queue):
                    self._start(seat)
            busy = [s for s in pool.seats if s.stream is not None]
            if not busy and not len(self.queue):
                return
            owners = {s.ready: s for s in pool.seats if s.ready is not None}
            owners.update({s.stream: s for s in busy})
            ready, _ = ray.wait(list(owners), num_returns=1, timeout=WAIT_LOG_S)
            if not ready:  # e.g. a replacement waiting for resources a lost node held
                log.warning(
                    "waited %.0f s: %d workers busy, %d starting, %d episodes queued",
                    time.monotonic() - waited,
                    len(busy),
                    len(owners) - len(busy),
                    len(self.queue),
                )
                continue
            waited = time.monotonic()
            seat = owners[ready[0]]
            try:
                if ready[0] is seat.stream:
                    self._receive(seat)
                else:
                    log.info("worker %s ready on %s", seat.name, ray.get(seat.ready))
                    seat.ready = None
            except (
                ray.exceptions.RayActorError,  # the actor died: crash, ray.kill, its node lost
                ray.exceptions.WorkerCrashedError,
                ray.exceptions.NodeDiedError,
                ray.exceptions.ObjectLostError,
                ray.exceptions.OutOfMemoryError,
            ) as e:
                self._lost_worker(seat, e)

    def _start(self, seat: Seat) -> None:
        seat.label, seat.wave = self.queue.next_wave()
        seat.received = set()
        seat.stream = seat.actor.run.remote(seat.label, seat.wave)

    def _receive(self, seat: Seat) -> None:
        try:
            ref = next(seat.stream)
        except StopIteration:  # the wave is done: the seat is idle
            seat.stream, seat.wave = None, []
            return
        record, video = self.ray.get(ref)  # an episode's own error (RayTaskError) ends the run
        key = episode_key(record)
        seat.received.add((record["task"], record["seed"]))
        if key in self.written:  # cannot happen (nothing runs twice); never write it twice
            log.warning("episode %s arrived twice; the second is dropped", key)
            return
        if video is not None:
            suffix, data = video
            rel = video_stem(self.runs[record["label"]], record["task"], record["seed"])
            path = self.out / rel.with_suffix(suffix)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            record["video"] = str(path.relative_to(self.out))
        self.writer.write(record)
        self.written.add(key)
        if self.on_episode is not None:
            self.on_episode(record)
        mark = "ok" if record["success"] else "fail"
        self.bar.update(f"{key[0]} {key[1]} seed {key[2]} {mark} ({record['steps']} steps)")

    def _lost_worker(self, seat: Seat, error: Exception) -> None:
        back = self.queue.give_back(seat.label, seat.unfinished()) if seat.wave else 0
        log.warning(
            "worker %s died (%s): %d episodes back in the queue",
            seat.name,
            type(error).__name__,
            back,
        )
        self.pool.replace(seat, error)


def run_eval_ray(
    cfg: EvalConfig,
    progress: bool = True,
    on_episode: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """`run_eval` on Ray: the same OUT (episodes.jsonl, config.json, summary.*), resumable by
    either backend. `on_episode(record)` is called after each record is on disk."""
    if getattr(cfg, "budget_ms", 0) > 0:  # sim/eval/budget.py runs in the local loop only
        raise ValueError("a latency budget (budget_ms) needs the local backend")
    ray = import_ray()
    cfg = _resolve(cfg)
    out, records = _open_out(cfg)
    queue = WorkQueue(cfg, {episode_key(r) for r in records})
    total = len(cfg.tasks) * len(cfg.seeds) * len(cfg.runs)
    todo = len(queue)
    if todo:
        connected = connect(ray, cfg.ray_address)
        pool = None
        try:
            check_resources(ray, cfg)
            waves = -(-todo // cfg.envs_per_worker)
            pool = WorkerPool(ray, cfg, min(cfg.workers, waves))
            log.info(
                "%s: %d episodes to run, %d already done; %d Ray workers x %d envs",
                out,
                todo,
                total - todo,
                len(pool.seats),
                cfg.envs_per_worker,
            )
            bar = Progress(total, total - todo, enabled=progress)
            try:
                with EpisodeWriter(out / EPISODES_FILE) as writer:
                    Driver(ray, cfg, queue, pool, writer, out, bar, on_episode).run()
            finally:
                bar.close()
        finally:
            if pool is not None:
                pool.close()
            if connected:
                ray.shutdown()
    write_in_run_order(out, cfg, [])
    if queue.lost:
        raise RuntimeError(
            f"{len(queue.lost)} episodes lost their worker more than {cfg.max_retries} times "
            f"(e.g. {queue.lost[0]}); the others are in {out}: rerun to retry them"
        )
    return report(out)

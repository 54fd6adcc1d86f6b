"""Run an eval's configurations in several processes (one per core), merged into one OUT.

Each worker process gets whole configurations (round-robin), runs them with the ordinary
`run_eval` into OUT/workers/<i>/ on one thread, and the parent merges every worker's episodes
into OUT/episodes.jsonl. Pairing is unchanged (every configuration sees the same seeds);
latency stays comparable because a configuration never shares its process. Resumable like
`run_eval`: a worker resumes from its own file, seeded with OUT's episodes of its
configurations, so a run started with one worker can continue with two and vice versa.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing as mp
import os
import time
from pathlib import Path
from typing import Any

from sim.eval.config import EvalConfig
from sim.eval.records import EPISODES_FILE, episode_key, read_episodes, write_json
from sim.eval.summary import report

log = logging.getLogger(__name__)

WORKERS_DIR = "workers"


def _worker(cfg: EvalConfig, video_root: str) -> None:
    from sim.eval.runner import run_eval

    logging.basicConfig(level=logging.WARNING)
    run_eval(cfg, progress=False, video_root=Path(video_root))  # GIFs in the parent's OUT/videos


def _count_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def run_eval_parallel(cfg: EvalConfig, workers: int, progress: bool = True) -> dict[str, Any]:
    """`run_eval` with the configurations spread over `workers` processes."""
    from sim.eval.runner import Progress, _open_out, _resolve

    cfg = _resolve(cfg)
    out, records = _open_out(cfg)  # checks OUT matches this evaluation, writes its config
    groups = [g for g in (cfg.runs[i::workers] for i in range(workers)) if g]
    parts, files = [], []
    for i, runs in enumerate(groups):
        part = out / WORKERS_DIR / str(i)
        part.mkdir(parents=True, exist_ok=True)
        path = part / EPISODES_FILE
        have = {episode_key(r) for r in read_episodes(path, repair=True)}
        labels = {r.label for r in runs}
        sub = dataclasses.replace(cfg, runs=runs, out=str(part))
        seed = [r for r in records if r["label"] in labels and episode_key(r) not in have]
        if seed:  # episodes OUT already has: the worker must not run them again
            if not (part / "config.json").exists():
                write_json(part / "config.json", sub.to_dict())
            with path.open("a") as f:
                f.writelines(json.dumps(r) + "\n" for r in seed)
        parts.append(sub)
        files.append(path)

    total = len(cfg.tasks) * len(cfg.seeds) * len(cfg.runs)
    done = lambda: sum(_count_lines(f) for f in files)  # noqa: E731
    start = done()
    log.info("%s: %d workers, %d episodes to run", out, len(parts), total - start)
    ctx = mp.get_context("spawn")  # a clean interpreter: no forked GL contexts or torch pools
    procs = [
        ctx.Process(target=_worker, args=(p, str(out)), name=f"eval-worker-{i}", daemon=True)
        for i, p in enumerate(parts)
    ]
    for p in procs:
        p.start()
    bar = Progress(total, start, enabled=progress)
    try:
        while any(p.is_alive() for p in procs):
            time.sleep(1.0)
            for _ in range(done() - bar.done):
                bar.update(f"{len(parts)} workers")
    finally:
        for p in procs:
            p.join()
        bar.close()
    failed = [(p.name, p.exitcode) for p in procs if p.exitcode != 0]
    _merge(out, cfg, files)
    if failed:
        raise RuntimeError(f"eval workers failed {failed}; their finished episodes are in {out}")
    return report(out)


def _merge(out: Path, cfg: EvalConfig, files: list[Path]) -> None:
    """OUT/episodes.jsonl := OUT's records + every worker's, one per key, in run order."""
    merged: dict[tuple, dict[str, Any]] = {}
    for path in [out / EPISODES_FILE, *files]:
        for r in read_episodes(path):
            merged.setdefault(episode_key(r), r)
    tasks = {t: i for i, t in enumerate(cfg.tasks)}
    runs = {r.label: i for i, r in enumerate(cfg.runs)}
    order = sorted(
        merged.values(),
        key=lambda r: (
            tasks.get(r["task"], len(tasks)),
            r["task"],
            int(r["seed"]),
            runs.get(r["label"], len(runs)),
            r["label"],
        ),
    )
    tmp = out / (EPISODES_FILE + ".tmp")
    with tmp.open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in order)
    os.replace(tmp, out / EPISODES_FILE)  # atomic: a crash leaves the old file or the new one

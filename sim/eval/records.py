"""The on-disk results of an eval run (OUT/episodes.jsonl, OUT/config.json).

``episodes.jsonl`` holds one JSON object per finished episode, appended and flushed as each
episode ends, all configurations in one file (episodes of a (task, seed) are adjacent)::

    label, suite, task, seed, episode (= seed - first seed), success, steps (env steps),
    policy_steps (policy calls), instruction, obs_hash (first observation, for pairing checks),
    actions_hash (every executed action, float32, in order: equal hashes = the same rollout),
    kept_visual_tokens (mean per policy call), reused_fraction (VLA-Cache methods: mean per
    policy call of the visual rows reused over the layers that ran; else null),
    latency_ms {stage: {median, p99}} (this episode),
    step_ms {stage: [ms per policy call]} (raw; step_ms["total"] is the per-step total),
    policy, prune (PruneConfig as a dict), cache (CogACT DiT cache interval or null),
    skip_layers (LLM layers skipped), ensemble (CogACT action ensemble), wall_s,
    video (path relative to OUT, or null)

(label, task, seed) identifies an episode; a file never holds one twice. Every backend (local,
worker processes, Ray, batched) writes the same record for an episode, timings aside.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

EPISODES_FILE = "episodes.jsonl"
CONFIG_FILE = "config.json"

Key = tuple[str, str, int]


def episode_key(record: dict[str, Any]) -> Key:
    return (record["label"], record["task"], int(record["seed"]))


def read_episodes(path: str | Path, repair: bool = False) -> list[dict[str, Any]]:
    """Records of an episodes.jsonl (a missing file is empty).

    A torn last line (a crash during the write) is dropped; with `repair` it is also cut from
    the file so that appending continues on a clean line. A corrupt line elsewhere raises
    ValueError. Repeated keys keep the first record (with a warning).
    """
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        log.warning("%s: dropping a torn last line (%d bytes)", path, len(data) - end)
        if repair:
            with open(path, "r+b") as f:
                f.truncate(end)
        data = data[:end]
    records, seen = [], set()
    for lineno, line in enumerate(data.decode().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            key = episode_key(record)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}:{lineno}: corrupt episode record ({e})") from e
        if key in seen:
            log.warning("%s:%d: duplicate episode %s ignored", path, lineno, key)
            continue
        seen.add(key)
        records.append(record)
    return records


class EpisodeWriter:
    """Appends records, one line each, flushed to disk before returning."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        # One write call per line: a crash can tear only the last line (read_episodes drops it).
        self._f.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> EpisodeWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_json(path: str | Path, data: Any) -> None:
    """Write atomically, so a crash never leaves a half-written config or summary."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)

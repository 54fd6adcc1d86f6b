"""Success-rate evaluation of pruning configurations in simulation.

    from sim.eval import EvalConfig, parse_runs, run_eval, report
    cfg = EvalConfig(policy="tiny-openvla", tasks=("press",), episodes=2,
                     runs=parse_runs("dense,vla-pruner@0.25"), out="runs/eval/demo")
    summary = run_eval(cfg)      # OUT/episodes.jsonl, OUT/config.json, OUT/summary.{md,json,png}
    report("runs/eval/demo")     # re-build the summary from the jsonl alone

Modules: config (EvalConfig, RunConfig, --configs specs), runner (the loop, resume, video),
parallel (local worker processes), ray_backend (Ray actors, batched waves, retries), records
(the jsonl layout), stats (Wilson intervals, pooled latency), summary (table, markdown, plot,
report()).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

# Lazy: `python -m sim.report` needs neither torch nor mujoco.
_EXPORTS = {
    "EvalConfig": "sim.eval.config",
    "RunConfig": "sim.eval.config",
    "load_eval_config": "sim.eval.config",
    "parse_run_spec": "sim.eval.config",
    "parse_runs": "sim.eval.config",
    "run_eval": "sim.eval.runner",
    "run_eval_ray": "sim.eval.ray_backend",
    "load_eval_policy": "sim.eval.runner",
    "read_episodes": "sim.eval.records",
    "summarize_episodes": "sim.eval.stats",
    "wilson_interval": "sim.eval.stats",
    "format_table": "sim.eval.summary",
    "report": "sim.eval.summary",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sim.eval' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)

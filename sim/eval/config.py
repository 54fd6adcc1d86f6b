"""Eval configuration: which policy, which pruning configurations, which (task, seed) episodes.

A configuration ("run") is a label + a PruneConfig (+ optionally its own policy). Runs come from
spec strings in the one run-spec grammar of `vla_prune.runspec`, or YAML::

    dense                    no pruning (alias of method "none")
    vla-pruner@0.25          keep 25% of the visual tokens (a float is a keep ratio)
    fastv@64                 keep 64 visual tokens (an int is a keep count)
    vp25=vla-pruner@0.25     the same with an explicit label
    configs/pruning/x.yaml   a PruneConfig YAML; the label is the file's stem
    c5=vla-pruner@0.25+cache5+skip[1]+ensemble   CogACT: DiT cache, skip layer 1, ensemble

An eval YAML (configs/eval/embedded.yaml) holds the EvalConfig fields, with ``configs:`` a list
of spec strings or mappings ``{label, prune: {...} | path, policy}``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vla_prune.config import PruneConfig, from_dict, load_yaml
from vla_prune.runspec import WEIGHTS

# Fields whose change makes earlier episodes incomparable: resuming across them is refused.
IDENTITY_FIELDS = (
    "suite",
    "tasks",
    "seed",
    "policy",
    "unnorm_key",
    "max_steps",
    "env",
    "device",
    "dtype",
    "threads",
    "compile",
    "weights",
    "budget_ms",
    "budget_quality",
    "budget_min_keep",
)
BACKENDS = ("local", "ray")


@dataclass(frozen=True)
class RunConfig:
    """One configuration to evaluate; `policy` None means EvalConfig.policy."""

    label: str
    policy: str | None = None
    prune: PruneConfig = field(default_factory=PruneConfig)
    # Honesty control: the policy sees a constant gray frame instead of the camera (the blind
    # checkpoint is trained the same way: sim.train --blind).
    blind: bool = False
    # CogACT only: DiT feature caching, recompute every `cache` DDIM steps (None = no cache).
    cache: int | None = None
    # LLM decoder layers to skip (e.g. from `vla-prune calibrate`); () = run every layer.
    skip_layers: tuple[int, ...] = ()
    # CogACT only: adaptive action ensemble, one action per control step (CogACT's own
    # deployment) instead of executing each 16-step chunk open loop.
    ensemble: bool = False
    # Engine settings (vla_prune.EngineConfig); None = the evaluation's default.
    compile: bool | None = None
    weights: str | None = None

    def __post_init__(self):
        if self.weights is not None and self.weights not in WEIGHTS:
            raise ValueError(f"configuration {self.label!r}: weights must be one of {WEIGHTS}")
        if self.cache is not None and (
            not isinstance(self.cache, int) or isinstance(self.cache, bool) or self.cache < 1
        ):
            raise ValueError(f"configuration {self.label!r}: cache must be an int >= 1")
        object.__setattr__(self, "skip_layers", tuple(int(i) for i in self.skip_layers))

    def to_dict(self) -> dict[str, Any]:
        d = {"label": self.label, "policy": self.policy, "prune": prune_dict(self.prune)}
        if self.blind:
            d["blind"] = True
        if self.cache is not None:
            d["cache"] = self.cache
        if self.skip_layers:
            d["skip_layers"] = list(self.skip_layers)
        if self.ensemble:
            d["ensemble"] = True
        if self.compile is not None:
            d["compile"] = self.compile
        if self.weights is not None:
            d["weights"] = self.weights
        return d


@dataclass
class EvalConfig:
    suite: str = "embedded"
    tasks: tuple[str, ...] | None = None  # None or "all": every task of the suite
    episodes: int = 10  # per task and configuration
    seed: int = 0  # episode i uses env seed `seed + i` (same for every configuration)
    policy: str = "embedded-openvla"  # checkpoint dir, shipped checkpoint or preset name
    unnorm_key: str | None = None  # None: the suite's name if the checkpoint has it
    runs: tuple[RunConfig, ...] = (RunConfig("dense"),)
    out: str = "runs/eval/embedded"
    max_steps: int | None = None  # None: the env's own step limit
    video: bool = False
    threads: int = 1  # torch CPU threads; 1 keeps latency comparable (0 = torch default)
    workers: int = 1  # processes, each running whole configurations (sim/eval/parallel.py)
    warmup: int = 2  # untimed policy steps per configuration before its first episode
    device: str = "cpu"
    dtype: str = "float32"
    compile: bool = False  # default engine of every configuration that names none (+compile)
    weights: str = "fp32"  # default weight format: fp32 | bf16 | int8 (+bf16, +int8)
    env: dict[str, Any] = field(default_factory=dict)  # extra make_env kwargs (image_size, ...)
    # Latency budget in simulation (sim/eval/budget.py): > 0 runs each configuration through
    # the ROS node's controller over its measured levels, a step over budget executed as the
    # safe action; 0 = off. budget_quality: an eval summary ranking the levels ("" = by their
    # levers); budget_min_keep: the quality floor, a fraction of the visual tokens.
    budget_ms: float = 0.0
    budget_quality: str = ""
    budget_min_keep: float = 0.25
    # Where episodes run; none of these changes an episode's record, so a run may resume on
    # another backend. local: this process (or `workers` processes); ray: sim/eval/ray_backend.py
    backend: str = "local"
    envs_per_worker: int = 1  # ray: episodes a worker steps in lockstep (one step_batch call)
    ray_address: str | None = None  # ray: "auto", "ray://host:10001", host:port; None = start one
    cpus_per_worker: float = 1.0  # ray: resources each worker actor reserves
    gpus_per_worker: float = 0.0  # ray: e.g. 1, or 0.5 for two workers per GPU
    max_retries: int = 3  # ray: re-runs of an episode whose worker died (crash, node loss)

    def __post_init__(self):
        if isinstance(self.tasks, str):
            self.tasks = None if self.tasks == "all" else split_list(self.tasks)
        if self.tasks is not None:
            self.tasks = tuple(self.tasks)
            if not self.tasks:
                raise ValueError("EvalConfig.tasks is empty")
        self.runs = tuple(self.runs)
        if not self.runs:
            raise ValueError("EvalConfig.runs is empty: give at least one configuration")
        labels = [r.label for r in self.runs]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ValueError(f"duplicate configuration labels {dup}; label them label=spec")
        if not isinstance(self.episodes, int) or self.episodes < 1:
            raise ValueError(f"episodes must be an int >= 1, got {self.episodes!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")
        if not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"workers must be an int >= 1, got {self.workers!r}")
        if self.weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {WEIGHTS}, got {self.weights!r}")
        if not (self.budget_ms >= 0 and 0.0 <= self.budget_min_keep <= 1.0):
            raise ValueError("budget_ms must be >= 0 and budget_min_keep in [0, 1]")
        if self.budget_ms > 0 and self.backend != "local":
            raise ValueError("budget_ms needs backend local (sim/eval/budget.py)")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if not isinstance(self.envs_per_worker, int) or self.envs_per_worker < 1:
            raise ValueError(f"envs_per_worker must be an int >= 1, got {self.envs_per_worker!r}")
        if self.envs_per_worker > 1 and self.backend != "ray":
            raise ValueError(
                "envs_per_worker > 1 needs backend ray (--backend ray; no --ray-address starts "
                "a local Ray)"
            )
        if self.cpus_per_worker < 0 or self.gpus_per_worker < 0:
            raise ValueError("cpus_per_worker and gpus_per_worker must be >= 0")
        if not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise ValueError(f"max_retries must be an int >= 0, got {self.max_retries!r}")

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.episodes)]

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["tasks"] = list(self.tasks) if self.tasks is not None else None
        d["runs"] = [r.to_dict() for r in self.runs]
        return d


def prune_dict(prune: PruneConfig) -> dict[str, Any]:
    d = dataclasses.asdict(prune)
    if d["indices"] is not None:
        d["indices"] = list(d["indices"])
    return d


def split_list(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _check_method(prune: PruneConfig, spec: str) -> PruneConfig:
    from vla_prune.pruning.base import make_pruner

    try:
        make_pruner(prune)
    except ValueError as e:  # names the available methods
        raise ValueError(f"bad configuration {spec!r}: {e}") from None
    return prune


def parse_run_spec(spec: str, policy: str | None = None) -> RunConfig:
    """A spec in the one run-spec grammar (vla_prune.runspec) -> RunConfig."""
    from vla_prune.runspec import bad_spec
    from vla_prune.runspec import parse_run_spec as parse

    s = parse(spec)
    if s.skip_count is not None:  # eval runs exactly the layers it is told: reproducible
        raise bad_spec(
            spec,
            f"eval needs the layers themselves: skip[i,j] (from `vla-prune calibrate`), "
            f"not skip{s.skip_count}",
        )
    return RunConfig(
        s.label,
        policy,
        s.prune,
        blind=s.blind,
        cache=s.cache,
        skip_layers=s.skip_layers,
        ensemble=s.ensemble,
        compile=s.compile,
        weights=s.weights,
    )


def run_from_entry(entry: Any, source: str = "config") -> RunConfig:
    """A YAML `configs:` entry: a spec string or a mapping
    {label, prune: mapping | yaml path, policy, blind, cache: N, skip_layers: [..] | path,
    ensemble}."""
    if isinstance(entry, str):
        return parse_run_spec(entry)
    if not isinstance(entry, dict) or "label" not in entry:
        raise ValueError(f"{source}: configuration {entry!r} needs a label (or be a spec string)")
    keys = {
        "label", "policy", "prune", "blind", "cache", "skip_layers", "ensemble", "compile",
        "weights",
    }
    unknown = sorted(set(entry) - keys)
    if unknown:
        raise ValueError(f"{source}: unknown keys {unknown} in configuration {entry['label']!r}")
    prune = entry.get("prune") or {}
    if isinstance(prune, str):
        prune = load_yaml(PruneConfig, prune)
    else:
        prune = from_dict(PruneConfig, prune, source=f"{source}: {entry['label']}")
    skips = entry.get("skip_layers") or ()
    if isinstance(skips, str):  # a skip-list file written by `vla-prune calibrate`
        from vla_prune.caching.layer_skip import load_skip_list

        skips = load_skip_list(skips)
    return RunConfig(
        str(entry["label"]),
        entry.get("policy"),
        _check_method(prune, source),
        blind=bool(entry.get("blind", False)),
        cache=entry.get("cache"),
        skip_layers=tuple(skips),
        ensemble=bool(entry.get("ensemble", False)),
        compile=entry.get("compile"),
        weights=entry.get("weights"),
    )


def parse_runs(text: str) -> tuple[RunConfig, ...]:
    """`--configs` value: comma-separated specs, or one YAML file with a list / `configs:`."""
    text = text.strip()
    path = Path(text)
    if text.endswith((".yaml", ".yml")) and "," not in text and path.is_file():
        data = _read_yaml(path)
        if isinstance(data, dict) and "configs" in data:
            data = data["configs"]
        if isinstance(data, list):
            return tuple(run_from_entry(e, str(path)) for e in data)
        if isinstance(data, dict) and "method" in data:  # a single PruneConfig file
            return (parse_run_spec(text),)
        raise ValueError(f"{path}: expected a list of configurations or a `configs:` key")
    from vla_prune.runspec import split_specs

    specs = split_specs(text)
    if not specs:
        raise ValueError("--configs is empty: give e.g. dense,vla-pruner@0.25")
    return tuple(parse_run_spec(s) for s in specs)


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e


def load_eval_config(path: str | Path, **overrides: Any) -> EvalConfig:
    """EvalConfig from a YAML file; `overrides` that are not None replace its fields."""
    path = Path(path)
    data = _read_yaml(path) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    data = dict(data)
    entries = data.pop("configs", None) or data.pop("runs", None)  # `runs` as the field is named
    if entries is not None:
        data["runs"] = tuple(run_from_entry(e, str(path)) for e in entries)
    data.update({k: v for k, v in overrides.items() if v is not None})
    return from_dict(EvalConfig, data, source=str(path))


def check_resumable(old: dict[str, Any], new: dict[str, Any], out: Path) -> None:
    """Refuse to mix episodes of different setups in one OUT dir (ValueError naming fields)."""
    # A field added after `old` was written compares as its default.
    defaults = {f.name: f.default for f in dataclasses.fields(EvalConfig)}
    before = {k: old.get(k, defaults.get(k)) for k in IDENTITY_FIELDS}
    diffs = [f"{k}: {before[k]!r} -> {new[k]!r}" for k in IDENTITY_FIELDS if before[k] != new[k]]
    old_runs = {r["label"]: r for r in old.get("runs", [])}
    for run in new["runs"]:
        prev = old_runs.get(run["label"])
        if prev is not None and prev != run:
            diffs.append(f"configuration {run['label']!r}: {prev} -> {run}")
    if diffs:
        raise ValueError(
            f"{out} holds episodes of a different evaluation ({'; '.join(diffs)}); "
            "use another --out directory or delete it"
        )

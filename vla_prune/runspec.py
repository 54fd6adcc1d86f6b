"""One grammar for naming an acceleration configuration: `vla-prune eval --configs`,
`vla-prune bench --configs`, `vla-prune profile --run` and the ROS node's `accel` parameter all
parse their strings here, so one string means the same thing everywhere.

    spec  := [label "="] part ("+" part)*
    part  := "dense" | "none"               no pruning
           | method "@" keep                e.g. vla-pruner@0.25, fastv@64, divprune@25%
           | path.yaml                      a PruneConfig YAML (the label defaults to its stem)
           | "vla-cache" ["[" k=v ("," k=v)* "]"]   VLA-Cache: reuse static tokens' K/V across
                                            steps; alone or after a method (vla-pruner@0.25+
                                            vla-cache); k: a VLACacheConfig field
           | method "+vla-cache@" keep      the same, keep written last: vla-pruner+vla-cache@0.25
           | "cache" N                      CogACT: DiT feature caching, recompute every N steps
           | "skip" N                       skip the N least influential LLM layers (calibrated)
           | "skip[" i ("," i)* "]"         skip exactly these LLM layers
           | "ensemble"                     CogACT: adaptive action ensemble
           | "blind"                        honesty control: the policy sees a gray frame
           | "compile" | "eager"            the compiled static-shape engine, or the eager one
           | "fp32" | "bf16" | "int8"       weight format (EngineConfig.weights)
    keep  := an int (a token count) | a float in (0, 1] (a ratio) | a percentage ("25%")

A list of specs is comma-separated (`split_specs`); commas inside `skip[...]` do not split.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from .config import VLA_CACHE, EngineConfig, PruneConfig, VLACacheConfig, from_dict, load_yaml

GRAMMAR = (
    "[label=]method@keep[+vla-cache[k=v,..]][+cacheN][+skipN|+skip[i,j]][+compile|+eager][+fp32|+bf16|+int8]"
    "[+ensemble][+blind]"
)
WEIGHTS = ("fp32", "bf16", "int8")
DENSE_ALIASES = ("dense", "none")
_SKIP_LIST = re.compile(r"skip\[([\d,\s]*)\]")
_COUNTED = re.compile(r"(cache|skip)(\d+)")
_VLA_CACHE = re.compile(r"vla-cache(?:\[([^\]]*)\])?(?:@(.*))?")


@dataclass(frozen=True)
class RunSpec:
    """A parsed spec: what to configure on a policy (and what the label calls it)."""

    label: str
    prune: PruneConfig = field(default_factory=PruneConfig)
    cache: int | None = None  # DiT feature cache interval; None = no cache
    skip_layers: tuple[int, ...] = ()  # explicit LLM layers to skip
    skip_count: int | None = None  # or: this many, chosen by block-influence calibration
    ensemble: bool = False
    blind: bool = False
    compile: bool | None = None  # None: the caller's default (e.g. --compile)
    weights: str | None = None  # None: the caller's default (e.g. --weights)

    def engine(self, default: EngineConfig | None = None) -> EngineConfig:
        """The EngineConfig this spec asks for, filling what it leaves open from `default`."""
        d = default or EngineConfig()
        return EngineConfig(
            compile=d.compile if self.compile is None else self.compile,
            weights=d.weights if self.weights is None else self.weights,
        )


def bad_spec(spec: str, reason: str) -> ValueError:
    """The one error style of the grammar (every consumer raises these)."""
    return ValueError(f"bad configuration {spec!r}: {reason}")


def parse_keep(keep: str, spec: str = "") -> dict[str, Any]:
    """`64` -> keep_count, `0.25` -> keep_ratio, `25%` -> keep_ratio 0.25."""
    text = keep.strip()
    try:
        if text.endswith("%"):
            return {"keep_ratio": float(text[:-1]) / 100.0}
        if re.fullmatch(r"[+-]?\d+", text):
            return {"keep_count": int(text)}
        return {"keep_ratio": float(text)}
    except ValueError:
        raise bad_spec(spec or keep, f"keep {text!r} is not a number") from None


def _check_method(prune: PruneConfig, spec: str) -> PruneConfig:
    from .pruning.base import make_pruner

    try:
        make_pruner(prune)
    except ValueError as e:  # names the available methods
        raise bad_spec(spec, str(e)) from None
    return prune


def _prune_part(part: str, spec: str) -> PruneConfig:
    if part.endswith((".yaml", ".yml")):
        return _check_method(load_yaml(PruneConfig, part), spec)
    method, at, keep = part.partition("@")
    method = method.strip()
    if not at or not keep.strip():
        raise bad_spec(
            spec,
            f"{method} needs a keep value, e.g. {method}@0.25 (ratio) or {method}@64 (tokens)",
        )
    try:
        prune = PruneConfig(method=method, **parse_keep(keep, spec))
    except ValueError as e:
        raise bad_spec(spec, str(e)) from None
    return _check_method(prune, spec)


def _take_vla_cache(parts: list[str], spec: str) -> tuple[list[str], VLACacheConfig | None]:
    """The spec's parts without its vla-cache part, and that part's VLACacheConfig (None: no
    vla-cache). `m+vla-cache@k` gives the bare method `m` the keep `k`."""
    found = [i for i, p in enumerate(parts) if _VLA_CACHE.fullmatch(p)]
    if not found:
        return parts, None
    if len(found) > 1:
        raise bad_spec(spec, "vla-cache is given twice")
    i = found[0]
    m = _VLA_CACHE.fullmatch(parts[i])
    params, keep = m.group(1), m.group(2)
    rest = parts[:i] + parts[i + 1 :]
    if keep is not None:
        method = parts[i - 1] if i > 0 else ""
        if not method or "@" in method or method.endswith((".yaml", ".yml")):
            raise bad_spec(
                spec,
                "vla-cache@keep keeps the tokens of the method written just before it, e.g. "
                "vla-pruner+vla-cache@0.25 (vla-cache alone prunes nothing)",
            )
        rest[i - 1] = f"{method}@{keep}"
    values: dict[str, Any] = {}
    for item in (params or "").split(","):
        if not item.strip():
            continue
        key, eq, value = item.partition("=")
        if not eq:
            raise bad_spec(spec, f"vla-cache[...] takes key=value items, got {item.strip()!r}")
        values[key.strip()] = yaml.safe_load(value.strip())
    try:
        return rest, from_dict(VLACacheConfig, values, source="vla-cache[...]")
    except (ValueError, TypeError) as e:
        raise bad_spec(spec, str(e)) from None


def _split_label(text: str) -> tuple[str, str, str]:
    """(label, "=", body) at the first "=" outside brackets (vla-cache[k=v] has its own), or
    ("", "", text) when there is no label."""
    depth = 0
    for i, ch in enumerate(text):
        depth += (ch == "[") - (ch == "]")
        if ch == "=" and depth == 0:
            return text[:i], "=", text[i + 1 :]
    return "", "", text


def parse_run_spec(spec: str) -> RunSpec:
    """One spec string -> RunSpec; ValueError naming the spec and what is wrong."""
    text = spec.strip()
    label, sep, body = _split_label(text)
    label, body = label.strip(), body.strip()
    if not body or (sep and not label):
        raise bad_spec(spec, f"expected {GRAMMAR}")
    fields: dict[str, Any] = {}
    seen: set[str] = set()
    parts, vla_cache = _take_vla_cache([raw.strip() for raw in body.split("+")], spec)
    for part in parts:
        if not part:
            raise bad_spec(spec, f"empty part between '+'; expected {GRAMMAR}")
        if part.split("@")[0].strip() in DENSE_ALIASES:
            if "@" in part:
                raise bad_spec(spec, f"{part.split('@')[0]} takes no @keep value")
            key, value = "prune", PruneConfig()
        elif m := _SKIP_LIST.fullmatch(part):
            layers = [x for x in m.group(1).replace(" ", "").split(",") if x]
            if not layers:
                raise bad_spec(spec, "skip[...] names no layer")
            key, value = "skip_layers", tuple(sorted({int(x) for x in layers}))
        elif m := _COUNTED.fullmatch(part):
            n = int(m.group(2))
            if n < 1:
                raise bad_spec(spec, f"{m.group(1)} needs N >= 1, got {n}")
            key, value = ("cache", n) if m.group(1) == "cache" else ("skip_count", n)
        elif part in ("ensemble", "blind"):
            key, value = part, True
        elif part in ("compile", "eager"):
            key, value = "compile", part == "compile"
        elif part in WEIGHTS:
            key, value = "weights", part
        else:
            key, value = "prune", _prune_part(part, spec)
        slot = "skip" if key.startswith("skip") else key  # skipN and skip[..] exclude each other
        if slot in seen:
            raise bad_spec(spec, f"{part!r} repeats a part already given")
        seen.add(slot)
        fields[key] = value
    prune = fields.pop("prune", PruneConfig())
    if vla_cache is not None:
        method = VLA_CACHE if prune.method == "none" else f"{prune.method}+{VLA_CACHE}"
        try:
            prune = _check_method(replace(prune, method=method, vla_cache=vla_cache), spec)
        except ValueError as e:
            raise bad_spec(spec, str(e)) from None
    if not label:
        only_yaml = body.endswith((".yaml", ".yml")) and "+" not in body
        label = Path(body).stem if only_yaml else ("dense" if body in DENSE_ALIASES else body)
    return RunSpec(label=label, prune=prune, **fields)


def split_specs(text: str) -> list[str]:
    """Comma-separated specs; a comma inside skip[...] belongs to its spec."""
    out, depth, cur = [], 0, []
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return [s.strip() for s in out if s.strip()]


def parse_run_specs(text: str) -> list[RunSpec]:
    """A comma-separated list of specs (ValueError if empty or any is malformed)."""
    specs = split_specs(text)
    if not specs:
        raise ValueError("no configuration given: expected e.g. dense,vla-pruner@0.25")
    return [parse_run_spec(s) for s in specs]

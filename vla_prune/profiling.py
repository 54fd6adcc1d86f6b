"""Latency reports: per-stage percentiles, tables, machine description."""

from __future__ import annotations

import platform
from collections.abc import Sequence

import numpy as np
import torch

from .policy import STAGES


def summarize(timings: Sequence[dict[str, float]]) -> dict[str, dict[str, float]]:
    """stage -> {median, p90, p99, mean} in milliseconds over the given steps."""
    out = {}
    for stage in STAGES:
        values = np.array([t[stage] for t in timings if stage in t])
        if len(values):
            out[stage] = {
                "median": float(np.median(values)),
                "p90": float(np.percentile(values, 90)),
                "p99": float(np.percentile(values, 99)),
                "mean": float(values.mean()),
            }
    return out


def format_table(
    summary: dict[str, dict[str, float]],
    flops: dict[str, float] | None = None,
    nbytes: dict[str, float] | None = None,
    bound_ms: dict[str, float] | None = None,
) -> str:
    """Per-stage latency percentiles, with FLOPs, bytes and roofline bound when given."""
    head = f"{'stage':<11}{'median ms':>11}{'p90 ms':>10}{'p99 ms':>10}"
    head += f"{'GFLOPs':>10}" if flops else ""
    head += f"{'MB moved':>10}" if nbytes else ""
    head += f"{'bound ms':>10}{'meas/bound':>12}" if bound_ms else ""
    lines = [head, "-" * len(head)]
    for stage, s in summary.items():
        row = f"{stage:<11}{s['median']:>11.2f}{s['p90']:>10.2f}{s['p99']:>10.2f}"
        if flops:
            f = flops.get(stage)
            row += f"{f / 1e9:>10.2f}" if f is not None else f"{'':>10}"
        if nbytes:
            b = nbytes.get(stage)
            row += f"{b / 1e6:>10.1f}" if b is not None else f"{'':>10}"
        if bound_ms:
            b = bound_ms.get(stage)
            row += f"{b:>10.3f}{s['median'] / b:>11.1f}x" if b else f"{'':>22}"
        lines.append(row)
    return "\n".join(lines)


def machine_info(device: torch.device | str = "cpu") -> dict[str, object]:
    info: dict[str, object] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    return info

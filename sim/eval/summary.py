"""Summary table (terminal + markdown), summary.json and summary.png from episodes.jsonl alone.

python -m sim.report OUT      # re-builds OUT/summary.{md,json,png} and prints the table
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sim.eval.records import EPISODES_FILE, read_episodes, write_json
from sim.eval.stats import summarize_episodes

log = logging.getLogger(__name__)

MARKERS = {"none": "s", "vla-pruner": "*", "fastv": "o", "sparsevlm": "^", "divprune": "D"}


def _keep(prune: dict[str, Any]) -> str:
    if prune.get("method", "none") == "none":
        return "-"
    if prune.get("keep_count") is not None:
        return str(prune["keep_count"])
    return f"{prune['keep_ratio']:g}" if prune.get("keep_ratio") is not None else "all"


def _rows(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    tasks = summary["tasks"]
    # VLA-Cache runs: the fraction of visual rows reused (a column only when a run has one)
    reuse = any(r.get("reused_fraction") is not None for r in summary["runs"])
    head = ["config", "method", "keep", "tokens", *(["reused"] if reuse else [])]
    head += ["success", "95% CI", *tasks, "median ms", "p99 ms"]
    rows = []
    for r in summary["runs"]:
        lo, hi = r["ci95"]
        total = r["latency_ms"].get("total", {"median": math.nan, "p99": math.nan})
        cells = [
            r["label"],
            r["prune"].get("method", "none"),
            _keep(r["prune"]),
            f"{r['kept_visual_tokens']:.1f}",
        ]
        if reuse:
            x = r.get("reused_fraction")
            cells.append("-" if x is None else f"{100 * x:.1f}%")
        cells += [
            f"{r['successes']}/{r['episodes']} {100 * r['success_rate']:.0f}%",
            f"[{lo:.2f}, {hi:.2f}]",
        ]
        for task in tasks:
            t = r["tasks"].get(task)
            cells.append(f"{t['successes']}/{t['episodes']}" if t else "-")
        cells += [f"{total['median']:.1f}", f"{total['p99']:.1f}"]
        rows.append(cells)
    return head, rows


def _stage_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    stages = list(dict.fromkeys(s for r in summary["runs"] for s in r["latency_ms"]))
    if "total" in stages:  # last, also when policies with other stages (CogACT) are mixed in
        stages = [s for s in stages if s != "total"] + ["total"]
    rows = []
    for r in summary["runs"]:
        lat = r["latency_ms"]
        rows.append([r["label"]] + [f"{lat[s]['median']:.2f}" if s in lat else "-" for s in stages])
    return ["median ms / step", *stages], rows


def _notes(summary: dict[str, Any]) -> list[str]:
    if summary["paired"]:
        return []
    if summary["obs_mismatch"]:
        why = f"first observations differ for (task, seed) {summary['obs_mismatch']}"
    else:
        why = "configurations did not all see the same (task, seed) episodes (unfinished run?)"
    return [f"NOTE: not paired: {why}"]


def _text(head: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]

    def line(cells):
        first = cells[0].ljust(widths[0])
        return "  ".join([first, *(c.rjust(w) for c, w in zip(cells[1:], widths[1:]))])

    return [line(head), "-" * len(line(head)), *(line(r) for r in rows)]


def _markdown(head: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def format_table(summary: dict[str, Any]) -> str:
    """The terminal table: success per configuration and task, then per-stage latency."""
    if not summary["runs"]:
        return "no finished episodes"
    lines = _text(*_rows(summary)) + [""] + _text(*_stage_rows(summary))
    return "\n".join(lines + _notes(summary))


def format_markdown(summary: dict[str, Any]) -> str:
    lines = ["# Evaluation summary", ""]
    if summary["runs"]:
        lines += _markdown(*_rows(summary)) + ["", "## Per-step latency by stage", ""]
        lines += _markdown(*_stage_rows(summary))
    lines += [
        "",
        "success: successes/episodes with a Wilson 95% interval; tokens: mean visual tokens kept "
        "per policy step; latency: per policy step, pooled over all steps of a configuration.",
    ]
    return "\n".join(lines + [f"\n{n}" for n in _notes(summary)]) + "\n"


def plot_summary(summary: dict[str, Any], path: str | Path) -> None:
    """What a user decides by, two panels. Left: success rate (Wilson 95% error bars) against
    median per-step latency, one labelled point per configuration — upper left is better.
    Right: success against mean kept visual tokens; configurations that differ only in their
    keep ratio ("fastv@0.5", "fastv@0.25", ...) share a colour and a line."""
    # Figure + Agg canvas directly: no pyplot, so no global backend state is touched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups: dict[str, list[dict[str, Any]]] = {}
    for r in summary["runs"]:
        groups.setdefault(r["label"].split("@")[0], []).append(r)
    fig = Figure(figsize=(12, 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax_l, ax_k = fig.subplots(1, 2)
    for i, (name, runs) in enumerate(groups.items()):
        runs = sorted(runs, key=lambda r: r["kept_visual_tokens"])
        y = [r["success_rate"] for r in runs]
        err = [
            [r["success_rate"] - r["ci95"][0] for r in runs],
            [r["ci95"][1] - r["success_rate"] for r in runs],
        ]
        ms = [r["latency_ms"].get("total", {}).get("median", math.nan) for r in runs]
        style = {
            "marker": MARKERS.get(runs[0]["prune"].get("method"), "P"),
            "color": f"C{i % 10}",
            "markersize": 8,
            "alpha": 0.85,
        }
        ax_l.errorbar(ms, y, yerr=err, capsize=3, linestyle="none", label=name, **style)
        if len(runs) > 1:  # a family of keep ratios: which point is which
            for r, x_ms, y_r in zip(runs, ms, y):
                ax_l.annotate(
                    _keep(r["prune"]), (x_ms, y_r), textcoords="offset points",
                    xytext=(5, 4), fontsize=7, color=style["color"],
                )
        x = [r["kept_visual_tokens"] for r in runs]
        line = "-" if len(runs) > 1 else "none"
        ax_k.errorbar(x, y, yerr=err, capsize=3, linestyle=line, **style)
    ax_l.set(
        xlabel="median ms / policy step",
        ylabel="success rate",
        ylim=(-0.05, 1.05),
        title="success (Wilson 95% CI) vs latency: upper left is better",
    )
    ax_l.set_xlim(left=0)
    ax_k.set(
        xlabel="mean kept visual tokens",
        ylabel="success rate",
        ylim=(-0.05, 1.05),
        title="success vs kept visual tokens",
    )
    for ax in (ax_l, ax_k):
        ax.grid(alpha=0.3)
    if groups:
        fig.legend(loc="outside right upper", fontsize=8)
    fig.savefig(path, dpi=120)


def write_summary(summary: dict[str, Any], out_dir: str | Path) -> None:
    out = Path(out_dir)
    write_json(out / "summary.json", summary)
    (out / "summary.md").write_text(format_markdown(summary))
    plot_summary(summary, out / "summary.png")


def report(out_dir: str | Path) -> dict[str, Any]:
    """Re-build OUT/summary.{json,md,png} from OUT/episodes.jsonl; returns the summary."""
    out = Path(out_dir)
    path = out / EPISODES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {EPISODES_FILE} in {out}: not an eval output directory?")
    summary = summarize_episodes(read_episodes(path))
    write_summary(summary, out)
    log.info("wrote %s/summary.{md,json,png}", out)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sim.report", description=__doc__.split("\n")[0])
    p.add_argument("out", help="eval output directory (holds episodes.jsonl)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(format_table(report(args.out)))
    return 0

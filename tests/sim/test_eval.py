"""Tests of the simulation eval loop: Wilson intervals, paired seeds, resume, reports, CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

pytest.importorskip("mujoco")
pytest.importorskip("gymnasium")

from sim.eval import (  # noqa: E402
    EvalConfig,
    parse_run_spec,
    parse_runs,
    read_episodes,
    report,
    run_eval,
    wilson_interval,
)
from sim.eval.records import EPISODES_FILE, episode_key  # noqa: E402
from vla_prune import PruneConfig  # noqa: E402
from vla_prune_cli.main import build_parser, main  # noqa: E402

pytestmark = pytest.mark.sim

REPO = Path(__file__).resolve().parents[2]
# What a resumed run must reproduce exactly (latency fields differ from run to run).
CORE = ("label", "task", "seed", "success", "steps", "obs_hash", "kept_visual_tokens")


def small_config(out: Path, **kw) -> EvalConfig:
    base = dict(
        policy="tiny-openvla",
        tasks=("press", "push"),
        episodes=2,
        seed=3,
        max_steps=4,
        warmup=1,
        runs=parse_runs("dense,vla-pruner@0.25"),
        out=str(out),
    )
    return EvalConfig(**{**base, **kw})


def core(records: list[dict]) -> list[tuple]:
    return sorted(tuple(r[k] for k in CORE) for r in records)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict]:
    """One uninterrupted run (with videos), shared by the tests below."""
    out = tmp_path_factory.mktemp("eval") / "ref"
    summary = run_eval(small_config(out, video=True), progress=False)
    return out, summary


# -- Wilson intervals ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "k, n, lo, hi",
    [  # by hand: centre = (p + z²/2n)/(1 + z²/n), half = z/(1 + z²/n)·sqrt(p(1-p)/n + z²/4n²)
        (0, 10, 0.0, 0.2775),
        (8, 10, 0.4902, 0.9433),
        (10, 10, 0.7225, 1.0),
        (50, 100, 0.4038, 0.5962),
    ],
)
def test_wilson_interval_hand_computed(k, n, lo, hi):
    got = wilson_interval(k, n)
    assert got == pytest.approx((lo, hi), abs=5e-4)


def test_wilson_interval_contains_estimate_and_rejects_bad_counts():
    for n in range(1, 25):
        for k in range(n + 1):
            lo, hi = wilson_interval(k, n)
            assert 0.0 <= lo <= k / n <= hi <= 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


# -- configuration parsing -----------------------------------------------------------------------


def test_parse_runs_specs():
    runs = parse_runs("dense, vla-pruner@0.25,fastv@64,r8=random@0.125")
    assert [r.label for r in runs] == ["dense", "vla-pruner@0.25", "fastv@64", "r8"]
    assert runs[0].prune == PruneConfig()
    assert runs[1].prune == PruneConfig(method="vla-pruner", keep_ratio=0.25)
    assert runs[2].prune == PruneConfig(method="fastv", keep_count=64)
    assert runs[3].prune == PruneConfig(method="random", keep_ratio=0.125)
    from_file = parse_run_spec(str(REPO / "configs/pruning/vla-pruner-12.yaml"))
    assert from_file.label == "vla-pruner-12" and from_file.prune.keep_ratio == 0.125
    from_eval_yaml = parse_runs(str(REPO / "configs/eval/embedded.yaml"))
    assert [r.label for r in from_eval_yaml] == [
        "dense-eager-fp32",
        "dense",
        "vla-pruner@0.25",
        "fastv@0.25",
        "cogact",
        "cogact-cache5-vp25",
    ]


@pytest.mark.parametrize(
    "spec, match",
    [  # the grammar's own errors: tests/test_runspec.py; here what a list of runs adds
        ("fastv@abc", "not a number"),
        ("dense,dense", "duplicate configuration labels"),
        (" , ", "empty"),
        ("fastv@0.25+skip2", "eval needs the layers themselves"),
    ],
)
def test_parse_runs_rejects_bad_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        EvalConfig(runs=parse_runs(spec))


def test_eval_help_names_the_suites(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "embedded | libero | simpler" in text


def test_cli_configs_error_is_clear(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "--configs", "dense,fastv@two"])
    assert "--configs: bad configuration 'fastv@two'" in capsys.readouterr().err
    args = build_parser().parse_args(["eval", "--configs", "fastv@0.25", "--tasks", "press"])
    assert args.configs[0].prune.method == "fastv" and args.tasks == "press"


# -- the loop ------------------------------------------------------------------------------------


def test_paired_episodes_and_record_layout(reference):
    out, summary = reference
    records = read_episodes(out / EPISODES_FILE)
    assert len(records) == 2 * 2 * 2  # configurations x tasks x episodes
    by_label: dict[str, list] = {}
    for r in records:
        by_label.setdefault(r["label"], []).append((r["task"], r["seed"], r["obs_hash"]))
    dense, pruned = by_label["dense"], by_label["vla-pruner@0.25"]
    assert dense == pruned  # same (task, seed) list in the same order, same first observation
    expected = [(t, s) for t in ("press", "push") for s in (3, 4)]  # seeds seed + i
    assert sorted({(t, s) for t, s, _ in dense}) == expected
    assert summary["paired"]
    for r in records:  # policy.reset() per episode: VLA-Pruner's 3 warm-up steps every time
        n = r["policy_steps"]
        want = 256 if r["label"] == "dense" else (min(n, 3) * 256 + max(n - 3, 0) * 64) / n
        assert r["kept_visual_tokens"] == want
    r = records[0]
    assert r["steps"] <= 4 and r["policy_steps"] == len(r["step_ms"]["total"]) >= 1
    assert set(r["latency_ms"]["total"]) == {"median", "p99"}
    assert r["prune"]["method"] == "none" and r["policy"] == "tiny-openvla"
    assert (out / r["video"]).is_file() and r["video"].endswith((".gif", ".mp4"))
    config = json.loads((out / "config.json").read_text())
    assert config["tasks"] == ["press", "push"] and len(config["runs"]) == 2


def test_summary_files_and_report_rebuild(reference):
    out, summary = reference
    for name in ("summary.md", "summary.json", "summary.png"):
        assert (out / name).stat().st_size > 0
        (out / name).unlink()
    rebuilt = report(out)  # from episodes.jsonl alone
    assert json.loads(json.dumps(rebuilt)) == json.loads((out / "summary.json").read_text())
    assert [r["label"] for r in rebuilt["runs"]] == ["dense", "vla-pruner@0.25"]
    dense = rebuilt["runs"][0]
    assert dense["episodes"] == 4 and dense["kept_visual_tokens"] == 256
    assert dense["ci95"] == list(wilson_interval(dense["successes"], 4))
    assert set(dense["tasks"]) == {"press", "push"}
    assert "median" in dense["latency_ms"]["prefill"]
    md = (out / "summary.md").read_text()
    assert "| dense | none |" in md and "95% CI" in md
    assert (out / "summary.png").read_bytes()[:4] == b"\x89PNG"


def test_unpaired_results_are_flagged(reference):
    from sim.eval import format_table, summarize_episodes

    records = read_episodes(reference[0] / EPISODES_FILE)[:-1]  # as if cut short
    summary = summarize_episodes(records)
    assert not summary["paired"]
    assert "NOTE: not paired" in format_table(summary)


def test_resume_after_crash_gives_the_same_episodes(reference, tmp_path):
    ref_out, _ = reference
    ref = read_episodes(ref_out / EPISODES_FILE)
    out = tmp_path / "crash"
    seen = []

    def crash_after_three(record):
        seen.append(record)
        if len(seen) == 3:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        run_eval(small_config(out), progress=False, on_episode=crash_after_three)
    path = out / EPISODES_FILE
    assert len(path.read_text().splitlines()) == 3
    with open(path, "a") as f:  # a crash in the middle of a write: a torn line
        f.write('{"label": "dense", "task": "pu')
    run_eval(small_config(out), progress=False)
    lines = path.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line is whole JSON again
    assert len(lines) == len(ref)
    assert core(records) == core(ref)  # same outcomes, no duplicates, nothing missing
    run_eval(small_config(out), progress=False)  # all done: nothing appended
    assert path.read_text().splitlines() == lines


def test_resume_refuses_a_different_evaluation(reference, tmp_path):
    out = tmp_path / "mixed"
    run_eval(small_config(out, tasks=("press",), episodes=1, runs=parse_runs("dense")))
    with pytest.raises(ValueError, match="tasks"):
        run_eval(small_config(out, episodes=1, runs=parse_runs("dense")))
    with pytest.raises(ValueError, match="policy"):
        run_eval(small_config(out, tasks=("press",), policy="small-openvla"))
    other = parse_runs("dense=fastv@0.25")
    with pytest.raises(ValueError, match="configuration 'dense'"):
        run_eval(small_config(out, tasks=("press",), episodes=1, runs=other))
    # More episodes or a new configuration are fine: the old episodes stay valid.
    more = small_config(out, tasks=("press",), episodes=2, runs=parse_runs("dense,fastv@0.25"))
    summary = run_eval(more, progress=False)
    assert [(r["label"], r["episodes"]) for r in summary["runs"]] == [
        ("dense", 2),
        ("fastv@0.25", 2),
    ]


def test_cli_eval_runs_and_prints_table(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["eval", "--policy", "tiny-openvla", "--tasks", "press", "--episodes", "1"]
    argv += ["--max-steps", "2", "--warmup", "0", "--configs", "dense", "--out", str(out)]
    assert main(argv + ["--quiet"]) == 0
    text = capsys.readouterr().out
    assert "dense" in text and "95% CI" in text and "median ms / step" in text
    assert len(read_episodes(out / EPISODES_FILE)) == 1
    assert main(["eval", "--out", str(out), "--seed", str(10**6)]) == 2  # leaves EVAL_SEEDS
    assert "EVAL_SEEDS" in capsys.readouterr().err


def test_eval_config_from_yaml_and_overrides():
    from sim.eval import load_eval_config

    cfg = load_eval_config(REPO / "configs/eval/embedded.yaml")
    assert cfg.suite == "embedded" and cfg.tasks == ("press", "push", "pick_place", "stack")
    assert cfg.policy == "embedded-openvla" and cfg.unnorm_key == "embedded"
    methods = [r.prune.method for r in cfg.runs]
    assert methods == ["none", "none", "vla-pruner", "fastv", "none", "vla-pruner"]
    assert [r.policy for r in cfg.runs[4:]] == ["embedded-cogact"] * 2
    assert cfg.runs[5].cache == 5 and cfg.runs[5].ensemble and cfg.workers == 2
    # the fast engine by default; the reference row names the eager fp32 engine itself
    from sim.eval.runner import run_engine

    engines = {(e.compile, e.weights) for e in (run_engine(r, cfg) for r in cfg.runs[1:])}
    assert engines == {(True, "int8")}
    assert (run_engine(cfg.runs[0], cfg).compile, run_engine(cfg.runs[0], cfg).weights) == (
        False,
        "fp32",
    )
    cfg = load_eval_config(REPO / "configs/eval/embedded.yaml", episodes=3, policy="x")
    assert (cfg.episodes, cfg.policy, cfg.seeds) == (3, "x", [0, 1, 2])
    assert dataclasses.replace(cfg, seed=5).seeds == [5, 6, 7]
    assert EvalConfig(tasks="all").tasks is None and EvalConfig(tasks="a,b").tasks == ("a", "b")


def test_cogact_configurations_cache_and_skip(tmp_path):
    """Per-configuration DiT caching and layer skipping reach the policy, and are reset between
    configurations that share it (a cached run must not leak into the next dense one)."""
    from sim.eval.config import run_from_entry
    from sim.eval.runner import configure_run

    skip_file = tmp_path / "skips.json"
    skip_file.write_text(json.dumps({"skip_layers": [1]}))
    cached = run_from_entry(
        {"label": "c5", "cache": 5, "skip_layers": str(skip_file), "ensemble": True}
    )
    assert cached.cache == 5 and cached.skip_layers == (1,)
    assert cached.to_dict()["cache"] == 5 and cached.to_dict()["skip_layers"] == [1]
    with pytest.raises(ValueError, match="cache must be an int"):
        run_from_entry({"label": "bad", "cache": 0})
    with pytest.raises(ValueError, match="unknown keys"):
        run_from_entry({"label": "bad", "cach": 5})

    import vla_prune

    policy = vla_prune.build_policy("tiny-cogact", seed=0)
    configure_run(policy, cached)
    assert policy.cache_config.enabled and policy.cache_config.interval == 5
    assert set(policy.engine.skip_layers) == {1} and policy.sampling.ensemble
    configure_run(policy, parse_run_spec("dense"))
    assert not policy.cache_config.enabled and not policy.engine.skip_layers
    assert not policy.sampling.ensemble
    with pytest.raises(ValueError, match="needs a DiT head"):
        configure_run(vla_prune.build_policy("tiny-openvla", seed=0), cached)
    with pytest.raises(ValueError, match="ensemble needs a DiT head"):
        openvla = vla_prune.build_policy("tiny-openvla", seed=0)
        configure_run(openvla, parse_run_spec("dense+ensemble"))

    cfg = small_config(
        tmp_path / "cg",
        policy="tiny-cogact",
        tasks=("press",),
        episodes=1,
        max_steps=20,
        runs=(parse_run_spec("dense"), cached),
    )
    run_eval(cfg, progress=False)
    eps = {r["label"]: r for r in read_episodes(tmp_path / "cg" / EPISODES_FILE)}
    assert eps["c5"]["obs_hash"] == eps["dense"]["obs_hash"]
    assert (eps["c5"]["cache"], eps["c5"]["skip_layers"]) == (5, [1])
    # the ensemble executes one action per policy call; without it a call runs a 16-step chunk
    assert eps["c5"]["policy_steps"] == eps["c5"]["steps"] > 1
    assert eps["dense"]["policy_steps"] == -(-eps["dense"]["steps"] // 16)
    assert (eps["dense"]["cache"], eps["dense"]["skip_layers"]) == (None, [])


def test_parallel_workers_match_one_process_and_resume(reference, tmp_path):
    """Two worker processes give the episodes one process gives (same seeds, same outcomes), in
    the same order; a run begun in one process finishes in two without repeating episodes."""
    from sim.eval.parallel import run_eval_parallel

    ref_out, _ = reference
    ref = read_episodes(ref_out / EPISODES_FILE)
    out = tmp_path / "par"
    run_eval_parallel(small_config(out, workers=2, video=True), workers=2, progress=False)
    got = read_episodes(out / EPISODES_FILE)
    assert [episode_key(r) for r in got] == [episode_key(r) for r in ref]
    assert core(got) == core(ref)
    # --video with workers: the GIFs land in OUT/videos, as with one process, and records
    # name them relative to OUT (they once landed in OUT/workers/N/videos).
    assert [r["video"] for r in got] == [r["video"] for r in ref]
    assert all((out / r["video"]).is_file() for r in got)
    assert not list((out / "workers").rglob("*.gif"))

    half = tmp_path / "half"
    run_eval(small_config(half, runs=parse_runs("dense")), progress=False)
    first = {episode_key(r): r["wall_s"] for r in read_episodes(half / EPISODES_FILE)}
    run_eval_parallel(small_config(half), workers=2, progress=False)
    both = read_episodes(half / EPISODES_FILE)
    assert core(both) == core(ref) and len(both) == len({episode_key(r) for r in both})
    assert all(r["wall_s"] == first[episode_key(r)] for r in both if r["label"] == "dense")


def test_viz_writes_an_overlay_per_step_and_the_episode_gif(tmp_path):
    from PIL import Image

    out = tmp_path / "viz"
    argv = ["viz", "--policy", "embedded-openvla", "--task", "press", "--steps", "3"]
    assert main([*argv, "--pruner", "vla-pruner", "--keep", "0.25", "--out", str(out)]) == 0
    pngs = sorted(out.glob("step_*.png"))
    assert [p.name for p in pngs] == ["step_000.png", "step_001.png", "step_002.png"]
    gif = Image.open(out / "episode.gif")
    assert gif.n_frames == 3 and gif.size == Image.open(pngs[0]).size
    assert gif.info["duration"] == 100  # the suite's 10 Hz control rate

"""The one run-spec grammar (vla_prune/runspec.py) and its consumers: eval, bench, profile, ROS."""

from __future__ import annotations

from pathlib import Path

import pytest

from vla_prune.runspec import parse_run_spec, parse_run_specs, split_specs

REPO = Path(__file__).resolve().parents[1]


def test_parts_of_a_spec():
    s = parse_run_spec("c=vla-pruner@0.25+cache5+skip[3,1]+ensemble")
    assert (s.label, s.prune.method, s.prune.keep_ratio, s.prune.keep_count) == (
        "c",
        "vla-pruner",
        0.25,
        None,
    )
    assert (s.cache, s.skip_layers, s.skip_count, s.ensemble, s.blind) == (
        5,
        (1, 3),
        None,
        True,
        False,
    )
    assert parse_run_spec("fastv@64").prune.keep_count == 64
    assert parse_run_spec("fastv@25%").prune.keep_ratio == 0.25
    assert parse_run_spec("cache5+vla-pruner@0.25+skip2").skip_count == 2  # any order
    dense = parse_run_spec("dense")
    assert (dense.label, dense.prune.method) == ("dense", "none")
    assert parse_run_spec("none+blind").blind
    yaml_spec = parse_run_spec(str(REPO / "configs/pruning/vla-pruner-12.yaml"))
    assert yaml_spec.label == "vla-pruner-12" and yaml_spec.prune.method == "vla-pruner"


def test_lists_split_outside_brackets():
    assert split_specs("dense, a=fastv@0.5+skip[1,2] ,random@8") == [
        "dense",
        "a=fastv@0.5+skip[1,2]",
        "random@8",
    ]
    assert [s.label for s in parse_run_specs("dense,fastv@64")] == ["dense", "fastv@64"]


@pytest.mark.parametrize(
    "spec, match",
    [
        ("fastv", "needs a keep value"),
        ("fastv@", "needs a keep value"),
        ("fastv@abc", "not a number"),
        ("fastv@1.5", "keep_ratio"),
        ("fastv@0", "keep_count"),
        ("dense@0.5", "takes no @keep"),
        ("magic@0.25", "unknown pruning method 'magic'"),
        ("=fastv@0.25", "expected"),
        ("fastv@0.25++cache5", "empty part"),
        ("fastv@0.25+cache0", "N >= 1"),
        ("fastv@0.25+skip2+skip[1]", "repeats"),
        ("fastv@0.25+fastv@0.5", "repeats"),
        ("fastv@0.25+skip[]", "names no layer"),
    ],
)
def test_bad_specs_say_what_is_wrong(spec, match):
    with pytest.raises(ValueError, match=match) as e:
        parse_run_spec(spec)
    assert str(e.value).startswith("bad configuration ")  # one error style everywhere


def test_one_string_means_the_same_in_every_consumer():
    """fastv@64 keeps 64 tokens in eval, bench, profile and the ROS node (bench once rejected
    it as a ratio of 64)."""
    import argparse

    import vla_prune
    from ros_nodes.params import accel_spec
    from sim.eval.config import parse_runs
    from vla_prune.benchmark import make_configs
    from vla_prune_cli.common import prune_config_from

    want = parse_run_spec("fastv@64").prune
    assert parse_runs("fastv@64")[0].prune == want
    assert accel_spec("fastv@64").prune == want
    args = argparse.Namespace(prune_config=None, run=None, pruner="fastv", keep="64", layer=None)
    assert prune_config_from(args) == want
    policy = vla_prune.build_policy("tiny-openvla", seed=0)
    (bench,) = make_configs(policy, ("fastv@64",))
    assert bench.runner.prune_config == want
    with pytest.raises(ValueError, match="bad configuration 'fastv@two'"):
        make_configs(policy, ("fastv@two",))
    with pytest.raises(ValueError, match="eval needs the layers themselves"):
        parse_runs("fastv@0.25+skip2")


def test_engine_parts_and_their_defaults():
    import vla_prune
    from sim.eval.config import parse_runs
    from vla_prune.benchmark import make_configs

    s = parse_run_spec("vla-pruner@0.25+int8+compile")
    assert (s.compile, s.weights) == (True, "int8")
    assert s.engine() == vla_prune.EngineConfig(compile=True, weights="int8")
    # what the spec leaves open comes from the caller's default (--compile / --weights)
    default = vla_prune.EngineConfig(compile=True, weights="bf16")
    assert parse_run_spec("fastv@0.5").engine(default) == default
    assert parse_runs("fastv@0.5+int8")[0].weights == "int8"
    with pytest.raises(ValueError, match="repeats"):
        parse_run_spec("fastv@0.5+int8+bf16")
    # bench: an int8 configuration runs on a converted copy; the caller's model stays fp32
    policy = vla_prune.build_policy("tiny-openvla", seed=0)
    dense, low = make_configs(policy, ("dense", "dense+int8"))
    assert dense.runner.model is policy.model and low.runner.model is not policy.model
    assert low.runner.engine_config.weights == "int8"
    assert policy.engine_config.weights == "fp32"

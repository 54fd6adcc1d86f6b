"""Every strategy on small hand-made inputs, checked against selections worked out by hand."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from vla_prune.config import PruneConfig, load_yaml
from vla_prune.pruning.base import PruneInputs, available, make_pruner
from vla_prune.pruning.select import maxmin_diversity, topk_indices
from vla_prune.pruning.simple import uniform_grid
from vla_prune.pruning.temporal import ActionScoreHistory, smooth_action_scores, window_weights

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "pruning"

# Compass directions: cosine distance 0 (same way), 1 (at right angles), 2 (opposite).
E, N, W, S = (1.0, 0.0), (0.0, 1.0), (-1.0, 0.0), (0.0, -1.0)
# idx 0:E 1:N 2:W 3:S 4:E 5:N (4 and 5 are longer copies of 0 and 1)
COMPASS = torch.tensor([E, N, W, S, (2.0, 0.0), (0.0, 3.0)])


def t(*v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


def ids(x: torch.Tensor | None) -> list[int] | None:
    return None if x is None else x.tolist()


def pruner(method: str, **kw):
    return make_pruner(PruneConfig(method=method, **kw))


# --- selection helpers -------------------------------------------------------------------------


def test_topk_ties_go_to_lower_index():
    s = t(0.1, 0.5, 0.5, 0.2, 0.5, 0.0)
    assert ids(topk_indices(s, 2)) == [1, 2]  # three-way tie at 0.5 -> 1, 2 (not 4)
    assert ids(topk_indices(s, 4)) == [1, 2, 3, 4]
    assert ids(topk_indices(torch.zeros(5), 3)) == [0, 1, 2]
    assert topk_indices(s, 4).dtype == torch.long


def test_maxmin_order_on_compass():
    # Nearest-neighbour distances: 0:0 (4), 1:0 (5), 2:1, 3:1, 4:0, 5:0 -> first pick 2 (tie 2,3).
    # Min distance to {W}: 0:2 1:1 3:1 4:2 5:1 -> 0 (tie 0,4); then 1:1 3:1 4:0 5:1 -> 1;
    # then 3: min(1, d(S,N)=2) = 1, 4:0, 5:0 -> 3; then 4, 5 (all 0, lowest first).
    order = maxmin_diversity(COMPASS, 6, return_order=True)
    assert ids(order) == [2, 0, 1, 3, 4, 5]
    assert ids(maxmin_diversity(COMPASS, 3)) == [0, 1, 2]
    assert ids(maxmin_diversity(COMPASS, 4)) == [0, 1, 2, 3]


def test_maxmin_restricted_to_candidates():
    # Among {1:N, 3:S, 5:N}: NN distances 1:0, 3:2, 5:0 -> 3 first (globally 2 would be),
    # then 1 and 5 tie at d(N,S)=2 -> 1, then 5.
    order = maxmin_diversity(COMPASS, 3, candidates=torch.tensor([5, 1, 3]), return_order=True)
    assert ids(order) == [3, 1, 5]
    assert ids(maxmin_diversity(COMPASS, 2, candidates=torch.tensor([1, 3, 5]))) == [1, 3]


def test_maxmin_is_max_of_min_not_max_of_sum():
    # Unit vectors at 0, 10, 90, 100, 180 degrees. 180 has the farthest nearest neighbour (100).
    # Distance to {180}: 0:2, 10:1.98, 90:1, 100:0.83 -> 0 deg; then min over {180, 0}:
    # 10: 0.015, 90: 1, 100: min(0.83, 1.17) = 0.83 -> 90 deg.
    deg = [0, 10, 90, 100, 180]
    emb = torch.tensor([(math.cos(math.radians(a)), math.sin(math.radians(a))) for a in deg])
    assert ids(maxmin_diversity(emb, 3, return_order=True)) == [4, 0, 2]


def test_maxmin_duplicates_still_unique():
    emb = torch.ones(5, 3)  # all distances 0: picks fall back to index order
    assert ids(maxmin_diversity(emb, 3, return_order=True)) == [0, 1, 2]


# --- temporal smoothing ------------------------------------------------------------------------


def test_window_weights_newest_first():
    torch.testing.assert_close(window_weights(3, 0.8, 3), t(1.0, 0.8, 0.64) / 2.44)
    torch.testing.assert_close(window_weights(3, 0.8, 2), t(1.0, 0.8) / 1.8)
    torch.testing.assert_close(window_weights(3, 0.8, 1), t(1.0))
    torch.testing.assert_close(window_weights(3, 0.8, 7), t(1.0, 0.8, 0.64) / 2.44)  # n <= window


def test_smooth_weights_newest_highest():
    onehot = torch.eye(4)
    history = [onehot[0], onehot[1], onehot[2], onehot[3]]  # oldest first; window 3 drops [0]
    s = smooth_action_scores(history, window=3, gamma=0.8)
    torch.testing.assert_close(s, t(0.0, 0.64, 0.8, 1.0) / 2.44)
    assert int(s.argmax()) == 3  # the newest step weighs most (the early-release bug: oldest)
    assert smooth_action_scores([], window=3, gamma=0.8) is None


def test_action_history_is_bounded_and_clears():
    h = ActionScoreHistory(window=3)
    for i in range(5):
        h.push(torch.full((4,), float(i)))
    assert len(h) == 3
    assert [float(v[0]) for v in h.as_list()] == [2.0, 3.0, 4.0]  # oldest first
    h.clear()
    assert len(h) == 0 and h.as_list() == []


# --- strategies --------------------------------------------------------------------------------


def test_fastv_topk_of_semantic():
    x = PruneInputs(budget=3, num_visual=6, semantic=t(0.3, 0.1, 0.9, 0.3, 0.0, 0.7))
    assert ids(pruner("fastv").select(x)) == [0, 2, 5]  # 0.9, 0.7, then 0.3 tie -> 0 before 3


def test_sparsevlm_mean_over_text_rows():
    att = torch.tensor([[0.5, 0.0, 0.25, 0.0, 0.75, 0.0], [0.0, 0.5, 0.25, 0.25, 0.0, 0.0]])
    # means: [0.25, 0.25, 0.25, 0.125, 0.375, 0]
    x = PruneInputs(budget=2, num_visual=6, text_attention=att)
    assert ids(pruner("sparsevlm").select(x)) == [0, 4]
    x.budget = 4
    assert ids(pruner("sparsevlm").select(x)) == [0, 1, 2, 4]


def test_divprune_on_compass():
    x = PruneInputs(budget=3, num_visual=6, embeddings=COMPASS)
    assert ids(pruner("divprune").select(x)) == [0, 1, 2]


def test_random_uses_rng_then_seed():
    x = PruneInputs(budget=3, num_visual=8, rng=np.random.default_rng(7))
    want = sorted(np.random.default_rng(7).choice(8, 3, replace=False).tolist())
    assert ids(pruner("random").select(x)) == want
    x = PruneInputs(budget=3, num_visual=8)
    want = sorted(np.random.default_rng(5).choice(8, 3, replace=False).tolist())
    assert ids(pruner("random", seed=5).select(x)) == want


def test_uniform_spread():
    # 4x4, 4 tokens: 2x2 lattice at rows/cols floor((i + .5) * 4 / 2) = 1, 3.
    assert ids(uniform_grid(4, 4, 4)) == [5, 7, 13, 15]
    # 3 tokens: same 2x2 lattice, keep lattice points floor((j + .5) * 4 / 3) = 0, 2, 3.
    assert ids(uniform_grid(3, 4, 4)) == [5, 13, 15]
    # 2x8 grid, 4 tokens: r = round(sqrt(4 * 2 / 8)) = 1 row (row 1), cols 1, 3, 5, 7.
    assert ids(uniform_grid(4, 2, 8)) == [9, 11, 13, 15]
    # OpenVLA: 16x16 at 25% is every other row and column.
    x = PruneInputs(budget=64, num_visual=256)
    assert ids(pruner("uniform").select(x)) == [
        r * 16 + c for r in range(1, 16, 2) for c in range(1, 16, 2)
    ]


def vla_example(step: int = 3, **kw) -> tuple[PruneInputs, object]:
    # semantic top-3: {0, 1, 2}.
    semantic = t(0.9, 0.8, 0.7, 0.1, 0.0, 0.0, 0.0, 0.0)
    onehot = torch.eye(8)
    newest = 0.5 * onehot[2] + 0.5 * onehot[5]
    history = [onehot[7], onehot[6], newest]  # oldest first
    # smoothed: 2: .5, 5: .5, 6: .8, 7: .64 (x 1/2.44) -> action top-3 {6, 7, 2} (2/5 tie -> 2)
    # 0:E 1:E 2:N 3..5 anything 6:W 7:N
    emb = torch.tensor([E, (2.0, 0.0), N, S, S, S, W, (0.0, 3.0)])
    x = PruneInputs(
        budget=3, num_visual=8, semantic=semantic, action_history=history, embeddings=emb, step=step
    )
    return x, pruner("vla-pruner", **kw)


def test_vla_pruner_union_diversity_and_origin():
    # Union {0, 1, 2, 6, 7} (5 > 3). Among E,E,N,W,N: NN distances 0,0,0,1,0 -> 6 first;
    # distance to {W}: 0:2 1:2 2:1 7:1 -> 0; then 1:0 2:1 7:1 -> 2. Kept [0, 2, 6].
    x, p = vla_example()
    kept, origin = p.select_with_origin(x)
    assert ids(kept) == [0, 2, 6]
    assert origin.dtype == torch.int8
    assert ids(origin) == [1, 3, 2]  # 0 semantic only, 2 both, 6 action only
    assert ids(p.select(x)) == [0, 2, 6]


def test_vla_pruner_warmup():
    for step in range(3):  # warmup defaults to window = 3
        x, p = vla_example(step=step)
        assert p.select(x) is None
    x, p = vla_example(step=1, warmup=1)
    assert ids(p.select(x)) == [0, 2, 6]


def test_vla_pruner_without_history_is_semantic():
    x, p = vla_example(step=0, warmup=0)
    x.action_history = []
    kept, origin = p.select_with_origin(x)
    assert ids(kept) == [0, 1, 2] and ids(origin) == [1, 1, 1]


def test_vla_pruner_uses_only_window():
    x, p = vla_example()
    x.action_history = [torch.eye(8)[3] * 9] + x.action_history  # older than the window
    assert ids(p.select(x)) == [0, 2, 6]


def full_inputs(n: int = 16) -> PruneInputs:
    g = torch.Generator().manual_seed(0)
    return PruneInputs(
        budget=n,
        num_visual=n,
        grid=(4, n // 4),
        semantic=torch.rand(n, generator=g),
        text_attention=torch.rand(3, n, generator=g),
        embeddings=torch.randn(n, 5, generator=g),
        action_history=[torch.rand(n, generator=g) for _ in range(3)],
        rng=np.random.default_rng(0),
        step=10,
    )


@pytest.mark.parametrize("method", [m for m in available() if m != "fixed"])
def test_keep_ratio_one_keeps_all(method):
    cfg = PruneConfig(method=method, keep_ratio=1.0)
    x = full_inputs()
    x.budget = cfg.budget(x.num_visual)
    assert x.budget == x.num_visual
    assert make_pruner(cfg).select(x) is None


def test_strategies_are_registered():
    make_pruner(PruneConfig())  # imports the strategies
    assert {"vla-pruner", "fastv", "sparsevlm", "divprune", "random", "uniform"} <= set(available())


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_preset_loads(path):
    cfg = load_yaml(PruneConfig, path)
    make_pruner(cfg)
    assert cfg.token_method in available()  # "vla-pruner+vla-cache" selects with vla-pruner


def test_presets_present():
    names = {p.stem for p in CONFIGS.glob("*.yaml")}
    want = {
        "vla-pruner",
        "vla-pruner-50",
        "vla-pruner-12",
        "fastv",
        "sparsevlm",
        "divprune",
        "random",
        "uniform",
        "none",
    }
    assert want <= names
    assert load_yaml(PruneConfig, CONFIGS / "vla-pruner-12.yaml").budget(256) == 32

"""DAgger rollouts: the stored actions are the expert's labels on the states actually visited."""

import numpy as np
import pytest

from sim.dagger import DaggerConfig, collect
from sim.dataset import iter_episodes
from sim.demos import load_demos, record_episode
from sim.envs.embedded import EmbeddedEnv

pytestmark = pytest.mark.sim


def _collect(out, beta, episodes=3, batch=2):
    return collect(
        DaggerConfig(
            policy="tiny-openvla-112",  # random weights: a policy that drives badly
            out_dir=out,
            tasks=("press",),
            episodes_per_task=episodes,
            beta=beta,
            batch=batch,
        )
    )


def test_beta_one_reproduces_the_expert_demo_exactly(tmp_path):
    records = _collect(tmp_path / "d", beta=1.0)
    assert [r["seed"] for r in records] == [3_000_000, 3_000_001, 3_000_002]  # uneven batches
    env = EmbeddedEnv("press")
    for ep in load_demos(tmp_path / "d"):
        ref = record_episode(env, ep.seed)
        assert ep.success and ref.success
        np.testing.assert_array_equal(ep.actions, ref.actions)
        np.testing.assert_array_equal(ep.images, ref.images)
    env.close()


def test_policy_driven_rollouts_store_expert_labels_on_the_policy_states(tmp_path):
    _collect(tmp_path / "d", beta=0.0, episodes=2)
    env = EmbeddedEnv("press")
    diverged = False
    for ep in load_demos(tmp_path / "d"):
        ref = record_episode(env, ep.seed)
        n = min(len(ep), len(ref))
        diverged |= len(ep) != len(ref) or not np.array_equal(ep.states[:n], ref.states[:n])
        # Every label is the expert's move from the stored state: towards its waypoint,
        # never longer than the env's per-step limit.
        assert np.all(np.abs(ep.actions[:, :3]) <= env.config.max_delta + 1e-6)
        assert np.all(ep.actions[:, 3:6] == 0)
    env.close()
    assert diverged  # the random policy, not the expert, chose where the episode went


def test_training_reads_several_datasets(tmp_path):
    _collect(tmp_path / "a", beta=1.0, episodes=1, batch=1)
    _collect(tmp_path / "b", beta=1.0, episodes=2, batch=2)
    assert len(list(iter_episodes(f"{tmp_path / 'a'},{tmp_path / 'b'}"))) == 3
    with pytest.raises(ValueError, match="no dataset"):
        list(iter_episodes(" , "))


@pytest.mark.parametrize("bad", [dict(beta=1.5), dict(seed_start=5), dict(tasks=("fly",))])
def test_bad_config_is_refused(tmp_path, bad):
    with pytest.raises(ValueError):
        collect(DaggerConfig(policy="tiny-openvla-112", out_dir=tmp_path / "x", **bad))

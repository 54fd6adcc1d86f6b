"""The embedded default simulation suite: a MuJoCo tabletop with language-conditioned tasks."""

from sim.envs.embedded.env import EmbeddedConfig, EmbeddedEnv
from sim.envs.embedded.tasks import FAMILIES, TaskInstance

TASKS = tuple(FAMILIES)

__all__ = ["TASKS", "EmbeddedConfig", "EmbeddedEnv", "TaskInstance"]
